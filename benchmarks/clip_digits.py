"""CLIP on scikit-learn's handwritten digits with generated captions: zero-shot accuracy on held-out images with
caption templates training never used (goal >= 90%), and retrieval recall@1 both ways.

    python benchmarks/clip_digits.py                         # `llmkit clip train` defaults
    python benchmarks/clip_digits.py --steps 600 --json docs/clip_digits.json --plot docs/clip_digits.png

Zero-shot: each digit's text embedding is the normalised mean over the 5 unseen templates ("a drawing of a seven",
"this is the digit 7", ...) of its captions' embeddings (prompt ensembling); an image takes the digit whose embedding
is most similar. Per-template accuracy uses one template at a time. Retrieval (held-out images vs the 50 unseen
captions, 10 digits x 5 templates; a hit is an item of the same digit, since many images share a digit):
image -> text recall@1 is the share of images whose most similar caption names their digit, text -> image recall@1
the share of captions whose most similar image shows their digit.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def retrieval(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor, templates) -> dict:  # noqa: ANN001
    from llmkit.data.digits import caption, encode_captions

    digits = [d for d in range(10) for _ in templates]
    texts = [caption(d, template) for d in range(10) for template in templates]
    with torch.no_grad():
        images = model.image_embeddings(pixels)
        captions = model.text_embeddings(encode_captions(tokenizer, texts, model.config.text.max_seq_len))
    similarity = images @ captions.T  # (images, captions)
    caption_digits = torch.tensor(digits)
    image_to_text = (caption_digits[similarity.argmax(1)] == labels).float().mean().item()
    text_to_image = (labels[similarity.argmax(0)] == caption_digits).float().mean().item()
    return {"image_to_text_recall_at_1": image_to_text, "text_to_image_recall_at_1": text_to_image,
            "captions": len(texts), "images": len(labels)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.commands.clip import clip_train, zero_shot_accuracy
    from llmkit.data.digits import UNSEEN_TEMPLATES, digit_pixels, load_digits_split

    load_before = os.getloadavg()
    split = load_digits_split()
    pixels, labels = digit_pixels(split.test_images), torch.from_numpy(split.test_labels)
    with tempfile.TemporaryDirectory() as run:
        started = time.perf_counter()
        trained = clip_train(output=run, steps=args.steps, device="cpu")
        seconds = round(time.perf_counter() - started, 1)
        model, tokenizer = load_model(trained["model"]), load_tokenizer(trained["model"])
        if args.plot:
            args.plot.write_bytes(Path(trained["plot"]).read_bytes())
    ensemble = zero_shot_accuracy(model, tokenizer, pixels, labels, UNSEEN_TEMPLATES)
    per_template = {template: zero_shot_accuracy(model, tokenizer, pixels, labels, [template])
                    for template in UNSEEN_TEMPLATES}
    results = {"steps": args.steps, "seconds": seconds, "zero_shot_accuracy": ensemble,
               "zero_shot_per_template": per_template,
               "retrieval": retrieval(model, tokenizer, pixels, labels, UNSEEN_TEMPLATES),
               "machine": {"threads": torch.get_num_threads(), "load_before": load_before,
                           "load_after": os.getloadavg(), "torch": torch.__version__}}
    print("\n| measure (held-out digits, unseen templates) | value |\n| --- | --- |")
    print(f"| zero-shot accuracy, 5-template ensemble | {ensemble:.1%} |")
    for template, accuracy in per_template.items():
        print(f"| zero-shot accuracy, {template!r} alone | {accuracy:.1%} |")
    print(f"| recall@1 image -> text | {results['retrieval']['image_to_text_recall_at_1']:.1%} |")
    print(f"| recall@1 text -> image | {results['retrieval']['text_to_image_recall_at_1']:.1%} |")
    print(f"{args.steps} steps in {seconds} s; load {load_before} -> {os.getloadavg()}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
