"""LoRA training speed of llmkit vs Hugging Face peft + transformers: same base weights, adapter, batches and AdamW.

    python benchmarks/peft_speed.py                      # smollm2-135m, fp32, 2 threads, 4 x 256, rank 8, 2 + 10 steps
    python benchmarks/peft_speed.py --rank 16 --json docs/peft_speed.json --plot docs/peft_speed.png
    python benchmarks/peft_speed.py --batch_size 2 --seq_len 64 --steps 3 --warmup 1     # a quick check (~1 minute)

llmkit runs `llmkit.peft.lora.apply_lora` on its Decoder (every base parameter frozen, A (r, in) and B (out, r)
added to the targeted projections) and trains it with its real loop, `llmkit.train.loop.train`, exactly as
benchmarks/train.py does (causal_lm_loss, fused AdamW over the trainable parameters, clipping at 1.0, a run
directory in a temporary folder); step times come from its metrics.jsonl. peft wraps the transformers
LlamaForCausalLM (attn_implementation="sdpa", use_cache=False) with `peft.get_peft_model(model, LoraConfig(r,
lora_alpha, lora_dropout, target_modules, task_type="CAUSAL_LM"))` and trains it in a plain PyTorch loop:
model(input_ids, labels=...).loss, backward, clip_grad_norm_(1.0) and torch.optim.AdamW (default implementation)
over the trainable parameters, grouped for weight decay as llmkit's `parameter_groups` groups them (LoRA's A and B
are matrices, so all of them decay), with the same lr, betas and eps; zero_grad(set_to_none=True).

Fairness: the base is the preset's Decoder, randomly initialised under a fixed seed, exported to transformers with
the project's key map; the adapter is llmkit's (seeded A, zero B), written by `llmkit.peft.hf_peft.export_peft_lora`
and loaded into the peft model with `set_peft_model_state_dict`. Before any timing a parity check asserts equal
trainable parameter counts and AdamW groups and equal first-step losses, once as initialised (B = 0, so the base)
and once with every B set to the same random values (so A, B, the scale and the module mapping). After the timed
runs every step's loss must agree too: both sides trained the same thing. Each side runs in its own spawned
process, in lockstep with the other (benchmarks/train.py's run_lockstep), so a busy spell of the machine hits both;
peak RSS is each process's high-water mark from the end of its model setup to the last step (Linux clear_refs
after malloc_trim),
so building the transformers copy from llmkit's weights does not count against peft.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import functools
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import train as train_benchmark  # benchmarks/train.py: the engines, lockstep runner and shared inputs
from train import LOSS_TOLERANCE, MODELS, SEED, StepGate, hf_loss, llmkit_decoder, random_batches

from llmkit.memory import peak_rss_mb

LORA_SEED = SEED + 1  # A's initialisation, set on both sides right before apply_lora
PERTURB_STD = 0.02  # the random B of the second parity check: large enough to move the loss visibly
# Per-step losses of the timed runs: the same fp32 training with other kernels (fused vs for-loop AdamW, llmkit's vs
# transformers' attention and loss) drifts by float rounding only (observed ~1e-6 over 4 steps of smollm2-135m)
STEP_LOSS_TOLERANCE = 1e-4
GOAL_RATIO = 1.2  # the goal: llmkit LoRA training tokens/s >= 1.2 x peft + transformers
REFERENCE = "peft"
LLAMA_MODELS = [preset for preset, architecture in MODELS.items() if architecture == "LlamaForCausalLM"]
SFT_TEMPLATE = "flan_dialogue_summary"


def sft_batches(vocab_size: int, steps: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Fine-tuning-shaped batches: the first DialogSum training dialogues in FLAN-style prompts, tokenized by
    SmolLM2's tokenizer, prompts cut from the left to fit seq_len, right-padded to seq_len; only the summary
    tokens are labels (what `llmkit finetune` trains on)."""
    from llmkit.checkpoints import default_model_path, load_tokenizer
    from llmkit.data.packing import padded_batch
    from llmkit.data.sft import builtin_dialogsum, tokenize_records

    tokenizer = load_tokenizer(default_model_path())
    assert tokenizer.vocab_size <= vocab_size, (tokenizer.vocab_size, vocab_size)
    examples, _ = tokenize_records(builtin_dialogsum("train", steps * batch_size), tokenizer, SFT_TEMPLATE, seq_len)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return [padded_batch(examples[step * batch_size:(step + 1) * batch_size], pad_id, length=seq_len)
            for step in range(steps)]


BATCHES = {"sft": sft_batches, "random": random_batches}


# --------------------------------------------------------------------------- building both sides


