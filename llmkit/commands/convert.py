"""`llmkit convert`: move a model between formats (GGUF, Hugging Face, llmkit), any family."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.commands.common import refuse_replacing_model_dir


def convert(
    model: str,
    output: str,
    to: Literal["native", "hf", "gguf"] = "native",
    overwrite: bool = False,
    quant: Literal["f32", "f16", "q8_0", "q4_0", "q4_1", "q4_k_m"] | None = None,
) -> None:
    """Convert a model between formats: GGUF or Hugging Face -> llmkit, llmkit/GGUF -> Hugging Face, or any
    llama-family decoder -> a GGUF file llama.cpp runs. Every family converts to and from Hugging Face: decoders,
    BERT encoders (with their head) and T5 encoder-decoders.

    Example: llmkit convert --model SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2/
             llmkit convert --model smollm2/ --output smollm2-hf/ --to hf
             llmkit convert --model my-bert/ --output my-bert-hf/ --to hf   # BertForMaskedLM etc., T5 alike
             llmkit convert --model smollm2/ --output smollm2.Q8_0.gguf --to gguf --quant q8_0
             llmkit convert --model smollm2/ --output smollm2.Q4_K_M.gguf --to gguf --quant q4_k_m

    OUTPUT must be a new or empty directory (another model's files are never replaced unless you pass --overwrite),
    and neither the input model nor a folder inside it.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory.
        output: output directory (created; files are written atomically), or the .gguf file with --to gguf.
        to: "native" (llmkit directory), "hf" (Hugging Face safetensors directory that transformers loads) or "gguf"
            (one file that llama.cpp runs).
        overwrite: replace the files of a directory that already holds some (files convert does not write are kept),
            or the --to gguf file.
        quant: with --to gguf, how matrices are stored: f32, f16 (default), q8_0, q4_0, q4_1 or q4_k_m (norms and
            biases stay f32; at q4_0/q4_1 the LM head is q8_0; q4_k_m is llama-quantize's mix: Q4_K, Q6_K for the
            head and some attn_v/ffn_down, Q5_0/Q8_0 for rows that are not whole 256-value super-blocks). --to gguf
            writes one file, OUTPUT.gguf.
    """
    if to == "gguf":
        _convert_to_gguf(model, output, quant or "f16", overwrite)
        return
    if quant is not None:
        from llmkit.errors import LlmkitError

        raise LlmkitError(f"--quant {quant} applies to --to gguf only; drop it, or pass --to gguf")
    from llmkit.checkpoints import build_model, load_tokenizer, load_weights, save_model
    from llmkit.checkpoints.hf import export_hf
    from llmkit.tokenizer import TOKENIZER_FILE

    refuse_replacing_model_dir(output, model, overwrite)
    config, state_dict = load_weights(model)
    has_tokenizer = Path(model).is_file() or (Path(model) / TOKENIZER_FILE).is_file()  # a GGUF file always has one
    tokenizer = load_tokenizer(model) if has_tokenizer else None
    network = build_model(config, state_dict, source=model)  # checks every tensor against the config before writing anything
    if to == "hf":
        export_hf(network, output, tokenizer=tokenizer)
    else:
        save_model(network, output, tokenizer=tokenizer)
    note = "" if has_tokenizer else f"; {model} has no {TOKENIZER_FILE}, so no tokenizer files were written"
    print(f"wrote {config.name} ({network.num_parameters():,} parameters) to {output} ({to} format){note}")


def _convert_to_gguf(model: str, output: str, quant: str, overwrite: bool) -> None:
    """`convert --to gguf`: one .gguf file, checked before the weights are read, written atomically."""
    from llmkit.checkpoints import build_model, load_config, load_tokenizer, load_weights
    from llmkit.checkpoints.gguf_export import export_gguf, gguf_architecture
    from llmkit.commands.common import refuse_existing_file
    from llmkit.errors import LlmkitError
    from llmkit.quant import pack_gguf

    if Path(output).suffix.lower() != ".gguf":
        raise LlmkitError(f"--output {output} must be a .gguf file name with --to gguf (e.g. model.{quant.upper()}.gguf)")
    if Path(output).resolve() == Path(model).resolve():
        raise LlmkitError(f"--output {output} is the same as --model; choose another output file")
    refuse_existing_file(output, overwrite)

    gguf_architecture(load_config(model))  # refuse an encoder or an unsupported family before reading weights
    config, state_dict = load_weights(model)
    network = build_model(config, state_dict, source=model)
    path = export_gguf(network, output, load_tokenizer(model), quant, pack=pack_gguf)
    print(f"wrote {config.name} ({network.num_parameters():,} parameters) to {path} (GGUF {quant}, "
          f"{path.stat().st_size / 1e6:,.1f} MB)")
