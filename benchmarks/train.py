"""Training speed of llmkit vs Hugging Face transformers: same config, weights, batches and AdamW settings.

    python benchmarks/train.py                          # gpt2 (124M) and smollm2-135m, fp32, 2 threads, 4 x 256
    python benchmarks/train.py --models smollm2-135m --steps 8 --compile --plot docs/train.png
    python benchmarks/train.py --ablation --steps 2 --warmup 1  # one row per speed lever (LEVERS), vs transformers fp32
    python benchmarks/train.py --ablation --recompute --models smollm2-135m  # activation checkpointing modes
    python benchmarks/train.py --ablation --models smollm2-135m --levers "ckpt=mlp +loss_chunk" +compile  # some rows

llmkit runs its real training loop, `llmkit.train.loop.train` (causal_lm_loss, fused AdamW with weight-decay
groups, clipping at 1.0, a run directory in a temporary folder, evaluation off, checkpoint only at the end);
step times come from the elapsed_s column of its metrics.jsonl. transformers runs its model class
(GPT2LMHeadModel / LlamaForCausalLM, attn_implementation="sdpa", use_cache=False) in a plain PyTorch loop:
model(input_ids, labels=...).loss, backward, clip_grad_norm_(1.0), torch.optim.AdamW with the same lr,
betas, eps and groups (default implementation), zero_grad(set_to_none=True).

Both start from the same weights: the llmkit Decoder is built with a fixed seed and exported with the
project's key map (`to_hf_state_dict`) and config (`hf_config_dict`); a parity check asserts that the
first-step losses agree to 1e-4 before any timing. Each engine runs in its own spawned process (so peak
RSS is its own); the first --warmup steps are not timed, the table gives the median of the timed steps.

--ablation times llmkit once per speed lever of TrainSettings (LEVERS: plain, +fused projections, +chunked LM head
and loss, +bf16-mixed, +compile, all of them), each group of levers in lockstep with transformers fp32 (the same
baseline, re-run beside each group so a busy spell of the machine hits both): tokens/s, ratio and peak RSS per row.
With --recompute it times the activation-checkpointing modes instead (RECOMPUTE_LEVERS: none / attention / mlp / full,
each with and without the chunked LM head, in fp32 and bf16-mixed), two modes per group beside transformers fp32.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from llmkit.memory import peak_rss_mb

MODELS = {"gpt2": "GPT2LMHeadModel", "smollm2-135m": "LlamaForCausalLM"}  # llmkit preset -> transformers class
LR, BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = 6e-4, (0.9, 0.95), 1e-8, 0.1, 1.0
SEED = 1337
LOSS_TOLERANCE = 1e-4  # same weights and tokens in fp32: only summation order differs (observed ~1e-6)
METRICS_FILE = "metrics.jsonl"  # llmkit.train.metrics.METRICS_FILE
LOSS_CHUNK = 256  # tokens per chunk of the LM head + loss in the ablation (a quarter of the 4 x 256 batch)
# --ablation: lever name -> TrainSettings fields (and the chunked objective); each group runs beside transformers fp32
LEVERS = {
    "plain": dict(),
    "+fused": dict(fused_projections=True),
    "+loss_chunk": dict(loss_chunk=LOSS_CHUNK),
    "+bf16-mixed": dict(precision="bf16-mixed"),
    "+compile": dict(compile=True),
    "all": dict(fused_projections=True, loss_chunk=LOSS_CHUNK, precision="bf16-mixed", compile=True),
}
LEVER_GROUPS = [("plain", "+fused", "+loss_chunk"), ("+bf16-mixed", "+compile", "all")]  # 4 processes' RSS at most
RECOMPUTE_MODES = ("none", "attention", "mlp", "full")  # --train.activation_checkpointing


def recompute_lever(mode: str, loss_chunk: int, precision: str) -> str:
    """The --recompute row name of one activation-checkpointing mode with the chunked head and precision."""
    return " ".join([f"ckpt={mode}"] + (["+loss_chunk"] if loss_chunk else []) +
                    ([f"+{precision}"] if precision != "fp32" else []))


# --ablation --recompute: each mode x (plain head, chunked head) x (fp32, bf16-mixed); two modes per group (3
# processes of ~4.5 GB for SmolLM2 beside transformers)
RECOMPUTE_LEVERS = {recompute_lever(mode, chunk, precision): dict(activation_checkpointing=mode, loss_chunk=chunk,
                                                                  precision=precision)
                    for precision in ("fp32", "bf16-mixed") for chunk in (0, LOSS_CHUNK) for mode in RECOMPUTE_MODES}
RECOMPUTE_GROUPS = [tuple(recompute_lever(mode, chunk, precision) for mode in pair)
                    for precision in ("fp32", "bf16-mixed") for chunk in (0, LOSS_CHUNK)
                    for pair in (RECOMPUTE_MODES[:2], RECOMPUTE_MODES[2:])]
ALL_LEVERS = {**LEVERS, **RECOMPUTE_LEVERS}


# --------------------------------------------------------------------------- shared inputs


def token_batches(vocab_size: int, steps: int, batch_size: int, seq_len: int) -> torch.Tensor:
    """The same random windows of seq_len + 1 token ids for both engines: (steps, B, T+1)."""
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(0, vocab_size, (steps, batch_size, seq_len + 1), generator=generator)


def random_batches(vocab_size: int, steps: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """Pretraining-shaped batches: every position of random windows is a next-token label."""
    from llmkit.train.objectives import causal_lm_batch

    return [causal_lm_batch(window) for window in token_batches(vocab_size, steps, batch_size, seq_len)]


def llmkit_decoder(preset: str):  # noqa: ANN201
    """The preset's Decoder, randomly initialised under SEED (as `llmkit pretrain` builds it)."""
    from llmkit.config import Config
    from llmkit.models.decoder import Decoder

    torch.manual_seed(SEED)
    return Decoder(Config.from_name(preset))