def apply_seeded_lora(model: torch.nn.Module, lora):  # noqa: ANN001, ANN201 (a LoraSettings)
    """llmkit's LoRA with A drawn under LORA_SEED (the same in every process); the peak RSS restarts afterwards."""
    from llmkit.peft.lora import apply_lora

    torch.manual_seed(LORA_SEED)
    model = apply_lora(model, lora)
    reset_peak_rss()
    return model


def peft_model_from(preset: str, decoder, lora):  # noqa: ANN001, ANN201
    """transformers' model of the decoder's base weights, wrapped by peft.get_peft_model with the decoder's
    LoRA settings, holding the decoder's adapter tensors (exported as a PEFT directory, loaded back)."""
    base = llmkit_decoder(preset)  # the same seeded weights, without the adapter tensors
    hf_model = train_benchmark.hf_model_from(base, MODELS[preset])
    del base
    return wrap_with_peft(hf_model, decoder, lora)


def wrap_with_peft(hf_model: torch.nn.Module, decoder, lora):  # noqa: ANN001, ANN201
    """peft.get_peft_model over a transformers model holding the decoder's base weights, with the decoder's LoRA
    settings and adapter tensors (`copy_adapter`); in training mode."""
    import peft

    config = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.targets), task_type="CAUSAL_LM")
    model = peft.get_peft_model(hf_model, config)
    copy_adapter(model, decoder)
    return model.train()


def copy_adapter(model: torch.nn.Module, decoder) -> None:  # noqa: ANN001
    """Load the decoder's LoRA tensors (exported as a PEFT directory by llmkit) into the peft model, and check
    that peft now holds exactly them."""
    import peft
    from safetensors.torch import load_file

    from llmkit.peft.hf_peft import PEFT_WEIGHTS_FILE, export_peft_lora
    from llmkit.peft.lora import lora_layers

    with tempfile.TemporaryDirectory() as directory:
        tensors = load_file(str(export_peft_lora(decoder, directory) / PEFT_WEIGHTS_FILE))
    result = peft.set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys, result.unexpected_keys
    loaded = peft.get_peft_model_state_dict(model)
    assert loaded.keys() == tensors.keys() and len(tensors) == 2 * len(lora_layers(decoder)), sorted(loaded)[:4]
    assert all(torch.equal(loaded[key], tensors[key]) for key in tensors), "peft holds other adapter tensors"


def peft_parameter_groups(model: torch.nn.Module) -> list[dict]:
    """train.py's transformers groups (llmkit's decay rule) over the trainable parameters only."""
    return [{**group, "params": [p for p in group["params"] if p.requires_grad]}
            for group in train_benchmark.hf_parameter_groups(model)]


def trainable_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_peak_rss() -> None:
    """Hand freed heap back to the OS (glibc malloc_trim) and restart this process's VmHWM at its current RSS
    (Linux >= 4.0), so the peak counts what training holds; elsewhere the peak includes the setup."""
    from llmkit.memory import reset_peak_rss

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # another C library: freed setup memory may stay counted
        pass
    reset_peak_rss()


# --------------------------------------------------------------------------- parity and the peft engine


def check_parity(preset: str, threads: int, batch_size: int, seq_len: int, lora, data: str) -> dict:  # noqa: ANN001
    """Both sides hold the same model: equal trainable counts and AdamW groups, equal losses with B = 0 and with
    the same random B (fp32, no gradient)."""
    from llmkit.peft.lora import lora_layers
    from llmkit.train.objectives import causal_lm_loss
    from llmkit.train.optim import parameter_groups

    torch.set_num_threads(threads)
    decoder = apply_seeded_lora(llmkit_decoder(preset), lora)
    model = peft_model_from(preset, decoder, lora)
    counts = {"llmkit": trainable_parameters(decoder), REFERENCE: trainable_parameters(model)}
    groups = {"llmkit": [len(group["params"]) for group in parameter_groups(decoder, train_benchmark.WEIGHT_DECAY)],
              REFERENCE: [len(group["params"]) for group in peft_parameter_groups(model)]}
    assert counts["llmkit"] == counts[REFERENCE], f"trainable parameters differ: {counts}"
    assert groups["llmkit"] == groups[REFERENCE], f"AdamW groups (decay, no decay) differ: {groups}"
    batch = BATCHES[data](decoder.config.vocab_size, 1, batch_size, seq_len)[0]
    losses = {}
    for case in ("B = 0", "random B"):
        if case == "random B":
            generator = torch.Generator().manual_seed(LORA_SEED)
            with torch.no_grad():
                for layer in lora_layers(decoder).values():
                    b_matrix = layer.lora_B[lora.adapter_name]
                    b_matrix.copy_(torch.randn(b_matrix.shape, generator=generator) * PERTURB_STD)
            model = peft_model_from(preset, decoder, lora)
        with torch.no_grad():
            ours, theirs = causal_lm_loss(decoder, batch).mean().item(), hf_loss(model, batch).item()
        if abs(ours - theirs) > LOSS_TOLERANCE:
            raise SystemExit(f"{preset} with LoRA ({case}): first-step losses differ: llmkit {ours:.6f}, peft "
                             f"{theirs:.6f}; the two models differ, so the timing would compare different things")
        losses[case] = {"llmkit": ours, REFERENCE: theirs}
    return {"losses": losses, "trainable_parameters": counts, "adamw_groups": groups}


