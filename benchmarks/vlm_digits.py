"""Vision-language models on scikit-learn's handwritten digits with SmolLM2-135M-Instruct as the frozen language model:
caption accuracy (the digit the greedy caption names) on held-out digits, Flamingo with 0, 1 and 4 in-context
examples and LLaVA-style with none.

    python benchmarks/vlm_digits.py                           # train both (the verbs' defaults), 100 held-out digits
    python benchmarks/vlm_digits.py --steps 40 --images 50 --json docs/vlm_digits.json --plot docs/vlm_digits.png

Each model is trained by `llmkit.commands.vlm.vlm_train` (the one loop; the ViT is `llmkit vision train`'s model
when present, else trained in the first run and reused by the second). Evaluation: `caption_accuracy`, the first
IMAGES held-out digits (every 5th of each class), each after SHOTS captioned training digits drawn at random with a
fixed seed; chance is 10%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps of each model (default: the verb's)")
    parser.add_argument("--images", type=int, default=100, help="held-out digits captioned per setting")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 4], help="Flamingo's in-context examples")
    parser.add_argument("--vision", default=None, help="an llmkit ViT directory (default: as `vlm train` chooses)")
    parser.add_argument("--runs", default="/tmp/llmkit_vlm_bench", help="where the two training runs go")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--plot", default=None, help="write a bar chart here (PNG)")
    args = parser.parse_args()

    import torch

    from llmkit.commands.vlm import caption_accuracy, load_vlm, vlm_train
    from llmkit.data.digits import load_digits_split

    split = load_digits_split()
    rows, vision = [], args.vision
    for style in ("flamingo", "llava"):
        run = Path(args.runs) / style
        started = time.perf_counter()
        steps = {"steps": args.steps} if args.steps else {}
        trained = vlm_train(style=style, output=str(run), vision=vision, **steps)
        train_seconds = time.perf_counter() - started
        vision = json.loads((Path(trained["model"]) / "vlm_config.json").read_text())["vision_model"]
        model, tokenizer = load_vlm(trained["model"])
        for shots in (args.shots if style == "flamingo" else [0]):
            started = time.perf_counter()
            with torch.no_grad():
                result = caption_accuracy(model, tokenizer, split, shots, args.images)
            rows.append({"style": style, "shots": shots, "accuracy": result["accuracy"], "images": args.images,
                         "train_s": round(train_seconds), "eval_s": round(time.perf_counter() - started),
                         "examples": result["examples"][:5]})
            print(f"{style} {shots}-shot: caption accuracy {result['accuracy']:.0%} ({args.images} held-out digits); "
                  f"e.g. {result['examples'][:3]}", flush=True)

    print("\n| model | in-context examples | caption accuracy | train s | eval s |\n| --- | --- | --- | --- | --- |")
    for row in rows:
        print(f"| {row['style']} | {row['shots']} | {row['accuracy']:.0%} | {row['train_s']} | {row['eval_s']} |")
    load = os.getloadavg()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {load[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "load": load}, indent=2))
    if args.plot:
        plot(rows, Path(args.plot))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{row['style']}\n{row['shots']}-shot" for row in rows]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.bar(labels, [100 * row["accuracy"] for row in rows], color=["C0" if row["style"] == "flamingo" else "C1"
                                                                      for row in rows])
    axes.axhline(10, color="grey", linestyle="--", linewidth=1, label="chance")
    axes.set(ylabel="caption names the digit (%)", ylim=(0, 100),
             title="held-out digits, SmolLM2-135M-Instruct frozen")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
