"""A tiny training run used by the loop's tests in a child process (killed with SIGKILL, interrupted with SIGINT or
SIGTERM, or under torchrun).

python tests/train_script.py RUN_DIR [--strategy auto|fsdp] [--max_steps N] [--step_delay S] ...
python tests/train_script.py OUT_DIR --gradients [--accumulation_steps A]   (one step's gradients, SFT-style labels)"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from llmkit.config import Config
from llmkit.data.batch import IGNORE_INDEX
from llmkit.models.decoder import Decoder
from llmkit.train.loop import TrainingInterrupted, TrainSettings, accumulate_gradients, reduce_step, train
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

SEQ_LEN = 32
SFT_LEN = 128  # tokens per row of the SFT-style source
SFT_LABELS = (3, 120, 40, 7)  # completion (label) tokens of sample s: SFT_LABELS[s % 4], the rest of the row is prompt
GRADIENTS_FILE = "gradients.safetensors"


def token_source(step_delay: float = 0.0):
    """Deterministic windows of a fixed random token stream; the global batch does not depend on world size."""
    data = torch.randint(0, 64, (8192,), generator=torch.Generator().manual_seed(0))

    def batch(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        time.sleep(step_delay)
        starts = [((position + rank * batch_size + i) * SEQ_LEN) % (len(data) - SEQ_LEN - 1) for i in range(batch_size)]
        return causal_lm_batch(torch.stack([data[start:start + SEQ_LEN + 1] for start in starts]))

    return batch


def sft_source():
    """Rows whose labels are IGNORE_INDEX but for the last SFT_LABELS[s % 4] tokens (prompt, then completion), so
    micro-batches and ranks hold very unequal numbers of label tokens; sample s is the same for any world size."""
    data = torch.randint(0, 64, (SFT_LEN * 64 + 1,), generator=torch.Generator().manual_seed(0))

    def batch(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        samples = [position + rank * batch_size + i for i in range(batch_size)]
        starts = [(sample % 63) * SFT_LEN for sample in samples]
        rows = causal_lm_batch(torch.stack([data[start:start + SFT_LEN + 1] for start in starts]))
        labels = rows["labels"].clone()  # (B, T)
        for row, sample in enumerate(samples):
            labels[row, :SFT_LEN - SFT_LABELS[sample % len(SFT_LABELS)]] = IGNORE_INDEX
        return {"input_ids": rows["input_ids"], "labels": labels}

    return batch


def gradients_main(out_dir: str, accumulation_steps: int) -> None:
    """One optimizer step's gradients (before any optimizer) of the SFT-style global batch of 4 samples, taken in
    `accumulation_steps` micro-batches per process; rank 0 writes them and prints the step's reported loss."""
    from safetensors.torch import save_file

    from llmkit.train.distributed import init_cluster, shut_down, unwrap, wrap_model

    cluster = init_cluster(torch.device("cpu"))
    torch.manual_seed(1)
    model = wrap_model(Decoder(Config.from_name("tiny-llama")), cluster)
    batch_size = 4 // (cluster.world_size * accumulation_steps)
    source = sft_source()
    micro_batches = [source(micro * batch_size * cluster.world_size, batch_size, cluster.rank, cluster.world_size)
                     for micro in range(accumulation_steps)]
    sums = accumulate_gradients(model, causal_lm_loss, micro_batches, cluster)
    loss, _ = reduce_step(sums, None, cluster, step=1)
    if cluster.is_main:
        gradients = {name: p.grad.contiguous() for name, p in unwrap(model).named_parameters()}
        save_file(gradients, os.path.join(out_dir, GRADIENTS_FILE))
        print("LOSS " + json.dumps({"loss": loss, "tokens": sums.tokens}))
    shut_down(cluster)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--gradients", action="store_true")
    parser.add_argument("--accumulation_steps", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.gradients:
        gradients_main(args.run_dir, args.accumulation_steps)
        return
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(1)
    model = Decoder(Config.from_name("tiny-llama"))
    settings = TrainSettings(max_steps=args.max_steps, batch_size=args.global_batch // world_size, warmup_steps=2,
                             eval_every=0, log_every=1, checkpoint_every=args.checkpoint_every, lr=3e-3,
                             distributed=args.strategy, precision=args.precision, keep_last=10)
    try:
        result = train(model, causal_lm_loss, token_source(args.step_delay), settings, args.run_dir)
    except TrainingInterrupted as stopped:  # as the CLI does: 130 after Ctrl-C, 143 after SIGTERM
        sys.exit(stopped.exit_status)
    if int(os.environ.get("RANK", "0")) == 0:
        print("LOSSES " + json.dumps(result.losses))


if __name__ == "__main__":
    main()