def hf_model_from(decoder, architecture: str):  # noqa: ANN001, ANN201
    """A transformers model of `architecture` holding the decoder's weights (project key map and config.json)."""
    import transformers

    from llmkit.checkpoints.hf import to_hf_state_dict
    from llmkit.checkpoints.hf_config import hf_config_dict

    fields = hf_config_dict(decoder.config, architecture)
    hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    model = getattr(transformers, architecture)._from_config(hf_config, attn_implementation="sdpa")
    model.loss_type = "ForCausalLM"  # what transformers falls back to for GPT2LMHeadModel anyway, minus its warning
    state = to_hf_state_dict(decoder.config, decoder.state_dict(), architecture)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if decoder.config.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr(), "head is not tied"
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    return model.train()


def hf_parameter_groups(model: torch.nn.Module) -> list[dict]:
    """llmkit's AdamW groups (llmkit.train.optim.parameter_groups) in transformers' module tree: matrices
    decay; norms, biases and embeddings (here: nn.Embedding weights, so the tied head too) do not."""
    embeddings = {id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        (no_decay if parameter.ndim < 2 or id(parameter) in embeddings else decay).append(parameter)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def adamw_kernel(optimizer: torch.optim.Optimizer) -> str:
    """Which AdamW implementation runs: fused, foreach or the per-parameter for-loop."""
    if optimizer.defaults.get("fused"):
        return "fused"
    if optimizer.defaults.get("foreach"):
        return "foreach"
    from torch.optim.optimizer import _default_to_fused_or_foreach  # torch's own choice when both are None

    params = [p for group in optimizer.param_groups for p in group["params"]]
    fused, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "fused (default)" if fused else "foreach (default)" if foreach else "for-loop (default)"


# --------------------------------------------------------------------------- engines (each in its own process)


def check_parity(preset: str, threads: int, batch_size: int, seq_len: int) -> dict:
    """First-step losses of both models on the first batch (fp32, no gradient): they must agree."""
    from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

    torch.set_num_threads(threads)
    decoder = llmkit_decoder(preset)
    hf_model = hf_model_from(decoder, MODELS[preset])
    batch = causal_lm_batch(token_batches(decoder.config.vocab_size, 1, batch_size, seq_len)[0])
    with torch.no_grad():
        ours = causal_lm_loss(decoder, batch).mean().item()
        theirs = hf_loss(hf_model, batch).item()
    if abs(ours - theirs) > LOSS_TOLERANCE:
        raise SystemExit(f"{preset}: first-step losses differ: llmkit {ours:.6f}, transformers {theirs:.6f}; the "
                         "two models do not hold the same weights, so the timing would compare different things")
    return {"llmkit": ours, "transformers": theirs}


def hf_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """transformers' own loss: labels are already the next tokens, so pass them as shift_labels (no re-shift)."""
    labels = batch["labels"].contiguous()  # (B, T): transformers views it flat
    return model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=labels,
                 shift_labels=labels, use_cache=False).loss


