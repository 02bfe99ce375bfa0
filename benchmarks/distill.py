"""Distillation, measured: teacher vs distilled student vs the same student trained without its teacher (same init,
same texts, same steps), for a decoder and an encoder. Writes docs/distill.json and docs/distill.png.

    python benchmarks/distill.py                       # both (the defaults are the run docs/compression.md reports)
    python benchmarks/distill.py --part decoder --student_init every_other      # DistilBERT's init instead
    python benchmarks/distill.py --part encoder --encoder_lrs 1e-3,3e-3 --encoder_distill_loss mse

Decoder: SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32) -> a student of its own blocks: by default the
--student_n_layers 20 of highest Block Influence (ShortGPT) on the first 16 training windows, as `llmkit distill
--student_layers block_influence` picks them. Every student trains on the same Wikipedia vital-article windows in the
same order from the same init: "scratch" with cross-entropy alone, each --distill_candidates T:alpha with
alpha * T^2 KL(teacher || student) + (1 - alpha) * CE. The candidate with the lowest perplexity on a validation
split (articles -400..-200) is the reported "distilled"; the test split (the last 200 articles) is never used to
choose. "gap closed" = (log ppl_scratch - log ppl_distilled) / (log ppl_scratch - log ppl_teacher) on the test split.

Encoder: all-MiniLM-L6-v2 -> its layers 0, 2, 4. Retrieval over held-out wiki_vital articles: each summary's first
sentence is a query, the rest of each summary is the corpus (recall@1, MRR@10; titles are not used: the first
sentence names the subject, the rest mostly says "he" or "it", so matching is by topic). The no-teacher baseline
trains the same student with sentence-transformers' own objective for this model family,
MultipleNegativesRankingLoss (in-batch softmax over 20 x cosine) on (first sentence, rest) pairs of the training
articles; the distilled student pulls its embeddings of the same texts to the teacher's (1 - cos, or MSE). Same
texts, same number of texts per step, same steps, and the same learning-rate grid (--encoder_lrs): each keeps its
best rate by validation MRR@10 (500 articles before the 1,000 test ones).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from llmkit.data.shared import shared_data_file
from llmkit.data.sources import read_documents
from llmkit.train.loop import train
from llmkit.train.settings import TrainSettings

WIKI = "wiki_vital/summaries_en.jsonl.gz"
OUT_JSON, OUT_PNG = Path("docs/distill.json"), Path("docs/distill.png")


def settings(steps: int, batch_size: int, lr: float) -> TrainSettings:
    return TrainSettings(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                         eval_every=0, log_every=max(1, steps // 5), checkpoint_every=10**6, weight_decay=0.0)


def decode_speed(model: torch.nn.Module, tokenizer, n_tokens: int = 32) -> float:  # noqa: ANN001
    from llmkit.generate import generate_tokens

    started = time.perf_counter()
    steps = list(generate_tokens(model.eval(), tokenizer.encode("The history of"), max_new_tokens=n_tokens))
    return len(steps) / (time.perf_counter() - started)


def candidates(text: str) -> list[tuple[float, float]]:
    """--distill_candidates "1:1,1:0.5" -> [(temperature, alpha), ...]."""
    return [(float(t), float(a)) for t, a in (item.split(":") for item in text.split(","))]


def decoder_layers(args: argparse.Namespace, teacher, training) -> list[int]:  # noqa: ANN001
    """The teacher layers the student keeps: every other, or the highest Block Influence on the first training
    windows (as `llmkit distill --student_layers block_influence` picks them)."""
    from llmkit.distill.data import window_batches
    from llmkit.distill.student import block_influence_layer_indices, every_other_layer_indices

    if args.student_init == "every_other":
        return every_other_layer_indices(teacher.config.n_layers)
    calibration = window_batches(training, args.seq_len, seed=0)(0, args.calibration_windows, 0, 1)["input_ids"]
    return block_influence_layer_indices(teacher, calibration, args.student_n_layers)


def decoder_study(args: argparse.Namespace, run_dir: Path) -> dict:
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.commands.common import load_decoder
    from llmkit.distill.data import (
        TokensInMemory,
        held_out_batches,
        held_out_perplexity,
        tokenize_documents,
        window_batches,
    )
    from llmkit.distill.objective import DecoderDistillation
    from llmkit.distill.settings import DistillSettings
    from llmkit.distill.student import student_from_layers
    from llmkit.train.objectives import causal_lm_loss

    path = default_model_path()
    tokenizer, teacher = load_tokenizer(path), load_decoder(path, weights="float")
    texts = list(read_documents([shared_data_file(WIKI)]))
    train_ids = tokenize_documents(tokenizer, texts[:3000], max_tokens=args.decoder_steps * args.batch_size * (
        args.seq_len + 1) + 1)
    window_tokens = args.held_out_windows * args.seq_len + 1
    validation_ids = tokenize_documents(tokenizer, texts[-400:-200], max_tokens=window_tokens)  # picks the loss
    test_ids = tokenize_documents(tokenizer, texts[-200:], max_tokens=window_tokens)  # reported
    training = TokensInMemory(train_ids, "train")
    validation = held_out_batches(TokensInMemory(validation_ids, "validation"), args.seq_len, 4)
    test = held_out_batches(TokensInMemory(test_ids, "test"), args.seq_len, 4)
    layers = decoder_layers(args, teacher, training)
    result = {"teacher_parameters": teacher.num_parameters(), "student_init": args.student_init, "layers": layers,
              "steps": args.decoder_steps, "lr": args.decoder_lr,
              "tokens": args.decoder_steps * args.batch_size * args.seq_len, "seq_len": args.seq_len,
              "held_out_tokens": len(test_ids) - 1, "validation_tokens": len(validation_ids) - 1,
              "teacher_ppl": held_out_perplexity(teacher, test), "teacher_val_ppl": held_out_perplexity(teacher, validation)}
    runs = [("scratch", None)] + [(f"kl_T{t:g}_alpha{a:g}", (t, a)) for t, a in candidates(args.distill_candidates)]
    curves, scores = {}, {}
    for name, setting in runs:
        student = student_from_layers(teacher, layers)
        result.setdefault("student_parameters", student.num_parameters())
        result.setdefault("init_ppl", held_out_perplexity(student, test))
        if setting is None:
            objective = causal_lm_loss
        else:
            objective = DecoderDistillation(teacher, DistillSettings(loss="kl", temperature=setting[0], alpha=setting[1]))
        started = time.perf_counter()
        run = train(student, objective, window_batches(training, args.seq_len, seed=0),
                    settings(args.decoder_steps, args.batch_size, args.decoder_lr), run_dir / f"decoder-{name}")
        scores[name] = {"seconds": time.perf_counter() - started, "val_ppl": held_out_perplexity(student, validation),
                        "ppl": held_out_perplexity(student, test)}
        if setting is not None:
            scores[name].update(temperature=setting[0], alpha=setting[1])
        curves[name] = run.losses
        print(f"decoder {name}: {scores[name]}", flush=True)
    distilled = min((name for name, _ in runs[1:]), key=lambda name: scores[name]["val_ppl"])  # by validation only
    result.update(runs=scores, selected=distilled, scratch_ppl=scores["scratch"]["ppl"],
                  distilled_ppl=scores[distilled]["ppl"])
    result["student_decode_tok_s"] = decode_speed(student, tokenizer)
    result["teacher_decode_tok_s"] = decode_speed(teacher, tokenizer)
    log = {name: math.log(result[f"{name}_ppl"]) for name in ("teacher", "scratch", "distilled")}
    result["gap_closed"] = (log["scratch"] - log["distilled"]) / (log["scratch"] - log["teacher"])
    result["curves"] = curves
    return result


def mnrl_loss(scale: float = 20.0):  # noqa: ANN201
    """MultipleNegativesRankingLoss: rows 2i / 2i+1 of a batch are (query, document); each query must pick its own
    document among the batch's documents (softmax over scale x cosine). One label per pair."""
    import torch.nn.functional as F

    from llmkit.models.encoder import mean_pool
    from llmkit.train.objectives import TokenLoss, label_tokens

    def objective(model, batch):  # noqa: ANN001, ANN202
        mask = batch["attention_mask"]
        vectors = F.normalize(mean_pool(model(batch["input_ids"], mask), mask), dim=-1)  # (2P, C)
        queries, documents = vectors[0::2], vectors[1::2]  # (P, C) each
        scores = scale * queries @ documents.T  # (P, P)
        total = F.cross_entropy(scores, torch.arange(len(queries)), reduction="sum")
        return TokenLoss(total, label_tokens(batch))

    return objective


