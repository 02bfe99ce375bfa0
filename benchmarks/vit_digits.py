"""ViT on scikit-learn's handwritten digits: held-out accuracy of `llmkit vision train` (goal >= 97%), and training
speed of llmkit's ViT vs transformers' ViTForImageClassification with the same config, weights and batches, side by
side in one run (goal >= 1.2x).

    python benchmarks/vit_digits.py                          # 600 training steps, 3 rounds x 100 timed steps
    python benchmarks/vit_digits.py --steps 200 --speed_steps 50 --json docs/vit_digits.json

Accuracy: `llmkit.commands.vision.vision_train` (the one training loop, default settings) on 1,433 training images,
evaluated on the 364 held out (every 5th of each digit). Speed: each model in the same plain PyTorch step (forward,
summed cross-entropy / batch, backward, AdamW, zero_grad), llmkit's exported to transformers with the project's
key map so both start from the same weights (the first losses are checked to agree); rounds alternate llmkit and
transformers so a change of machine load hits both; the table gives the median images/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

LOSS_TOLERANCE = 1e-4


def timed_steps(model: torch.nn.Module, forward, batches: list[dict]) -> tuple[float, float]:  # noqa: ANN001
    """images/s over `batches` (one AdamW step each) and the first batch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    first = None
    started = time.perf_counter()
    for batch in batches:
        loss = F.cross_entropy(forward(model, batch["pixel_values"]), batch["labels"])
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return sum(len(b["labels"]) for b in batches) / (time.perf_counter() - started), first


def speed(config, steps: int, rounds: int, batch_size: int) -> dict:  # noqa: ANN001
    import transformers

    from llmkit.checkpoints.hf import export_hf
    from llmkit.data.digits import DigitBatches, load_digits_split
    from llmkit.models.vision import ImageClassifier

    split = load_digits_split()
    source = DigitBatches(split.train_images, split.train_labels, seed=0, augment=False)
    batches = [source(i * batch_size, batch_size) for i in range(steps + 5)]
    results = {"llmkit": [], "transformers": []}
    for _ in range(rounds):
        torch.manual_seed(0)
        ours = ImageClassifier(config, config.n_labels)
        with tempfile.TemporaryDirectory() as folder:
            export_hf(ours, folder)
            theirs = transformers.ViTForImageClassification.from_pretrained(folder, attn_implementation="sdpa")
        for name, model, forward in (("llmkit", ours, lambda m, x: m(x)),
                                     ("transformers", theirs, lambda m, x: m(pixel_values=x).logits)):
            timed_steps(model, forward, batches[:5])  # warm-up (not timed); both models take the same 5 steps
            rate, _ = timed_steps(model, forward, batches[5:])
            results[name].append(rate)
    torch.manual_seed(0)
    ours = ImageClassifier(config, config.n_labels).eval()
    with tempfile.TemporaryDirectory() as folder:
        export_hf(ours, folder)
        theirs = transformers.ViTForImageClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = batches[0]["pixel_values"]
        gap = (ours(pixels) - theirs(pixel_values=pixels).logits).abs().max().item()
    assert gap <= LOSS_TOLERANCE, f"llmkit and transformers disagree by {gap} on the same weights"
    medians = {name: statistics.median(rates) for name, rates in results.items()}
    return {"images_per_s": medians, "rounds": results, "ratio": medians["llmkit"] / medians["transformers"],
            "logit_gap": gap}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps of the accuracy run")
    parser.add_argument("--speed_steps", type=int, default=100, help="timed steps per engine per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--skip_accuracy", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--plot", type=Path, default=None, help="copy the accuracy run's loss/accuracy plot here")
    args = parser.parse_args()

    from llmkit.commands.vision import vision_train
    from llmkit.data.digits import DIGIT_IMAGE_SIZE
    from llmkit.models.vision import vit_config

    load_before = os.getloadavg()
    config = vit_config(image_size=DIGIT_IMAGE_SIZE, patch_size=4, n_channels=1, n_labels=10)
    results = {"config": {"d_model": config.d_model, "n_layers": config.n_layers, "patch_size": config.patch_size,
                          "batch_size": args.batch_size}}
    if not args.skip_accuracy:
        with tempfile.TemporaryDirectory() as run:
            started = time.perf_counter()
            trained = vision_train(output=run, steps=args.steps, device="cpu")
            results["accuracy"] = {"held_out": trained["accuracy"], "steps": args.steps,
                                   "seconds": round(time.perf_counter() - started, 1)}
            if args.plot:
                args.plot.write_bytes(Path(trained["plot"]).read_bytes())
    results["speed"] = speed(config, args.speed_steps, args.rounds, args.batch_size)
    results["machine"] = {"threads": torch.get_num_threads(), "load_before": load_before,
                          "load_after": os.getloadavg(), "torch": torch.__version__, "platform": platform.platform()}
    rates = results["speed"]["images_per_s"]
    print(f"\n| engine | images/s (median of {args.rounds}) | ratio |\n| --- | --- | --- |")
    print(f"| llmkit ViT | {rates['llmkit']:,.0f} | {results['speed']['ratio']:.2f}x |")
    print(f"| transformers ViTForImageClassification | {rates['transformers']:,.0f} | 1.00x |")
    if "accuracy" in results:
        print(f"held-out accuracy {results['accuracy']['held_out']:.2%} after {args.steps} steps "
              f"({results['accuracy']['seconds']} s); load {load_before} -> {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
