"""Distillation, measured: teacher vs distilled student vs the same student trained without its teacher (same init,
same texts, same steps), for a decoder and an encoder. Writes docs/distill.json and docs/distill.png.

    python benchmarks/distill.py                       # both, CPU (minutes on 2 cores)
    python benchmarks/distill.py --part encoder --encoder_steps 100

Decoder: SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32) -> its 15 even-numbered layers (DistilBERT's init).
Both students train on the same Wikipedia vital-article windows in the same order: "scratch" with cross-entropy
alone, "distilled" with alpha * T^2 KL(teacher || student) + (1 - alpha) * CE (the verb's defaults). Held-out
perplexity on the last articles; "gap closed" = (log ppl_scratch - log ppl_distilled) / (log ppl_scratch -
log ppl_teacher).

Encoder: all-MiniLM-L6-v2 -> its layers 0, 2, 4. Retrieval over held-out wiki_vital articles: each summary's first
sentence is a query, the rest of each summary is the corpus (recall@1, MRR@10; titles are not used: the first
sentence names the subject, the rest mostly says "he" or "it", so matching is by topic). The no-teacher baseline
trains the same student with sentence-transformers' own objective for this model family,
MultipleNegativesRankingLoss (in-batch softmax over 20 x cosine) on (first sentence, rest) pairs of the training
articles; the distilled student pulls its embeddings of the same texts to the teacher's (1 - cos). Same texts,
same number of texts per step.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
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
    from llmkit.distill.student import every_other_layer_indices, student_from_layers
    from llmkit.train.objectives import causal_lm_loss

    path = default_model_path()
    tokenizer, teacher = load_tokenizer(path), load_decoder(path, weights="float")
    texts = list(read_documents([shared_data_file(WIKI)]))
    train_ids = tokenize_documents(tokenizer, texts[:3000], max_tokens=args.decoder_steps * args.batch_size * (
        args.seq_len + 1) + 1)
    held_ids = tokenize_documents(tokenizer, texts[-200:], max_tokens=args.held_out_windows * args.seq_len + 1)
    training, held_out = TokensInMemory(train_ids, "train"), TokensInMemory(held_ids, "held-out")
    evals = held_out_batches(held_out, args.seq_len, 4)
    layers = every_other_layer_indices(teacher.config.n_layers)
    result = {"teacher_parameters": teacher.num_parameters(), "layers": layers, "steps": args.decoder_steps,
              "tokens": args.decoder_steps * args.batch_size * args.seq_len, "seq_len": args.seq_len,
              "held_out_tokens": len(held_ids) - 1, "teacher_ppl": held_out_perplexity(teacher, evals)}
    distill_settings = DistillSettings(loss="kl", temperature=args.temperature, alpha=args.alpha)
    result["loss"] = {"loss": "kl", "temperature": args.temperature, "alpha": args.alpha}
    curves = {}
    for name in ("scratch", "distilled"):
        student = student_from_layers(teacher, layers)
        result.setdefault("student_parameters", student.num_parameters())
        result.setdefault("init_ppl", held_out_perplexity(student, evals))
        objective = causal_lm_loss if name == "scratch" else DecoderDistillation(teacher, distill_settings)
        started = time.perf_counter()
        run = train(student, objective, window_batches(training, args.seq_len, seed=0),
                    settings(args.decoder_steps, args.batch_size, args.decoder_lr), run_dir / f"decoder-{name}")
        result[f"{name}_seconds"] = time.perf_counter() - started
        result[f"{name}_ppl"] = held_out_perplexity(student, evals)
        curves[name] = run.losses
        if name == "distilled":
            result["student_decode_tok_s"] = decode_speed(student, tokenizer)
        print(f"decoder {name}: held-out perplexity {result[f'{name}_ppl']:.2f}", flush=True)
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
    import gzip

    with gzip.open(shared_data_file(WIKI), "rt", encoding="utf-8") as file:
        articles = [json_lib.loads(line) for line in file]
    pairs = [pair for pair in map(first_sentence_and_rest, articles) if pair is not None]
    n_train = args.encoder_steps * args.encoder_batch_size // 2
    training, held_out = pairs[:n_train], pairs[-args.held_out_articles:]
    train_queries, train_documents = [query for query, _ in training], [rest for _, rest in training]
    held_queries, held_documents = [query for query, _ in held_out], [rest for _, rest in held_out]
    layers = every_other_layer_indices(teacher.config.n_layers)
    result = {"teacher_parameters": teacher.num_parameters(), "layers": layers, "steps": args.encoder_steps,
              "batch_sentences": args.encoder_batch_size, "training_articles": n_train,
              "held_out_articles": len(held_out), "max_tokens": args.encoder_max_tokens,
              "teacher": retrieval(teacher, tokenizer, held_queries, held_documents, sentence)}
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    query_rows = encode_for_encoder(tokenizer, train_queries, args.encoder_max_tokens)
    document_rows = encode_for_encoder(tokenizer, train_documents, args.encoder_max_tokens)
    curves = {}
    for name in ("init", "scratch", "distilled"):
        student = student_from_layers(teacher, layers)
        result.setdefault("student_parameters", student.num_parameters())
        if name != "init":
            if name == "scratch":
                objective, batches = mnrl_loss(), pair_batches(query_rows, document_rows, pad_id, seed=0)
            else:
                texts = train_queries + train_documents
                targets = embed_texts(teacher, tokenizer, texts, sentence)  # the teacher once over the texts
                objective = SentenceDistillation(None, sentence, "cosine")
                batches = sentence_batches(query_rows + document_rows, pad_id, seed=0, teacher_embeddings=targets)
            started = time.perf_counter()
            run = train(student, objective, batches, settings(args.encoder_steps, args.encoder_batch_size,
                                                              args.encoder_lr), run_dir / f"encoder-{name}")
            result[f"{name}_seconds"] = time.perf_counter() - started
            curves[name] = run.losses
        result[name] = retrieval(student, tokenizer, held_queries, held_documents, sentence)
        print(f"encoder {name}: {result[name]}", flush=True)
    gap = result["teacher"]["mrr_at_10"] - result["scratch"]["mrr_at_10"]
    result["gap_closed_mrr"] = (result["distilled"]["mrr_at_10"] - result["scratch"]["mrr_at_10"]) / gap if gap else None
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
            axis.set_title(f"SmolLM2-135M -> {len(result['layers'])} layers, {result['tokens']:,} tokens")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["decoder", "encoder", "both"], default="both")
    parser.add_argument("--decoder_steps", type=int, default=40)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--decoder_lr", type=float, default=3e-4)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--held_out_windows", type=int, default=16)
    parser.add_argument("--encoder_steps", type=int, default=100)
    parser.add_argument("--encoder_batch_size", type=int, default=32)
    parser.add_argument("--encoder_lr", type=float, default=1e-4)
    parser.add_argument("--encoder_max_tokens", type=int, default=96)
    parser.add_argument("--held_out_articles", type=int, default=500)
    parser.add_argument("--run_dir", default="runs/bench-distill")
    parser.add_argument("--output", default=str(OUT_JSON))
    parser.add_argument("--plot", default=str(OUT_PNG))
    args = parser.parse_args()
    torch.manual_seed(0)
    results = json.loads(Path(args.output).read_text()) if Path(args.output).is_file() else {}
    results["machine"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": torch.get_num_threads(),
                          "load": os.getloadavg(), "platform": platform.platform(), "torch": torch.__version__}
    run_dir = Path(args.run_dir)
    if args.part in ("decoder", "both"):
        results["decoder"] = decoder_study(args, run_dir)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    if args.part in ("encoder", "both"):
        results["encoder"] = encoder_study(args, run_dir)
        Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    results["machine"]["load_after"] = os.getloadavg()
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    plot(results, Path(args.plot))
    summary = {study: {k: v for k, v in results[study].items() if k != "curves"} for study in ("decoder", "encoder")
               if study in results}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
