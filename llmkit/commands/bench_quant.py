"""`llmkit bench quant`: the quantization quality report. Every scheme quantizes the same float model; each result is
saved, loaded back (what a user runs) and measured against the float model on the same inputs:

- decoder: bits/weight, file size, weights' RAM, greedy decode tok/s, perplexity and its change, and llama.cpp's
  `llama-perplexity --kl-divergence` statistics (mean / p99 KLD, same top p, RMS dp; llmkit/eval/agreement.py);
- encoder (e.g. all-MiniLM-L6-v2): bits/weight, file size, RAM, texts/s, cosine of the sentence embeddings with the
  float model's and retrieval agreement (each text's nearest other text, as the float model finds it).

Bits/weight counts every packed byte of the quantized layers (codes, scales, zero points, super-block scales) over
their weights; the embedding, norms and (for a decoder) LM head stay float and are not in it, but are in file and RAM.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from llmkit.commands.common import model_path
from llmkit.commands.quantize import CALIBRATED, Scheme
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text

DEFAULT_SCHEMES: tuple[Scheme, ...] = ("int8", "int4", "q8_0", "q4_0", "q4_1", "nf4")  # a few minutes on 2 cores
FLOAT_ROW = "fp32"
TABLE_FILE = "quant_report.md"
JSON_FILE = "quant_report.json"
PLOT_FILE = "quant_report.png"
DECODE_PROMPT = "The history of the printing press begins in"  # fixed, so every row decodes the same way
WARMUP_TOKENS = 4
SST2_DEV = "sst2/dev.tsv"  # default texts of an encoder's report (shared data)
TEXT_SUFFIXES = (".txt", ".md", ".text")  # a --data that ends so but is no file is a typo, not text


def bench_quant(
    model: str | None = None,
    schemes: list[str] | None = None,
    group_size: int | None = None,
    data: str | None = None,
    max_tokens: int = 2048,
    decode_tokens: int = 32,
    threads: int | None = None,
    n_sequences: int = 8,
    n_texts: int = 256,
    output: str = "runs/bench_quant",
) -> dict[str, Any]:
    """Quantize one model with each scheme and compare every result with the float model: size, RAM, speed, quality.

    Example: llmkit bench quant                          (SmolLM2-135M-Instruct, 2,048 tokens of Tiny Shakespeare)
             llmkit bench quant --schemes "[int8, int4, gptq, awq]" --group_size 64
             llmkit bench quant --model all-MiniLM-L6-v2/  (an encoder: embedding cosine and retrieval agreement)

    Decoder rows (plus the fp32 reference): bits/weight of the quantized layers (packed bytes x 8 / weights, scales
    included), size of the saved checkpoint, RAM held by the weights, greedy decode tok/s (fixed prompt,
    DECODE_TOKENS tokens, the same threads for every row), perplexity of the first MAX_TOKENS tokens of --data and
    its change, and llama.cpp's --kl-divergence statistics against fp32 on the same windows: mean and 99th
    percentile KL(p_fp32 || p_quant), "same top p" (top-1 token agreement) and RMS dp (change in the probability of
    the text's next token). Encoder rows: texts/s, mean cosine of N_TEXTS sentence embeddings with fp32's and
    retrieval agreement (the nearest other text equals fp32's). Writes OUTPUT/quant_report.md, quant_report.json
    and quant_report.png (bits/weight against KLD or 1 - cosine, colour = speed). The default schemes take a few
    minutes on 2 CPU cores; gptq and awq calibrate block by block (about 13 minutes each for SmolLM2 on 2 cores),
    so they run only when named.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of a float decoder or encoder
            (default: SmolLM2-135M-Instruct).
        schemes: formats to compare, from int8, int4, int4_asym, q8_0, q4_0, q4_1, nf4, gptq, awq
            (default: int8, int4, q8_0, q4_0, q4_1, nf4).
        group_size: weights per scale for int4, int4_asym, nf4 (32, 64, 128) and gptq / awq (default: each
            scheme's own, 32 / 64 / 128); the other schemes fix their groups.
        data: a UTF-8 text file, or the text itself: the decoder's scored text (default: built-in Tiny Shakespeare)
            and gptq / awq's calibration text when a file; an encoder's texts, one per line (default: SST-2 dev).
        max_tokens: tokens of --data a decoder is scored on (its first ones).
        decode_tokens: greedy tokens timed per row (decoder).
        threads: CPU threads for every row (default: torch's current setting).
        n_sequences: gptq / awq calibration windows of 256 tokens, drawn after the text's first 2,048 tokens.
        n_texts: texts an encoder embeds (the first ones of --data).
        output: directory for the report files.
    """
    import torch

    from llmkit.checkpoints import load_config

    names = list(DEFAULT_SCHEMES if schemes is None else schemes)
    _check_options(names, max_tokens, decode_tokens, threads, n_sequences, n_texts)
    path = model_path(model)
    if not path.exists():
        raise LlmkitError(f"--model {path} does not exist; pass a .gguf file or a model directory")
    if threads is not None:
        torch.set_num_threads(threads)
    arch = load_config(path).arch
    setup = {"model": str(path), "arch": arch, "schemes": names, "group_size": group_size,
             "threads": torch.get_num_threads(), "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if arch == "encoder":
        bad = [name for name in names if name in CALIBRATED]
        if bad:
            raise LlmkitError(f"--schemes {bad[0]} calibrates a decoder block by block; {path} is an encoder: "
                              "drop gptq / awq from --schemes")
        texts, source = _texts(data, n_texts)
        setup.update({"texts": source, "n_texts": len(texts)})
        rows = encoder_rows(path, names, group_size, texts)
    elif arch == "decoder":
        text, source = _text(data)
        setup.update({"text": source, "max_tokens": max_tokens, "decode_tokens": decode_tokens,
                      "decode_prompt": DECODE_PROMPT, "calibration_sequences": n_sequences})
        calibration = Path(data) if data is not None and Path(data).is_file() else None
        rows = decoder_rows(path, names, group_size, text, max_tokens, decode_tokens, calibration, n_sequences)
    else:
        raise LlmkitError(f"--model {path} is a {arch} model; the quantization report measures decoders and encoders")
    write_report(Path(output), setup, rows)
    return {"setup": setup, "rows": rows}


def _check_options(names: list[str], max_tokens: int, decode_tokens: int, threads: int | None, n_sequences: int,
                   n_texts: int) -> None:
    from llmkit.quant.formats import FORMATS

    known = [*FORMATS, *CALIBRATED]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise LlmkitError(f"--schemes {unknown or names}: choose from {', '.join(known)}")
    if len(set(names)) != len(names):
        raise LlmkitError(f"--schemes {names} names a scheme twice; list each once")
    for flag, value, least in (("--max_tokens", max_tokens, 2), ("--decode_tokens", decode_tokens, 2),
                               ("--n_sequences", n_sequences, 1), ("--n_texts", n_texts, 2),
                               ("--threads", 1 if threads is None else threads, 1)):
        if value < least:
            raise LlmkitError(f"{flag} must be at least {least}; got {value}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LlmkitError(f"--data {path} is not UTF-8 text ({error}); convert it to UTF-8") from None


def _given_text(data: str) -> tuple[str, str]:
    """--data as (text, where it came from): a file's contents, or the string itself."""
    path = Path(data)
    if path.is_file():
        return _read(path), str(path)
    if path.suffix in TEXT_SUFFIXES or path.is_dir():
        raise LlmkitError(f"--data {data} is not a text file; pass the path of a UTF-8 text file, or the text itself")
    return data, "the --data text"


def _text(data: str | None) -> tuple[str, str]:
    from llmkit.data.sources import builtin_corpus_path

    if data is None:
        return _read(builtin_corpus_path()), "built-in Tiny Shakespeare"
    return _given_text(data)


def _texts(data: str | None, n_texts: int) -> tuple[list[str], str]:
    """An encoder's texts: --data's non-empty lines, or SST-2 dev's sentences; the first `n_texts`."""
    if data is None:
        import csv

        from llmkit.data.shared import shared_data_file

        with shared_data_file(SST2_DEV).open(encoding="utf-8", newline="") as file:
            rows = list(csv.DictReader(file, delimiter="\t", quoting=csv.QUOTE_NONE))
        texts, source = [row["sentence"].strip() for row in rows], f"SST-2 dev sentences ({SST2_DEV})"
    else:
        text, source = _given_text(data)
        texts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(texts) < 2:
        raise LlmkitError(f"--data has {len(texts)} non-empty line(s); retrieval agreement needs at least two texts")
    return texts[:n_texts], source


# ----------------------------------------------------------------------------- decoders


def decoder_rows(path: Path, names: list[str], group_size: int | None, text: str, max_tokens: int,
                 decode_tokens: int, calibration: Path | None, n_sequences: int) -> list[dict[str, Any]]:
    """The fp32 row, then one row per scheme (module docstring)."""
    import copy

    from tqdm.auto import tqdm

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.eval.agreement import compare_to_reference, score_text

    float_model, tokenizer = load_model(path, arch="decoder"), load_tokenizer(path)
    reference = score_text(float_model, tokenizer, text, max_tokens=max_tokens)
    prompt = tokenizer.encode(DECODE_PROMPT)
    rows = [{"scheme": FLOAT_ROW, "format": "float32", "group_size": None, "bits_per_weight": 32.0,
             "file_bytes": _saved_float_bytes(float_model), "weights_ram_bytes": weights_bytes(float_model),
             "decode_tok_s": decode_speed(float_model, prompt, decode_tokens), "perplexity": reference.perplexity,
             "perplexity_change_pct": 0.0, "n_positions": len(reference.targets), "quantize_s": 0.0}]
    calibration_ids = None
    bar = tqdm(names, desc="bench quant", unit="scheme")
    for name in bar:
        bar.set_postfix_str(name)
        if name in CALIBRATED and calibration_ids is None:
            calibration_ids = _calibration(tokenizer, calibration, n_sequences, float_model.config.max_seq_len)
        started = time.perf_counter()
        candidate, group = quantized(copy.deepcopy(float_model), name, group_size, calibration_ids)
        quantize_s = time.perf_counter() - started
        candidate, file_bytes = _round_trip(candidate)
        agreement, ppl = compare_to_reference(candidate, reference)
        rows.append({"scheme": name, "format": candidate_format(candidate), "group_size": group,
                     "bits_per_weight": bits_per_weight(candidate), "file_bytes": file_bytes,
                     "weights_ram_bytes": weights_bytes(candidate),
                     "decode_tok_s": decode_speed(candidate, prompt, decode_tokens), "perplexity": ppl,
                     "perplexity_change_pct": 100 * (ppl / reference.perplexity - 1), **agreement.to_dict(),
                     "quantize_s": quantize_s})
        del candidate
    bar.close()
    return rows


def quantized(model, name: str, group_size: int | None, calibration_ids):  # noqa: ANN001, ANN201
    """(model quantized with scheme `name` in place, the group size used); gptq / awq calibrate on the ids."""
    from llmkit.quant import quantize
    from llmkit.quant.formats import get_format
    from llmkit.quant.gptq import DEFAULT_GROUP

    if name in CALIBRATED:
        from llmkit.quant import awq, gptq

        group = DEFAULT_GROUP if group_size is None else group_size
        (gptq if name == "gptq" else awq)(model, calibration_ids, group)
        return model, group
    group = group_size if get_format(name).groups else None
    quantize(model, name, group)
    return model, next(iter(_layers(model).values())).group_size


def _calibration(tokenizer, text_path: Path | None, n_sequences: int, context: int):  # noqa: ANN001, ANN202
    from llmkit.quant.calibration import calibration_batches

    return calibration_batches(tokenizer, text_path, n_sequences, min(256, context))


def _layers(model) -> dict:  # noqa: ANN001
    from llmkit.quant.model import quantized_layers

    return quantized_layers(model)


def _round_trip(model):  # noqa: ANN001, ANN202
    """(the model saved as a quantized checkpoint and loaded back, as a user runs it; its weights file's bytes)."""
    import tempfile

    from llmkit.checkpoints.native import WEIGHTS_FILE
    from llmkit.quant import load_quantized, save_quantized

    with tempfile.TemporaryDirectory(prefix="llmkit-bench-quant-") as directory:
        save_quantized(model, directory)
        file_bytes = (Path(directory) / WEIGHTS_FILE).stat().st_size
        return load_quantized(directory), file_bytes


def _saved_float_bytes(model) -> int:  # noqa: ANN001
    import tempfile

    from llmkit.checkpoints import save_model
    from llmkit.checkpoints.native import WEIGHTS_FILE

    with tempfile.TemporaryDirectory(prefix="llmkit-bench-quant-") as directory:
        save_model(model, directory)
        return (Path(directory) / WEIGHTS_FILE).stat().st_size


def candidate_format(model) -> str:  # noqa: ANN001
    return next(iter(_layers(model).values())).scheme


def bits_per_weight(model) -> float:  # noqa: ANN001
    """Packed bytes x 8 / weights over the quantized layers (codes, scales and zero points all count)."""
    layers = _layers(model).values()
    return 8 * sum(layer.packed.nbytes for layer in layers) / sum(layer.out_features * layer.in_features
                                                                    for layer in layers)


def weights_bytes(model) -> int:  # noqa: ANN001
    """Bytes of the parameters and buffers (packed weights, scales, the kernels' copies), a shared tensor once."""
    from llmkit.commands.bench import weights_mb

    return round(weights_mb(model) * 2**20)


def decode_speed(model, prompt: list[int], n_tokens: int) -> float:  # noqa: ANN001
    """Greedy decode tokens/s after the prompt: (n - 1) steps between the first and the last new token, so the
    prefill is not counted; a short warm-up run first."""
    from llmkit.generate.decode import generate_tokens

    for _ in generate_tokens(model, prompt, WARMUP_TOKENS):
        pass
    stamps = [time.perf_counter() for _ in generate_tokens(model, prompt, n_tokens)]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


# ----------------------------------------------------------------------------- encoders


def encoder_rows(path: Path, names: list[str], group_size: int | None, texts: list[str]) -> list[dict[str, Any]]:
    """The fp32 row, then one row per scheme: the texts' embeddings against fp32's (module docstring)."""
    import copy

    from tqdm.auto import tqdm

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import sentence_settings
    from llmkit.eval.agreement import embedding_agreement

    float_model, tokenizer, settings = load_model(path, arch="encoder"), load_tokenizer(path), sentence_settings(path)
    reference, speed = embed_speed(float_model, tokenizer, texts, settings)
    rows = [{"scheme": FLOAT_ROW, "format": "float32", "group_size": None, "bits_per_weight": 32.0,
             "file_bytes": _saved_float_bytes(float_model), "weights_ram_bytes": weights_bytes(float_model),
             "texts_per_s": speed, **embedding_agreement(reference, reference).to_dict()}]
    bar = tqdm(names, desc="bench quant", unit="scheme")
    for name in bar:
        bar.set_postfix_str(name)
        candidate, group = quantized(copy.deepcopy(float_model), name, group_size, None)
        candidate, file_bytes = _round_trip(candidate)
        embeddings, speed = embed_speed(candidate, tokenizer, texts, settings)
        rows.append({"scheme": name, "format": candidate_format(candidate), "group_size": group,
                     "bits_per_weight": bits_per_weight(candidate), "file_bytes": file_bytes,
                     "weights_ram_bytes": weights_bytes(candidate), "texts_per_s": speed,
                     **embedding_agreement(reference, embeddings).to_dict()})
    bar.close()
    return rows


def embed_speed(model, tokenizer, texts: list[str], settings):  # noqa: ANN001, ANN201
    """(embeddings (N, C), texts/s of embedding them after a short warm-up)."""
    from llmkit.generate.embed import embed_texts

    embed_texts(model, tokenizer, texts[:WARMUP_TOKENS], settings)
    started = time.perf_counter()
    vectors = embed_texts(model, tokenizer, texts, settings)
    return vectors, len(texts) / (time.perf_counter() - started)


def encoder_table(rows: list[dict[str, Any]]) -> str:
    header = "| scheme | bits/weight | file MB | weights RAM MB | texts/s | mean cosine | min cosine | same nearest text |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        lines.append("| " + " | ".join([
            scheme_label(row), f"{row['bits_per_weight']:.3f}", f"{row['file_bytes'] / 1e6:.1f}",
            f"{row['weights_ram_bytes'] / 1e6:.1f}", f"{row['texts_per_s']:.0f}", f"{row['mean_cosine']:.5f}",
            f"{row['min_cosine']:.4f}", f"{100 * row['retrieval_agreement']:.1f}%"]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- report files


def write_report(output: Path, setup: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    output.mkdir(parents=True, exist_ok=True)
    table = encoder_table(rows) if setup["arch"] == "encoder" else decoder_table(rows)
    atomic_write_text(output / TABLE_FILE, _caption(setup) + "\n\n" + table + "\n")
    atomic_write_text(output / JSON_FILE, json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    plot_report(rows, setup, output / PLOT_FILE)
    print(table)
    print(f"wrote {output / TABLE_FILE}, {output / JSON_FILE} and {output / PLOT_FILE}")


def _caption(setup: dict[str, Any]) -> str:
    what = (f"{setup['n_texts']} texts of {setup['texts']}" if setup["arch"] == "encoder" else
            f"the first {setup['max_tokens']:,} tokens of {setup['text']}, greedy decode of {setup['decode_tokens']} "
            "tokens")
    threads = f"{setup['threads']} thread{'s' if setup['threads'] != 1 else ''}"
    return f"{Path(setup['model']).name}, {what}; {threads}, torch {setup['torch']}, {setup['date']}"


def scheme_label(row: dict[str, Any]) -> str:
    """"int4 g32", "gptq (int4_asym, g64)", "q8_0": the group size where --group_size chose it."""
    from llmkit.quant.formats import FORMATS

    if row["scheme"] in CALIBRATED:
        return f"{row['scheme']} ({row['format']}, g{row['group_size']})"
    chosen = row["scheme"] in FORMATS and FORMATS[row["scheme"]].groups
    return f"{row['scheme']} g{row['group_size']}" if chosen else row["scheme"]


def decoder_table(rows: list[dict[str, Any]]) -> str:
    header = ("| scheme | bits/weight | file MB | weights RAM MB | decode tok/s | perplexity | vs fp32 | mean KLD | "
              "p99 KLD | same top p | RMS dp |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        quant = row["scheme"] != FLOAT_ROW
        name = scheme_label(row)
        cells = [name, f"{row['bits_per_weight']:.3f}", f"{row['file_bytes'] / 1e6:.1f}",
                 f"{row['weights_ram_bytes'] / 1e6:.1f}", f"{row['decode_tok_s']:.1f}", f"{row['perplexity']:.3f}",
                 f"{row['perplexity_change_pct']:+.2f}%" if quant else "-",
                 f"{row['mean_kld']:.4g}" if quant else "-", f"{row['p99_kld']:.4g}" if quant else "-",
                 f"{100 * row['top1_agreement']:.2f}%" if quant else "-",
                 f"{100 * row['rms_delta_p']:.3g}%" if quant else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(rows: list[dict[str, Any]], setup: dict[str, Any], path: Path) -> None:
    """Bits/weight (x) against the loss of quality (y, log: mean KLD, or 1 - mean cosine), colour = speed."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    encoder = setup["arch"] == "encoder"
    points = [row for row in rows if row["scheme"] != FLOAT_ROW]
    y = [max(1 - row["mean_cosine"], 1e-9) if encoder else max(row["mean_kld"], 1e-9) for row in points]
    speed_key = "texts_per_s" if encoder else "decode_tok_s"
    figure, axis = plt.subplots(figsize=(7.5, 5))
    dots = axis.scatter([row["bits_per_weight"] for row in points], y, c=[row[speed_key] for row in points],
                        cmap="viridis", s=80, edgecolors="black")
    for row, value in zip(points, y):
        axis.annotate(row["scheme"], (row["bits_per_weight"], value), textcoords="offset points", xytext=(6, 4))
    float_speed = rows[0][speed_key]
    figure.colorbar(dots, label=f"{'texts' if encoder else 'decode tokens'}/s (fp32: {float_speed:.1f})")
    axis.set_yscale("log")
    axis.set_xlabel("bits per weight of the quantized layers (scales included)")
    axis.set_ylabel("1 - mean cosine vs fp32 embeddings" if encoder else "mean KL(p_fp32 || p_quant), nats")
    axis.set_title(textwrap.fill(_caption(setup), 110), fontsize=8)
    axis.grid(alpha=0.3, which="both")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=100, format="png"))
    plt.close(figure)
