"""`llmkit quantize`: write a native quantized checkpoint (packed weights that stay packed when loaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.commands.common import model_path

Scheme = Literal["int8", "int4", "int4_asym", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k", "nf4", "gptq",
                 "awq"]  # FORMATS, GGUF's K-quants, calibrated
CALIBRATED = ("gptq", "awq")  # calibrated 4-bit methods: they write int4_asym
DEFAULT_OUTPUT = "quantized"  # without --output: ./quantized/<model name>-<scheme>
DEMO_TOKENS = 2048  # perplexity before/after on the first tokens of the built-in Tiny Shakespeare


def quantize(
    model: str | None = None,
    scheme: Scheme = "int8",
    group_size: int | None = None,
    head: bool = False,
    output: str | None = None,
    overwrite: bool = False,
    perplexity_tokens: int = DEMO_TOKENS,
    calibration: str | None = None,
    n_sequences: int | None = None,
) -> dict[str, float | str | None]:
    """Quantize a model's linear layers and save it as an llmkit quantized checkpoint.

    Example: llmkit quantize                                   (SmolLM2 to int8 in ./quantized/, perplexity before/after)
             llmkit quantize --model my_model/ --scheme int4 --group_size 32 --output my_model_int4/
             llmkit quantize --scheme q4_0 --perplexity_tokens 0   (skip the perplexity check)
             llmkit quantize --model my_model/ --scheme q4_k        (rows must be multiples of 256 values)
             llmkit quantize --scheme gptq --group_size 64 --calibration my_text.txt --n_sequences 32

    The attention and MLP projections (q/k/v/o, gate/up/down) are replaced by packed integers plus scales; the
    embedding, norms and (unless --head) the LM head stay float. The output loads in llmkit generate, chat,
    perplexity, evaluate and info, and stays quantized in memory. Schemes: int8 (per output channel), int4 and
    int4_asym (groups of --group_size inputs: 32, 64 or 128; default 32), q8_0 / q4_0 / q4_1 (llama.cpp's GGUF
    blocks of 32), q4_k / q5_k / q6_k (llama.cpp's K-quant super-blocks of 256 inputs, with its scale search; every
    projection's input width must be a multiple of 256: SmolLM2's 576 is not, so for it use q4_0 here or
    `llmkit convert --to gguf --quant q4_k_m`, which falls back per tensor as llama.cpp does), nf4 (QLoRA's 4-bit
    NormalFloat, blocks of 64). gptq and awq are calibrated 4-bit: they run
    --n_sequences windows of a text (--calibration, default the built-in Tiny Shakespeare after the 2,048 tokens the
    perplexity check scores) through the model block by block, and write int4_asym with --group_size (default 128).
    GPTQ rounds each weight column and spreads the error over the columns not yet rounded; AWQ scales salient input
    channels up before rounding (docs/quantization.md).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of a float decoder (default: SmolLM2-135M-Instruct).
        scheme: weight format.
        group_size: weights per scale for int4, int4_asym (32, 64, 128) and nf4 (default 64).
        head: also quantize the LM head (a tied head gets a quantized copy; the embedding stays float).
        output: directory to write (default: ./quantized/<model>-<scheme>).
        overwrite: replace the files of an existing --output directory.
        perplexity_tokens: score this many tokens of Tiny Shakespeare with the float and the quantized model (0: skip).
        calibration: UTF-8 text the gptq / awq calibration windows come from (default: built-in Tiny Shakespeare).
        n_sequences: gptq / awq calibration windows of 512 tokens, or the model's context if shorter (default 128).
    """
    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.native import WEIGHTS_FILE
    from llmkit.commands.common import refuse_replacing_model_dir
    from llmkit.errors import LlmkitError
    from llmkit.quant import is_quantized_dir, load_quantized, save_quantized
    from llmkit.quant import quantize as quantize_model

    path = model_path(model)
    if is_quantized_dir(path):
        raise LlmkitError(f"--model {path} is already quantized; pass the float model it came from")
    if perplexity_tokens < 0:
        raise LlmkitError(f"--perplexity_tokens must be >= 0 (0 skips the check); got {perplexity_tokens}")
    if scheme not in CALIBRATED and (calibration is not None or n_sequences is not None):
        flag = "--calibration" if calibration is not None else "--n_sequences"
        raise LlmkitError(f"{flag} applies to --scheme gptq or awq (it calibrates them); drop it for --scheme {scheme}")
    if scheme in CALIBRATED and head:
        raise LlmkitError(f"--head is not calibrated by {scheme}; drop --head (or quantize with --scheme int4_asym)")
    if n_sequences is not None and n_sequences < 1:
        raise LlmkitError(f"--n_sequences must be >= 1; got {n_sequences}")
    if calibration is not None and not Path(calibration).is_file():
        raise LlmkitError(f"--calibration {calibration} is not a file; pass a UTF-8 text file")
    out_dir = Path(output) if output else Path(DEFAULT_OUTPUT) / f"{path.stem}-{scheme}"
    refuse_replacing_model_dir(out_dir, path, overwrite)
    llm, tokenizer = load_model(path, arch="decoder"), load_tokenizer(path)
    float_bytes = sum(p.numel() * p.element_size() for p in llm.parameters())
    before = _perplexity(llm, tokenizer, perplexity_tokens)
    if scheme in CALIBRATED:
        group_size = _calibrate(llm, tokenizer, scheme, group_size, calibration, n_sequences)
    else:
        quantize_model(llm, scheme, group_size, head=head)
    save_quantized(llm, out_dir, tokenizer)
    del llm
    file_bytes = (out_dir / WEIGHTS_FILE).stat().st_size
    written = f"{scheme}: int4_asym" if scheme in CALIBRATED else scheme
    print(f"wrote {out_dir} ({written}{f', group {group_size}' if group_size else ''})")
    print(f"  weights   float32 {float_bytes / 2**20:8.1f} MiB -> {scheme} {file_bytes / 2**20:8.1f} MiB "
          f"({float_bytes / file_bytes:.2f}x smaller; input file {path.stat().st_size / 2**20:.1f} MiB)"
          if path.is_file() else
          f"  weights   float32 {float_bytes / 2**20:8.1f} MiB -> {scheme} {file_bytes / 2**20:8.1f} MiB "
          f"({float_bytes / file_bytes:.2f}x smaller)")
    after = None
    if perplexity_tokens:
        after = _perplexity(load_quantized(out_dir), tokenizer, perplexity_tokens)
        print(f"  perplexity on {perplexity_tokens:,} tokens of Tiny Shakespeare: float32 {before:.3f} -> "
              f"{scheme} {after:.3f} ({100 * (after / before - 1):+.2f}%)")
    return {"output": str(out_dir), "scheme": scheme, "float_bytes": float_bytes, "file_bytes": file_bytes,
            "perplexity_float": before, "perplexity_quantized": after}


def _calibrate(llm, tokenizer, scheme: str, group_size: int | None, text: str | None,  # noqa: ANN001
               n_sequences: int | None) -> int:
    from llmkit.quant.calibration import DEFAULT_SEQ_LEN, DEFAULT_SEQUENCES, calibration_batches
    from llmkit.quant.gptq import DEFAULT_GROUP

    group_size = DEFAULT_GROUP if group_size is None else group_size
    ids = calibration_batches(tokenizer, text, n_sequences or DEFAULT_SEQUENCES,
                              min(DEFAULT_SEQ_LEN, llm.config.max_seq_len))
    if scheme == "gptq":
        from llmkit.quant.gptq import gptq

        gptq(llm, ids, group_size)
    else:
        from llmkit.quant.awq import awq

        awq(llm, ids, group_size)
    return group_size


def _perplexity(llm, tokenizer, n_tokens: int) -> float | None:  # noqa: ANN001
    if not n_tokens:
        return None
    from llmkit.data.sources import builtin_corpus_path
    from llmkit.eval.perplexity import file_perplexity

    return file_perplexity(llm, tokenizer, builtin_corpus_path(), max_tokens=n_tokens).perplexity
