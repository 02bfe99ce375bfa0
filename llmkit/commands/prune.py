"""`llmkit prune`: zero the least important weights (stored dense) or remove whole heads / neurons / blocks."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.commands.common import model_path

Method = Literal["magnitude", "wanda", "sparsegpt"]
Structure = Literal["heads", "neurons", "layers"]
DEFAULT_OUTPUT = "pruned"  # without --output: ./pruned/<model name>-<what>
DEFAULT_SPARSITY = 0.5
DEMO_TOKENS = 2048  # perplexity before/after on the first tokens of the built-in Tiny Shakespeare
REPORT_FILE = "prune_report.json"
PLOT_FILE = "prune_report.png"


def prune(
    model: str | None = None,
    method: Method = "wanda",
    sparsity: float | None = None,
    pattern: str | None = None,
    scope: Literal["layer", "global"] = "layer",
    structured: Structure | None = None,
    amount: float | None = None,
    importance: Literal["activation", "magnitude"] = "activation",
    data: str | None = None,
    n_sequences: int = 32,
    seq_len: int = 256,
    output: str | None = None,
    overwrite: bool = False,
    perplexity_tokens: int = DEMO_TOKENS,
) -> dict:
    """Prune a decoder and save it as an llmkit checkpoint, with a report (JSON + PNG) in the output directory.

    Example: llmkit prune                       (demo: SmolLM2-135M, Wanda 50% on built-in text, perplexity before/after)
             llmkit prune --model my_model/ --method sparsegpt --pattern 2:4 --data calib.txt --output my_model_24/
             llmkit prune --model my_model/ --method magnitude --sparsity 0.6 --scope global
             llmkit prune --model my_model/ --structured neurons --amount 0.25 --data calib.txt

    Unstructured (--sparsity, a fraction, or --pattern N:M, keep N of every M weights): --method magnitude (|W|),
    wanda (|W| * input norm, per output row) or sparsegpt (Optimal Brain Surgeon: the kept weights absorb the pruned
    ones' error). Pruned weights are zeros in dense matrices: the file is as large and runs no faster on a CPU (2:4
    runs faster only on NVIDIA sparse tensor cores). --structured heads|neurons|layers removes --amount (a fraction) of
    the query heads of each key/value group, of each layer's MLP neurons, or of the blocks: smaller matrices, a smaller
    config, faster everywhere. Only the blocks' q/k/v/o and gate/up/down projections are pruned; embeddings and the LM
    head stay dense. wanda, sparsegpt and activation importance run --n_sequences windows of --seq_len tokens of --data
    through the model (without --model: the built-in Tiny Shakespeare after the tokens the perplexity check scores).
    Masks survive fine-tuning in Python with llmkit.quant.prune.MaskKeeper (docs/compression.md).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of a float decoder (default: SmolLM2-135M-Instruct).
        method: unstructured scoring: magnitude, wanda or sparsegpt.
        sparsity: fraction of each layer's weights to zero (default 0.5 when no --pattern or --structured).
        pattern: N:M semi-structured sparsity, e.g. 2:4 or 4:8.
        scope: layer (each matrix pruned to --sparsity) or global (magnitude only: one threshold over all layers).
        structured: remove heads, neurons or layers instead of zeroing weights.
        amount: fraction of heads (per key/value group), neurons (per layer) or layers to remove.
        importance: structured scores: activation (weights x calibration input norms; layers: block influence) or
            magnitude (weights only, no data; not for layers).
        data: UTF-8 calibration text (needed by wanda, sparsegpt and activation importance when --model is given).
        n_sequences: calibration windows.
        seq_len: tokens per calibration window (at most the model's context).
        output: directory to write (default: ./pruned/<model>-<what>).
        overwrite: replace the files of an existing --output directory.
        perplexity_tokens: score this many tokens of Tiny Shakespeare before and after (0: skip).
    """
    sparsity, needs_data = _check_flags(model is None, method, sparsity, pattern, scope, structured, amount,
                                        importance, data, n_sequences, seq_len, perplexity_tokens)
    path = model_path(model)
    what = (f"{structured}-{amount:g}" if structured else
            f"{method}-{pattern.replace(':', 'of')}" if pattern else f"{method}-{round(100 * sparsity)}")
    out_dir = Path(output) if output else Path(DEFAULT_OUTPUT) / f"{path.stem}-{what}"
    return _run(path, out_dir, overwrite, method, sparsity, pattern, scope, structured, amount, importance,
                data, needs_data, n_sequences, seq_len, perplexity_tokens, what)


def _check_flags(demo: bool, method: str, sparsity: float | None, pattern: str | None, scope: str,
                 structured: str | None, amount: float | None, importance: str, data: str | None, n_sequences: int,
                 seq_len: int, perplexity_tokens: int) -> tuple[float | None, bool]:
    """Refuse contradicting or out-of-range flags before loading anything; returns (sparsity with its default,
    whether calibration data is needed)."""
    from llmkit.errors import LlmkitError
    from llmkit.quant.prune import CALIBRATED_METHODS, check_sparsity, parse_pattern

    if structured is not None:
        if sparsity is not None or pattern is not None:
            raise LlmkitError("--structured removes whole parts by --amount; drop --sparsity / --pattern (they zero "
                              "single weights)")
        if amount is None:
            raise LlmkitError(f"--structured {structured} needs --amount, the fraction to remove (e.g. 0.25)")
        if not 0 < amount < 1:
            raise LlmkitError(f"--amount {amount} is not a fraction; pass a number between 0 and 1")
        needs_data = importance == "activation" or structured == "layers"
        if structured == "layers" and importance == "magnitude":
            raise LlmkitError("--structured layers scores blocks on calibration text; drop --importance magnitude")
    else:
        if amount is not None:
            raise LlmkitError("--amount applies to --structured; for single weights pass --sparsity or --pattern")
        if sparsity is not None and pattern is not None:
            raise LlmkitError("pass one of --sparsity and --pattern, not both")
        if pattern is not None:
            parse_pattern(pattern)
        else:
            sparsity = check_sparsity(DEFAULT_SPARSITY if sparsity is None else sparsity)
        needs_data = method in CALIBRATED_METHODS
        if scope == "global" and (method != "magnitude" or pattern is not None):
            raise LlmkitError("--scope global ranks weights across layers by magnitude: use it with --method magnitude "
                              "and --sparsity")
    if needs_data and data is None and not demo:
        what = f"--structured {structured}" if structured else f"--method {method}"
        raise LlmkitError(f"{what} scores weights by their inputs: pass calibration text with --data FILE"
                          + ("" if structured else " (or --method magnitude)"))
    if data is not None and not Path(data).is_file():
        raise LlmkitError(f"--data {data} is not a file; pass a UTF-8 text file")
    if n_sequences < 1 or seq_len < 2:
        raise LlmkitError(f"--n_sequences must be >= 1 and --seq_len >= 2; got {n_sequences} and {seq_len}")
    if perplexity_tokens < 0:
        raise LlmkitError(f"--perplexity_tokens must be >= 0 (0 skips the check); got {perplexity_tokens}")
    return sparsity, needs_data


def _run(path: Path, out_dir: Path, overwrite: bool, method: str, sparsity: float | None, pattern: str | None,
         scope: str, structured: str | None, amount: float | None, importance: str, data: str | None,
         needs_data: bool, n_sequences: int, seq_len: int, perplexity_tokens: int, what: str) -> dict:
    import time

    from llmkit.checkpoints import load_model, load_tokenizer, save_model
    from llmkit.checkpoints.native import WEIGHTS_FILE
    from llmkit.commands.common import refuse_replacing_model_dir
    from llmkit.errors import LlmkitError
    from llmkit.io import atomic_write_text
    from llmkit.quant import is_quantized_dir
    from llmkit.quant.calibration import calibration_batches
    from llmkit.quant.prune import layer_sparsity
    from llmkit.quant.prune import prune as prune_model
    from llmkit.quant.prune_structured import parameter_count, prune_structured

    if is_quantized_dir(path):
        raise LlmkitError(f"--model {path} is quantized; prune the float model it came from")
    refuse_replacing_model_dir(out_dir, path, overwrite)
    print(f"loading {path}", flush=True)
    llm, tokenizer = load_model(path, arch="decoder"), load_tokenizer(path)
    parameters_before = parameter_count(llm)
    before = _perplexity(llm, tokenizer, perplexity_tokens)
    ids = None
    if needs_data:
        ids = calibration_batches(tokenizer, data, n_sequences, min(seq_len, llm.config.max_seq_len))
        print(f"calibration: {ids.shape[0]} windows x {ids.shape[1]} tokens of "
              f"{data or 'the built-in Tiny Shakespeare'}", flush=True)
    started = time.perf_counter()
    if structured:
        llm = prune_structured(llm, structured, amount, ids, importance)
    else:
        prune_model(llm, method, sparsity, pattern, ids, scope)
    seconds = time.perf_counter() - started
    save_model(llm, out_dir, tokenizer)
    parameters_after = parameter_count(llm)
    after = _perplexity(llm, tokenizer, perplexity_tokens)
    report = {
        "model": str(path), "output": str(out_dir), "pruning": what, "method": None if structured else method,
        "sparsity": sparsity, "pattern": pattern, "scope": None if structured else scope, "structured": structured,
        "amount": amount, "importance": importance if structured else None,
        "calibration": None if ids is None else {"text": data or "built-in Tiny Shakespeare",
                                                 "sequences": ids.shape[0], "tokens": ids.numel()},
        "seconds": round(seconds, 2),
        "parameters": {"before": parameters_before[0], "after": parameters_after[0],
                       "nonzero_before": parameters_before[1], "nonzero_after": parameters_after[1]},
        "config": {"n_layers": llm.config.n_layers, "n_heads": llm.config.n_heads, "d_ff": llm.config.d_ff},
        "file_bytes": (out_dir / WEIGHTS_FILE).stat().st_size,
        "perplexity": {"tokens": perplexity_tokens, "text": "built-in Tiny Shakespeare", "before": before,
                       "after": after},
        "layer_sparsity": layer_sparsity(llm),
    }
    import json

    atomic_write_text(out_dir / REPORT_FILE, json.dumps(report, indent=1) + "\n")
    plot_report(report, out_dir / PLOT_FILE)
    _print_report(report)
    return report


def _perplexity(llm, tokenizer, n_tokens: int) -> float | None:  # noqa: ANN001
    if not n_tokens:
        return None
    from llmkit.data.sources import builtin_corpus_path
    from llmkit.eval.perplexity import perplexity

    # Tokenizing all 1.1 MB to keep n_tokens takes seconds; a prefix of 16 characters per token holds them with room
    # (any tokenizer here averages under 5), so the kept ids are those of the whole text.
    text = builtin_corpus_path().read_text(encoding="utf-8")[: 16 * n_tokens]
    return perplexity(llm, tokenizer, text, max_tokens=n_tokens).perplexity


def _print_report(report: dict) -> None:
    parameters = report["parameters"]
    print(f"wrote {report['output']} ({report['pruning']}) in {report['seconds']:.1f} s of pruning")
    print(f"  parameters {parameters['before']:,} -> {parameters['after']:,}; non-zero {parameters['nonzero_before']:,}"
          f" -> {parameters['nonzero_after']:,}; weights file {report['file_bytes'] / 2**20:.1f} MiB")
    values = list(report["layer_sparsity"].values())
    print(f"  sparsity of the pruned linears: mean {sum(values) / len(values):.3f}, min {min(values):.3f}, "
          f"max {max(values):.3f} (per layer in {REPORT_FILE})")
    ppl = report["perplexity"]
    if ppl["before"] is not None:
        print(f"  perplexity on {ppl['tokens']:,} tokens of Tiny Shakespeare: {ppl['before']:.3f} -> {ppl['after']:.3f}"
              f" ({100 * (ppl['after'] / ppl['before'] - 1):+.1f}%)")


def plot_report(report: dict, path: Path) -> Path:
    """Sparsity of every pruned linear (left) and parameters and perplexity before/after (right), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit.io import atomic_write

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 1]})
    names = list(report["layer_sparsity"])
    left.bar(range(len(names)), list(report["layer_sparsity"].values()), width=1.0)
    left.set_xlabel("pruned linear (q, k, v, o, gate, up, down of each block, in order)")
    left.set_ylabel("fraction of zero weights")
    left.set_ylim(0, 1)
    left.set_title(f"{Path(report['model']).name}: {report['pruning']}")
    parameters, ppl = report["parameters"], report["perplexity"]
    labels = ["before", "after"]
    right.bar(labels, [parameters["nonzero_before"] / 1e6, parameters["nonzero_after"] / 1e6], color="tab:gray")
    right.set_ylabel("non-zero parameters (M)")
    if ppl["before"] is not None:
        twin = right.twinx()
        twin.plot(labels, [ppl["before"], ppl["after"]], "o-", color="tab:red")
        twin.set_ylabel("perplexity (Tiny Shakespeare)", color="tab:red")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
    return path