def pair_batches(queries: list[list[int]], documents: list[list[int]], pad_id: int, seed: int):  # noqa: ANN201
    """Batches of batch_size / 2 (query, document) pairs, interleaved; labels count pairs."""
    from llmkit.distill.encoder import padded

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> dict:
        pairs = batch_size // 2
        order = torch.randperm(len(queries), generator=torch.Generator().manual_seed(seed + position // 2 // len(queries)))
        picked = [int(order[(position // 2 + k) % len(queries)]) for k in range(pairs)]
        rows = [row for index in picked for row in (queries[index], documents[index])]
        ids, mask = padded(rows, pad_id)
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(pairs, 1, dtype=torch.long)}

    return batches


def retrieval(model, tokenizer, queries_text: list[str], documents: list[str], sentence) -> dict:  # noqa: ANN001
    from llmkit.generate.embed import embed_texts

    queries = embed_texts(model, tokenizer, queries_text, sentence)
    corpus = embed_texts(model, tokenizer, documents, sentence)
    scores = torch.nn.functional.normalize(queries, dim=-1) @ torch.nn.functional.normalize(corpus, dim=-1).T
    rank = (scores > scores.diagonal()[:, None]).sum(dim=1)  # 0 = its own summary first
    return {"recall_at_1": float((rank == 0).float().mean()),
            "mrr_at_10": float(torch.where(rank < 10, 1.0 / (rank + 1), 0.0).mean())}


def first_sentence_and_rest(article: dict) -> tuple[str, str] | None:
    """(first sentence, the rest) of an article's summary, or None when it has a single sentence."""
    import re

    match = re.search(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])", article["text"][20:])
    if match is None:
        return None
    cut = 20 + match.start()
    rest = article["text"][cut:].strip()
    return (article["text"][:cut].strip(), rest) if len(rest) > 40 else None


def encoder_study(args: argparse.Namespace, run_dir: Path) -> dict:
    """Both students get the same learning-rate grid (--encoder_lrs); each keeps the rate with the best validation
    MRR@10 (articles held out before the test articles), and the test articles are scored once per run."""
    import gzip
    import json as json_lib
    from dataclasses import replace

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.checkpoints.hf_bert import default_encoder_path, sentence_settings
    from llmkit.distill.encoder import SentenceDistillation, sentence_batches
    from llmkit.distill.student import every_other_layer_indices, student_from_layers
    from llmkit.generate.embed import embed_texts, encode_for_encoder

    path = default_encoder_path()
    tokenizer, teacher = load_tokenizer(path), load_model(path, arch="encoder")
    sentence = replace(sentence_settings(path), max_tokens=args.encoder_max_tokens)
    with gzip.open(shared_data_file(WIKI), "rt", encoding="utf-8") as file:
        articles = [json_lib.loads(line) for line in file]
    pairs = [pair for pair in map(first_sentence_and_rest, articles) if pair is not None]
    n_train = args.encoder_steps * args.encoder_batch_size // 2
    held = args.held_out_articles
    training, test = pairs[:n_train], pairs[-held:]
    validation = pairs[-held - args.validation_articles:-held]
    if n_train > len(pairs) - held - args.validation_articles:
        raise SystemExit(f"{n_train} training articles overlap the validation/test ones: fewer --encoder_steps")
    train_queries, train_documents = [query for query, _ in training], [rest for _, rest in training]

    def scored(model, split) -> dict:  # noqa: ANN001
        return retrieval(model, tokenizer, [q for q, _ in split], [d for _, d in split], sentence)

    layers = every_other_layer_indices(teacher.config.n_layers)
    result = {"teacher_parameters": teacher.num_parameters(), "layers": layers, "steps": args.encoder_steps,
              "batch_sentences": args.encoder_batch_size, "training_articles": n_train,
              "validation_articles": len(validation), "held_out_articles": len(test),
              "max_tokens": args.encoder_max_tokens, "distill_loss": args.encoder_distill_loss,
              "teacher": scored(teacher, test), "init": scored(student_from_layers(teacher, layers), test)}
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    query_rows = encode_for_encoder(tokenizer, train_queries, args.encoder_max_tokens)
    document_rows = encode_for_encoder(tokenizer, train_documents, args.encoder_max_tokens)
    targets = embed_texts(teacher, tokenizer, train_queries + train_documents, sentence)  # the teacher once
    curves, runs = {}, {}
    for name in ("scratch", "distilled"):
        for lr in (float(value) for value in args.encoder_lrs.split(",")):
            student = student_from_layers(teacher, layers)
            result.setdefault("student_parameters", student.num_parameters())
            if name == "scratch":
                objective, batches = mnrl_loss(), pair_batches(query_rows, document_rows, pad_id, seed=0)
            else:
                objective = SentenceDistillation(None, sentence, args.encoder_distill_loss)
                batches = sentence_batches(query_rows + document_rows, pad_id, seed=0, teacher_embeddings=targets)
            started = time.perf_counter()
            run = train(student, objective, batches, settings(args.encoder_steps, args.encoder_batch_size, lr),
                        run_dir / f"encoder-{name}-{lr:g}")
            key = f"{name}_lr{lr:g}"
            runs[key] = {"lr": lr, "seconds": time.perf_counter() - started, "validation": scored(student, validation),
                         "test": scored(student, test)}
            curves[key] = run.losses
            print(f"encoder {key}: {runs[key]}", flush=True)
        best = max((key for key in runs if key.startswith(name)), key=lambda key: runs[key]["validation"]["mrr_at_10"])
        result[name], result[f"{name}_lr"] = runs[best]["test"], runs[best]["lr"]
    result["runs"] = runs
    for metric in ("recall_at_1", "mrr_at_10"):
        gap = result["teacher"][metric] - result["scratch"][metric]
        result[f"gap_closed_{metric}"] = (result["distilled"][metric] - result["scratch"][metric]) / gap if gap else None
    result["curves"] = curves
    return result


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    studies = [name for name in ("decoder", "encoder") if name in results]
    figure, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4), squeeze=False)
    for axis, study in zip(axes[0], studies, strict=True):
        result = results[study]
        if study == "decoder":
            names = ["teacher", "init", "scratch", "distilled"]
            values = [result[f"{name}_ppl"] for name in names]
            axis.bar(names, values, color=["gray", "lightgray", "tab:orange", "tab:blue"])
            axis.set_yscale("log")
            axis.set_ylabel("held-out perplexity (log scale)")
            axis.set_title(f"SmolLM2-135M -> {len(result['layers'])} layers ({result['student_init']}), "
                           f"{result['tokens']:,} tokens")
        else:
            names = ["teacher", "init", "scratch", "distilled"]
            values = [result[name]["mrr_at_10"] for name in names]
            axis.bar(names, values, color=["gray", "lightgray", "tab:orange", "tab:blue"])
            axis.set_ylabel(f"MRR@10, first sentence -> rest ({result['held_out_articles']} articles)")
            axis.set_title(f"all-MiniLM-L6-v2 -> {len(result['layers'])} layers, {result['steps']} steps")
        for index, value in enumerate(values):
            axis.annotate(f"{value:.3g}", (index, value), ha="center", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def save(path: Path, key: str, value: dict) -> dict:
    """Re-read the results file and set one key: the decoder and encoder parts may run as two processes."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results[key] = value
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["decoder", "encoder", "both"], default="both")
    parser.add_argument("--student_init", choices=["every_other", "block_influence"], default="block_influence")
    parser.add_argument("--student_n_layers", type=int, default=20, help="block_influence: teacher blocks kept")
    parser.add_argument("--calibration_windows", type=int, default=16, help="block_influence: windows scored")
    parser.add_argument("--decoder_steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--decoder_lr", type=float, default=1e-4)
    parser.add_argument("--distill_candidates", default="1:1,1:0.5",
                        help="temperature:alpha pairs; the one with the best validation perplexity is reported")
    parser.add_argument("--held_out_windows", type=int, default=32)
    parser.add_argument("--encoder_steps", type=int, default=200)
    parser.add_argument("--encoder_batch_size", type=int, default=32)
    parser.add_argument("--encoder_lrs", default="3e-4,1e-3", help="the grid both encoder students are tuned on")
    parser.add_argument("--encoder_distill_loss", choices=["cosine", "mse"], default="cosine")
    parser.add_argument("--encoder_max_tokens", type=int, default=64)
    parser.add_argument("--held_out_articles", type=int, default=1000)
    parser.add_argument("--validation_articles", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the 2-core VM is shared)")
    parser.add_argument("--run_dir", default="runs/bench-distill")
    parser.add_argument("--output", default=str(OUT_JSON))
    parser.add_argument("--plot", default=str(OUT_PNG))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    output, run_dir = Path(args.output), Path(args.run_dir)
    for part, study in (("decoder", decoder_study), ("encoder", encoder_study)):
        if args.part not in (part, "both"):
            continue
        machine = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
                   "load": os.getloadavg(), "platform": platform.platform(), "torch": torch.__version__,
                   "command": " ".join(sys.argv[1:])}
        result = study(args, run_dir)
        save(output, f"{part}_machine", {**machine, "load_after": os.getloadavg()})
        results = save(output, part, result)
    plot(results, Path(args.plot))
    summary = {study: {k: v for k, v in results[study].items() if k != "curves"} for study in ("decoder", "encoder")
               if study in results}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
