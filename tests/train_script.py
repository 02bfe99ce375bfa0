"""A tiny training run used by the loop's tests in a child process (killed with SIGKILL, or under torchrun).

python tests/train_script.py RUN_DIR [--strategy auto|fsdp] [--max_steps N] [--step_delay S] ..."""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from llmkit.config import Config
from llmkit.models.decoder import Decoder
from llmkit.train.loop import TrainSettings, train
from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

SEQ_LEN = 32


def token_source(step_delay: float = 0.0):
    """Deterministic windows of a fixed random token stream; the global batch does not depend on world size."""
    data = torch.randint(0, 64, (8192,), generator=torch.Generator().manual_seed(0))

    def batch(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        time.sleep(step_delay)
        starts = [((position + rank * batch_size + i) * SEQ_LEN) % (len(data) - SEQ_LEN - 1) for i in range(batch_size)]
        return causal_lm_batch(torch.stack([data[start:start + SEQ_LEN + 1] for start in starts]))

    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--max_steps", type=int, default=8)
    parser.add_argument("--global_batch", type=int, default=4)
    parser.add_argument("--checkpoint_every", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--step_delay", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(1)
    model = Decoder(Config.from_name("tiny-llama"))
    settings = TrainSettings(max_steps=args.max_steps, batch_size=args.global_batch // world_size, warmup_steps=2,
                             eval_every=0, log_every=1, checkpoint_every=args.checkpoint_every, lr=3e-3,
                             distributed=args.strategy, precision=args.precision, keep_last=10)
    result = train(model, causal_lm_loss, token_source(args.step_delay), settings, args.run_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        print("LOSSES " + json.dumps(result.losses))


if __name__ == "__main__":
    main()