def run_peft(gate: StepGate, preset: str, threads: int, batch_size: int, seq_len: int, steps: int, warmup: int,
             precision: str, lora, data: str) -> dict:  # noqa: ANN001
    """peft.get_peft_model over the transformers model class, in a plain PyTorch training loop."""
    torch.set_num_threads(threads)
    decoder = apply_seeded_lora(llmkit_decoder(preset), lora)
    model = peft_model_from(preset, decoder, lora)
    step_batches = BATCHES[data](decoder.config.vocab_size, steps, batch_size, seq_len)
    del decoder
    gc.collect()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(peft_parameter_groups(model), lr=train_benchmark.LR, betas=train_benchmark.BETAS,
                                  eps=train_benchmark.EPS)
    dtype = {"fp32": None, "bf16-mixed": torch.bfloat16}[precision]
    reset_peak_rss()
    step_seconds, losses, peak = [], [], 0.0
    for step in range(steps):
        if step == steps - 1:
            peak = peak_rss_mb()
        gate.wait(step)
        start = time.perf_counter()
        batch = step_batches[step]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = hf_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, train_benchmark.GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - start)
    summary = train_benchmark._summary(step_seconds, gate, losses, warmup, batch_size * seq_len, peak,
                                       sum(p.numel() for p in model.parameters()), train_benchmark.adamw_kernel(optimizer))
    return {**summary, "trainable_parameters": trainable_parameters(model)}


# --------------------------------------------------------------------------- report