class StepGate:
    """Lockstep across engine processes: before each step an engine reports ready and blocks until the parent
    says go, so only one engine computes at a time and a busy spell of the shared machine hits both alike."""

    def __init__(self, connection) -> None:  # noqa: ANN001 (a multiprocessing Connection)
        self.connection = connection
        self.cpu_marks: list[float] = []  # process CPU time (all threads) as each step starts
        self.fault_marks: list[int] = []  # minor page faults so far: fresh memory the allocator had to map

    def wait(self, step: int) -> float:
        """Block until step `step` may run; returns the seconds spent waiting (not part of the step)."""
        self.cpu_marks.append(time.process_time())  # blocking in recv() burns no CPU
        self.fault_marks.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)
        start = time.perf_counter()
        self.connection.send(("ready", step))
        self.connection.recv()
        return time.perf_counter() - start


@dataclass
class GatedTraining:
    """What `gated_train` measured: each step's seconds (its gate wait left out), the losses, the peak RSS before
    the last step, and the seconds from the call to the first batch request (the loop's own setup)."""

    step_seconds: list[float]
    losses: list[float]
    peak_rss_mb: float
    start_s: float


def gated_train(model: torch.nn.Module, objective, step_batch, gate: StepGate, settings,  # noqa: ANN001
                first_gate_step: int = 0) -> GatedTraining:
    """llmkit.train.loop.train (with `settings`, a TrainSettings) on `step_batch(step)` for each step, waiting on the
    lockstep gate (as gate step `first_gate_step + step`) before each batch; step times come from the elapsed_s
    column of its metrics.jsonl, less the waits."""
    from llmkit.train.loop import train

    steps, started = settings.max_steps, time.perf_counter()
    waits, marks = [], {}

    def batches(position: int, size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        step = position // size
        marks.setdefault("first_request", time.perf_counter())
        if step == steps - 1:  # peak over steps 1..N-1: the final checkpoint save is not a training step
            marks["rss_mb"] = peak_rss_mb()
        waits.append(gate.wait(first_gate_step + step))
        return step_batch(step)

    with tempfile.TemporaryDirectory() as run_dir:
        losses = train(model, objective, batches, settings, run_dir).losses
        rows = [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines()]
    elapsed = [row["elapsed_s"] for row in rows if row["kind"] == "train"]  # seconds since the loop started
    step_seconds = [b - a - wait for a, b, wait in zip([0.0] + elapsed, elapsed, waits)]
    return GatedTraining(step_seconds, losses, marks["rss_mb"], marks["first_request"] - started)


def run_llmkit(gate: StepGate, preset: str, threads: int, batch_size: int, seq_len: int, steps: int, warmup: int,
               precision: str, compile: bool, loop: str, prepare=None, make_batches=random_batches,  # noqa: ANN001
               fused_projections: bool = False, loss_chunk: int = 0, activation_checkpointing: str = "none") -> dict:
    """llmkit.train.loop.train (loop="train"), or the same pieces in a bare loop (loop="bare") to measure its overhead;
    `prepare(model) -> model`, when given, changes the model first (benchmarks/peft_speed.py applies LoRA);
    `make_batches(vocab_size, steps, batch_size, seq_len)` gives each step's batch; `fused_projections`, `loss_chunk`
    and `activation_checkpointing` are TrainSettings' levers (train loop only)."""
    from llmkit.train.loop import clip_gradients
    from llmkit.train.objectives import causal_lm_loss, causal_lm_objective
    from llmkit.train.optim import build_optimizer
    from llmkit.train.precision import autocast
    from llmkit.train.settings import TrainSettings

    torch.set_num_threads(threads)
    model = llmkit_decoder(preset)
    if prepare is not None:
        model = prepare(model)
    step_batches = make_batches(model.config.vocab_size, steps, batch_size, seq_len)
    kernel = adamw_kernel(build_optimizer(model, LR, WEIGHT_DECAY, BETAS, EPS))  # the one train() builds (no state yet)

    if loop == "train":
        settings = TrainSettings(max_steps=steps, batch_size=batch_size, lr=LR, schedule="constant", warmup_steps=0,
                                 weight_decay=WEIGHT_DECAY, betas=BETAS, grad_clip=GRAD_CLIP, precision=precision,
                                 compile=compile, fused_projections=fused_projections, loss_chunk=loss_chunk,
                                 activation_checkpointing=activation_checkpointing,
                                 eval_every=0, log_every=1, checkpoint_every=steps + 1, keep_last=1, resume="never",
                                 device="cpu")
        timed = gated_train(model, causal_lm_objective(loss_chunk), step_batches.__getitem__, gate, settings)
        step_seconds, losses, peak_mb = timed.step_seconds, timed.losses, timed.peak_rss_mb
    else:
        optimizer = build_optimizer(model, LR, WEIGHT_DECAY, BETAS, EPS)
        parameters = [p for p in model.parameters() if p.requires_grad]
        step_model = torch.compile(model) if compile else model
        step_model.train()
        step_seconds, losses = [], []
        for step in range(steps):
            if step == steps - 1:
                peak_mb = peak_rss_mb()
            gate.wait(step)
            batch = step_batches[step]
            start = time.perf_counter()
            with autocast(precision, torch.device("cpu")):
                loss = causal_lm_loss(step_model, batch).mean()
            loss.backward()
            clip_gradients(parameters, GRAD_CLIP)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step_seconds.append(time.perf_counter() - start)
    return _summary(step_seconds, gate, losses, warmup, batch_size * seq_len, peak_mb, model.num_parameters(), kernel)


def run_transformers(gate: StepGate, preset: str, threads: int, batch_size: int, seq_len: int, steps: int,
                     warmup: int, precision: str, compile: bool) -> dict:
    """The transformers model class in a plain PyTorch training loop."""
    from llmkit.train.objectives import causal_lm_batch

    torch.set_num_threads(threads)
    decoder = llmkit_decoder(preset)
    model = hf_model_from(decoder, MODELS[preset])
    tokens = token_batches(decoder.config.vocab_size, steps, batch_size, seq_len)
    del decoder
    gc.collect()
    optimizer = torch.optim.AdamW(hf_parameter_groups(model), lr=LR, betas=BETAS, eps=EPS)
    step_model = torch.compile(model) if compile else model
    dtype = {"fp32": None, "bf16-mixed": torch.bfloat16}[precision]
    step_seconds, losses, peak = [], [], 0.0
    for step in range(steps):
        if step == steps - 1:
            peak = peak_rss_mb()
        gate.wait(step)
        start = time.perf_counter()
        batch = causal_lm_batch(tokens[step])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            loss = hf_loss(step_model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_seconds.append(time.perf_counter() - start)
    n_parameters = sum(p.numel() for p in model.parameters())
    return _summary(step_seconds, gate, losses, warmup, batch_size * seq_len, peak, n_parameters,
                    adamw_kernel(optimizer))


def _summary(step_seconds: list[float], gate: StepGate, losses: list[float], warmup: int, step_tokens: int,
             peak_mb: float, n_parameters: int, kernel: str) -> dict:
    timed = step_seconds[warmup:]
    median = statistics.median(timed)
    # CPU seconds of steps warmup..N-2 (start to start; the last step ends in llmkit's checkpoint save): the work
    # done, which other processes on the machine inflate much less than they inflate wall-clock time
    cpu = [b - a for a, b in zip(gate.cpu_marks, gate.cpu_marks[1:])][warmup:]
    faults = [b - a for a, b in zip(gate.fault_marks, gate.fault_marks[1:])][warmup:]
    return {
        "cpu_s_per_step": statistics.median(cpu) if cpu else float("nan"),
        "faults_per_step": statistics.median(faults) / 1000 if faults else float("nan"),
        "tokens_per_s": step_tokens / median,
        "best_tokens_per_s": step_tokens / min(timed),
        "ms_per_step": 1000 * median,
        "step_range_ms": (1000 * min(timed), 1000 * max(timed)),
        "first_step_s": step_seconds[0],
        "peak_rss_mb": peak_mb,
        "losses": losses,
        "parameters": n_parameters,
        "adamw": kernel,
    }


def in_child(fn, *args) -> dict:  # noqa: ANN001
    """Run `fn` in a fresh process (its own peak memory, its own thread settings)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def run_lever(gate: StepGate, lever: str, preset: str, threads: int, batch_size: int, seq_len: int, steps: int,
              warmup: int) -> dict:
    """llmkit's training loop with one ALL_LEVERS entry's settings (fp32, eager and plain unless the lever says)."""
    fields = dict(ALL_LEVERS[lever])
    precision, compile = fields.pop("precision", "fp32"), fields.pop("compile", False)
    return run_llmkit(gate, preset, threads, batch_size, seq_len, steps, warmup, precision, compile, "train", **fields)


ENGINES = {"llmkit": run_llmkit, "transformers": run_transformers}


def _engine_process(connection, engine, args: tuple) -> None:  # noqa: ANN001 (engine: an ENGINES name or a function)
    run = ENGINES[engine] if isinstance(engine, str) else engine  # other benchmarks pass their own engine functions
    try:
        connection.send(("result", run(StepGate(connection), *args)))
    except BaseException:  # noqa: BLE001 (handed to the parent, which stops the run with it)
        connection.send(("error", traceback.format_exc()))


def run_lockstep(engines: dict[str, tuple[str, tuple]], steps: int) -> tuple[dict[str, dict], float]:
    """Run each engine in its own spawned process, one step at a time in turn (order alternating every step:
    A B, B A, ...); returns each engine's summary and the mean 1-minute load average over the steps."""
    context = multiprocessing.get_context("spawn")
    connections, processes = {}, []
    for name, (engine, args) in engines.items():
        parent_end, child_end = context.Pipe()
        process = context.Process(target=_engine_process, args=(child_end, engine, args), daemon=True)
        process.start()
        connections[name], processes = parent_end, processes + [process]
    try:
        results = {}
        for name, connection in connections.items():
            _expect(name, connection.recv(), "ready")
        loads = []
        for step in range(steps):
            loads.append(os.getloadavg()[0])
            order = list(connections) if step % 2 == 0 else list(reversed(connections))
            for name in order:
                connections[name].send("go")
                message = connections[name].recv()  # ready for the next step, or the final summary
                if step == steps - 1:
                    results[name] = _expect(name, message, "result")
                else:
                    _expect(name, message, "ready")
        return results, statistics.mean(loads)
    finally:
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()


def _expect(name: str, message: tuple, kind: str):  # noqa: ANN202
    if message[0] == "error":
        raise SystemExit(f"{name} failed:\n{message[1]}")
    assert message[0] == kind, (name, message[0], kind)
    return message[1]


# --------------------------------------------------------------------------- report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after the warmup steps)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps (allocations, compilation)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16-mixed"])
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of both models")
    parser.add_argument("--compile_budget_s", type=float, default=300.0,
                        help="skip the compiled rows of later models when one compiled run took longer than this")
    parser.add_argument("--loop_overhead", action="store_true",
                        help="also time llmkit's pieces in a bare loop, to measure what train() itself costs")
    parser.add_argument("--plot", default=None, help="write a bar chart PNG here")
    parser.add_argument("--ablation", action="store_true",
                        help="one row per speed lever (LEVERS) instead of the fp32 / --compile comparison")
    parser.add_argument("--recompute", action="store_true",
                        help="with --ablation: one row per activation-checkpointing mode (RECOMPUTE_LEVERS) instead")
    parser.add_argument("--levers", nargs="+", default=None, choices=list(ALL_LEVERS), metavar="LEVER",
                        help="with --ablation: only these rows (names from LEVERS / RECOMPUTE_LEVERS), two per group")
    args = parser.parse_args()

    import transformers

    steps = args.warmup + args.steps
    print(f"{datetime.date.today()}, {cpu_name()}, {args.threads} threads, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; batch {args.batch_size} x {args.seq_len} tokens, {args.precision}, "
          f"{args.warmup} warmup + {args.steps} timed steps; load average now {os.getloadavg()[0]:.2f}")
    if args.ablation:
        run_ablation(args, args.warmup + args.steps)
        return
    variants = [False, True] if args.compile else [False]
    results: dict[tuple[str, bool], dict[str, dict]] = {}
    compile_too_slow = None
    for preset in args.models:
        losses = in_child(check_parity, preset, args.threads, args.batch_size, args.seq_len)
        print(f"{preset}: first-step loss llmkit {losses['llmkit']:.6f}, transformers {losses['transformers']:.6f} "
              f"(agree to {LOSS_TOLERANCE:g})")
        for compiled in variants:
            if compiled and compile_too_slow:
                print(f"{preset}: compiled rows skipped: {compile_too_slow}")
                continue
            common = (preset, args.threads, args.batch_size, args.seq_len, steps, args.warmup, args.precision, compiled)
            started = time.perf_counter()
            engines = {"llmkit": ("llmkit", common + ("train",)), "transformers": ("transformers", common)}
            if args.loop_overhead:
                engines["llmkit (bare loop)"] = ("llmkit", common + ("bare",))
            pair, load = run_lockstep(engines, steps)
            results[(preset, compiled)] = pair
            # this benchmark keeps ~1-2 threads busy itself: a load far above 2 means other work shared the cores
            print(f"{preset}{' compiled' if compiled else ''}: mean load average during the steps {load:.2f}")
            check_same_training(preset, compiled, args.precision, pair)
            took = time.perf_counter() - started
            if compiled and took > args.compile_budget_s:
                compile_too_slow = f"{preset}'s compiled runs took {took:.0f} s (> --compile_budget_s)"
    print_table(results, args)
    if args.plot:
        plot(results, args.plot, f"training, {args.precision}, batch {args.batch_size} x {args.seq_len}, "
                                 f"{args.threads} CPU threads")


def run_ablation(args: argparse.Namespace, steps: int) -> None:
    """Each LEVER_GROUPS group in lockstep with transformers fp32; prints the ablation table as groups finish (a
    failing group is reported and the others still run)."""
    rows, groups = [], RECOMPUTE_GROUPS if args.recompute else LEVER_GROUPS
    if args.levers:  # two per group beside transformers: 3 processes' RSS at most
        groups = [tuple(args.levers[i:i + 2]) for i in range(0, len(args.levers), 2)]
    for preset in args.models:
        losses = in_child(check_parity, preset, args.threads, args.batch_size, args.seq_len)
        print(f"{preset}: first-step loss llmkit {losses['llmkit']:.6f}, transformers {losses['transformers']:.6f} "
              f"(agree to {LOSS_TOLERANCE:g})", flush=True)
        for group in groups:
            shape = (preset, args.threads, args.batch_size, args.seq_len, steps, args.warmup)
            engines = {"transformers": ("transformers", shape + ("fp32", False))}
            engines.update({lever: (run_lever, (lever,) + shape) for lever in group})
            try:
                results, load = run_lockstep(engines, steps)
            except SystemExit as error:
                print(f"{preset} {', '.join(group)}: failed: {error}", flush=True)
                continue
            baseline = results.pop("transformers")
            for lever, result in results.items():
                eager_fp32 = ALL_LEVERS[lever].get("precision", "fp32") == "fp32" and not ALL_LEVERS[lever].get("compile")
                gap = abs(result["losses"][0] - baseline["losses"][0])
                if eager_fp32 and gap > LOSS_TOLERANCE:
                    raise SystemExit(f"{preset} {lever}: first-step loss differs from transformers' by {gap:.2e}")
                rows.append((preset, lever, result, baseline, load, gap))
                print(f"{preset} {lever}: {result['tokens_per_s']:.0f} tok/s vs transformers "
                      f"{baseline['tokens_per_s']:.0f}, peak RSS {result['peak_rss_mb']:,.0f} vs "
                      f"{baseline['peak_rss_mb']:,.0f} MB (mean load {load:.2f}; first-step loss gap {gap:.1e}, "
                      f"first step {result['first_step_s']:.0f} s)", flush=True)
    print(f"\n| model | lever | llmkit tok/s | transformers fp32 tok/s | ratio | llmkit peak RSS MB | "
          f"transformers peak RSS MB | RSS ratio | load |\n|{' --- |' * 9}")
    for preset, lever, ours, theirs, load, _ in rows:
        print(f"| {preset} | {lever} | {ours['tokens_per_s']:.0f} | {theirs['tokens_per_s']:.0f} | "
              f"{ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {ours['peak_rss_mb']:,.0f} | "
              f"{theirs['peak_rss_mb']:,.0f} | {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x | {load:.1f} |")


def check_same_training(preset: str, compiled: bool, precision: str, pair: dict) -> None:
    """The timed runs start from the same loss (fp32 eager: to LOSS_TOLERANCE; compiled / bf16: printed only)."""
    ours, theirs = pair["llmkit"]["losses"], pair["transformers"]["losses"]
    gap = max(abs(a - b) for a, b in zip(ours, theirs))
    print(f"{preset}{' compiled' if compiled else ''}: losses llmkit {ours[0]:.5f} -> {ours[-1]:.5f}, transformers "
          f"{theirs[0]:.5f} -> {theirs[-1]:.5f} (largest per-step gap {gap:.1e})")
    if precision == "fp32" and not compiled and abs(ours[0] - theirs[0]) > LOSS_TOLERANCE:
        raise SystemExit(f"{preset}: the timed runs' first-step losses differ by {abs(ours[0] - theirs[0]):.2e}")


def print_table(results: dict, args: argparse.Namespace) -> None:
    header = f"| {'model':<22} | {'figure':<26} | {'llmkit':>10} | {'transformers':>12} | {'ratio':>6} |"
    print("\n" + header)
    print("|" + "|".join("-" * len(cell) for cell in header.split("|")[1:-1]) + "|")
    rows = [("tokens/s (median)", "tokens_per_s", "{:.0f}"), ("tokens/s (best step)", "best_tokens_per_s", "{:.0f}"),
            ("ms/step (median)", "ms_per_step", "{:.0f}"), ("CPU s/step (median)", "cpu_s_per_step", "{:.2f}"),
            ("page faults/step (1000s)", "faults_per_step", "{:.0f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}")]
    for (preset, compiled), pair in results.items():
        name = preset + (" compiled" if compiled else "")
        extra = [key for key in pair if key not in ("llmkit", "transformers")]
        for label, key, fmt in rows:
            a, b = pair["llmkit"][key], pair["transformers"][key]
            print(f"| {name:<22} | {label:<26} | {fmt.format(a):>10} | {fmt.format(b):>12} | {a / b:>6.2f} |")
        for other in extra:
            a, b = pair[other]["tokens_per_s"], pair["transformers"]["tokens_per_s"]
            print(f"| {name:<22} | {other + ' tok/s':<26} | {a:>10.0f} | {b:>12.0f} | {a / b:>6.2f} |")
    print()
    for (preset, compiled), pair in results.items():
        for engine, result in pair.items():
            low, high = result["step_range_ms"]
            print(f"{preset}{' compiled' if compiled else ''} {engine}: steps {low:.0f}-{high:.0f} ms, first step "
                  f"{result['first_step_s']:.1f} s, {result['parameters'] / 1e6:.1f}M parameters, AdamW "
                  f"{result['adamw']}")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def plot(results: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [preset + ("\ncompiled" if compiled else "") for preset, compiled in results]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 2 * len(labels), 3.8))
    for axis, key, name in zip(axes, ("tokens_per_s", "peak_rss_mb"), ("training tokens/s", "peak RSS MB")):
        for offset, engine, color in ((-0.2, "llmkit", "tab:blue"), (0.2, "transformers", "tab:gray")):
            values = [pair[engine][key] for pair in results.values()]
            bars = axis.bar([i + offset for i in range(len(labels))], values, width=0.4, label=engine, color=color)
            axis.bar_label(bars, fmt="%.0f", fontsize=8)
        axis.set_xticks(range(len(labels)), labels)
        axis.set_title(name)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.2)  # room for the legend above the bars
    axes[0].legend(loc="upper right", ncols=2)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