def main() -> None:
    from llmkit.peft.lora import LLAMA_PROJECTIONS, LoraSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=LLAMA_MODELS[0], choices=LLAMA_MODELS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", default="sft", choices=list(BATCHES),
                        help="sft: DialogSum prompts (masked) and summaries (labels); random: every token a label")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=4)
    parser.add_argument("--seq_len", "--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps (after the warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (allocations)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--targets", nargs="+", default=list(LLAMA_PROJECTIONS), help="projection names to adapt")
    parser.add_argument("--loop_overhead", action="store_true",
                        help="also time llmkit's pieces in a bare loop, to measure what train() itself costs")
    parser.add_argument("--json", default=None, help="write the settings, parity and results here")
    parser.add_argument("--plot", default=None, help="write a bar chart PNG here")
    args = parser.parse_args()

    import peft
    import transformers

    lora = LoraSettings(rank=args.rank, alpha=args.alpha, dropout=args.dropout, targets=tuple(args.targets))
    steps = args.warmup + args.steps
    header = (f"{datetime.date.today()}, {train_benchmark.cpu_name()}, {args.threads} threads, torch {torch.__version__}, "
              f"transformers {transformers.__version__}, peft {peft.__version__}; {args.model}, LoRA rank {lora.rank} "
              f"alpha {lora.alpha:g} dropout {lora.dropout:g} on {','.join(lora.targets)}; batch {args.batch_size} x "
              f"{args.seq_len} tokens, {args.precision}, {args.warmup} warmup + {args.steps} timed steps; "
              f"{args.data} batches ({labelled_share(args, steps):.0%} of the positions are labels)")
    print(f"{header}; load average now {os.getloadavg()[0]:.2f}")
    parity = train_benchmark.in_child(check_parity, args.model, args.threads, args.batch_size, args.seq_len, lora,
                                      args.data)
    for case, pair in parity["losses"].items():
        print(f"first-step loss ({case}): llmkit {pair['llmkit']:.6f}, peft {pair[REFERENCE]:.6f} "
              f"(agree to {LOSS_TOLERANCE:g})")
    print(f"trainable parameters: {parity['trainable_parameters']['llmkit']:,} on both sides; AdamW groups (decay, "
          f"no decay): {parity['adamw_groups']['llmkit']} tensors on both sides")

    common = (args.model, args.threads, args.batch_size, args.seq_len, steps, args.warmup, args.precision)
    prepare = functools.partial(apply_seeded_lora, lora=lora)
    make_batches = BATCHES[args.data]
    engines = {"llmkit": (train_benchmark.run_llmkit, common + (False, "train", prepare, make_batches)),
               REFERENCE: (run_peft, common + (lora, args.data))}
    if args.loop_overhead:
        engines["llmkit (bare loop)"] = (train_benchmark.run_llmkit, common + (False, "bare", prepare, make_batches))
    pair, load = train_benchmark.run_lockstep(engines, steps)
    # this benchmark keeps ~1-2 threads busy itself: a load far above 2 means other work shared the cores
    print(f"mean load average during the steps {load:.2f}")
    pair["llmkit"]["trainable_parameters"] = parity["trainable_parameters"]["llmkit"]  # the same seeded model
    assert pair[REFERENCE]["trainable_parameters"] == pair["llmkit"]["trainable_parameters"], "trainable counts differ"
    check_same_training(pair, args.precision)
    print_table(pair)
    ratio = pair["llmkit"]["tokens_per_s"] / pair[REFERENCE]["tokens_per_s"]
    print(f"goal llmkit/peft tokens/s >= {GOAL_RATIO}: {ratio:.2f} ({'met' if ratio >= GOAL_RATIO else 'not met'})")
    if args.json:
        from llmkit.io import atomic_write_text

        record = {"header": header, "settings": vars(args), "mean_load_average": load, "parity": parity,
                  "results": pair, "ratio_tokens_per_s": ratio}
        atomic_write_text(Path(args.json), json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(pair, args.plot, f"{args.model} LoRA r={lora.rank} training, {args.precision}, batch {args.batch_size} x "
                              f"{args.seq_len} ({args.data} data), {args.threads} CPU threads")


def labelled_share(args: argparse.Namespace, steps: int) -> float:
    """The share of batch positions whose next token is a label (the rest: prompt and padding)."""
    from llmkit.config import Config
    from llmkit.data.batch import IGNORE_INDEX

    vocab_size = Config.from_name(args.model).vocab_size
    labels = torch.stack([batch["labels"] for batch in BATCHES[args.data](vocab_size, steps, args.batch_size,
                                                                          args.seq_len)])
    return (labels != IGNORE_INDEX).float().mean().item()


def check_same_training(pair: dict, precision: str) -> None:
    """Every timed step's loss agrees (fp32: to STEP_LOSS_TOLERANCE; bf16-mixed: printed only)."""
    ours, theirs = pair["llmkit"]["losses"], pair[REFERENCE]["losses"]
    gaps = [abs(a - b) for a, b in zip(ours, theirs)]
    print(f"losses llmkit {ours[0]:.5f} -> {ours[-1]:.5f}, peft {theirs[0]:.5f} -> {theirs[-1]:.5f} (largest "
          f"per-step gap {max(gaps):.1e})")
    if precision == "fp32" and max(gaps) > STEP_LOSS_TOLERANCE:
        raise SystemExit(f"the timed runs' losses differ by {max(gaps):.2e} at step {gaps.index(max(gaps)) + 1}: "
                         "the two sides did not train the same thing")


def print_table(pair: dict) -> None:
    header = f"| {'figure':<24} | {'llmkit':>10} | {'peft':>10} | {'ratio':>6} |"
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = [("tokens/s (median)", "tokens_per_s", "{:.0f}"), ("tokens/s (best step)", "best_tokens_per_s", "{:.0f}"),
            ("ms/step (median)", "ms_per_step", "{:.0f}"), ("CPU s/step (median)", "cpu_s_per_step", "{:.2f}"),
            ("peak RSS MB", "peak_rss_mb", "{:.0f}"), ("trainable parameters", "trainable_parameters", "{:,}")]
    for label, key, fmt in rows:
        a, b = pair["llmkit"][key], pair[REFERENCE][key]
        print(f"| {label:<24} | {fmt.format(a):>10} | {fmt.format(b):>10} | {a / b:>6.2f} |")
    for other in [engine for engine in pair if engine not in ("llmkit", REFERENCE)]:
        a, b = pair[other]["tokens_per_s"], pair[REFERENCE]["tokens_per_s"]
        print(f"| {other + ' tok/s':<24} | {a:>10.0f} | {b:>10.0f} | {a / b:>6.2f} |")
    print()
    for engine, result in pair.items():
        low, high = result["step_range_ms"]
        print(f"{engine}: steps {low:.0f}-{high:.0f} ms, first step {result['first_step_s']:.1f} s, "
              f"{result['parameters'] / 1e6:.1f}M parameters, AdamW {result['adamw']}")


def plot(pair: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(7, 3.8))
    for axis, key, name in zip(axes, ("tokens_per_s", "peak_rss_mb"), ("training tokens/s", "peak RSS MB")):
        bars = axis.bar(["llmkit", "peft +\ntransformers"], [pair["llmkit"][key], pair[REFERENCE][key]],
                        color=["tab:blue", "tab:gray"], width=0.6)
        axis.bar_label(bars, fmt="%.0f", fontsize=8)
        axis.set_title(name)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.15)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
