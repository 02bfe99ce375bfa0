"""`llmkit vision train|classify`: a Vision Transformer trained on scikit-learn's handwritten digits through the one
training loop, and image classification with it or with any Hugging Face ViTForImageClassification directory."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from llmkit.commands.common import Device

BUILTIN_RUN = "llmkit/vision/vit-digits"  # under $XDG_CACHE_HOME (default ~/.cache)
MODEL_DIR = "model"  # the final model inside a run directory: config.json, model.safetensors, preprocessor_config.json
ACCURACY_PLOT = "accuracy.png"


def builtin_run_dir(run: str = BUILTIN_RUN) -> Path:
    """Where `vision train` writes by default: $XDG_CACHE_HOME/llmkit/vision/vit-digits."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / run


def vision_train(
    output: str | None = None,
    steps: int = 600,
    batch_size: int = 64,
    lr: float = 3e-3,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    patch_size: int = 4,
    augment: bool = False,
    eval_every: int = 100,
    seed: int = 0,
    device: Device = "auto",
) -> dict[str, Any]:
    """Train a small ViT on scikit-learn's 1,797 handwritten 8x8 digits and report its held-out accuracy.

    Example: llmkit vision train
             llmkit vision train --steps 300 --output runs/vit --d_model 32
             llmkit vision classify --model runs/vit/model --images "[seven.png]"

    Every 5th image of each digit is held out (364 images); the other 1,433 train. OUTPUT gets
    the loop's checkpoints/, metrics.jsonl, loss.png, accuracy.png (loss and held-out accuracy by step) and
    model/, the final classifier with its preprocessor_config.json.

    Args:
        output: run directory (default: ~/.cache/llmkit/vision/vit-digits, which `vision classify` reads).
        steps: optimizer steps.
        batch_size: images per step.
        lr: peak learning rate (AdamW, warmup then cosine decay).
        d_model: width of the transformer.
        n_layers: transformer blocks.
        n_heads: attention heads per block.
        patch_size: side of a square patch in pixels (8x8 digits: 4 gives 4 patches; 2 gives 16 and learns
            several times slower).
        augment: shift training images by up to one pixel at random.
        eval_every: steps between held-out evaluations.
        seed: random seed (weights, data order).
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.checkpoints import save_model
    from llmkit.data.digits import DIGIT_IMAGE_SIZE, DigitBatches, digit_pixels, load_digits_split
    from llmkit.data.images import processing_for
    from llmkit.models.vision import ImageClassifier, vit_config
    from llmkit.train.loop import train
    from llmkit.train.objectives import image_classification_loss
    from llmkit.train.settings import TrainSettings

    run = Path(output) if output else builtin_run_dir()
    config = vit_config(image_size=DIGIT_IMAGE_SIZE, patch_size=patch_size, n_channels=1, n_labels=10,
                        d_model=d_model, n_layers=n_layers, n_heads=n_heads)
    torch.manual_seed(seed)
    model = ImageClassifier(config, 10)
    split = load_digits_split()
    test_pixels, test_labels = digit_pixels(split.test_images), torch.from_numpy(split.test_labels)
    print(f"ViT {model.num_parameters():,} parameters; digits: {len(split.train_labels)} training, "
          f"{len(test_labels)} held-out images")

    def held_out(model: torch.nn.Module, step: int) -> dict[str, float]:
        accuracy = classifier_accuracy(model, test_pixels, test_labels)
        print(f"step {step}: held-out accuracy {accuracy:.2%}")
        return {"accuracy": accuracy}

    eval_batches = lambda: ({"pixel_values": test_pixels[i : i + 256], "labels": test_labels[i : i + 256]}
                            for i in range(0, len(test_labels), 256))
    settings = TrainSettings(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(20, steps // 10),
                             weight_decay=0.05, eval_every=eval_every, eval_batches=100, log_every=10,
                             checkpoint_every=steps, keep_last=1, seed=seed, device=device, betas=(0.9, 0.999))
    result = train(model, image_classification_loss, DigitBatches(split.train_images, split.train_labels, seed,
                                                                  augment), settings, run, eval_batches, held_out)
    model.cpu().eval()
    accuracy = classifier_accuracy(model, test_pixels, test_labels)
    save_model(model, run / MODEL_DIR)
    processing_for(1, DIGIT_IMAGE_SIZE).save(run / MODEL_DIR)
    plot = plot_training(run, "ViT on digits", "accuracy", "held-out accuracy")
    print(f"held-out accuracy {accuracy:.2%} ({round(accuracy * len(test_labels))}/{len(test_labels)}); model: "
          f"{run / MODEL_DIR}; plot: {plot}")
    return {"accuracy": accuracy, "model": str(run / MODEL_DIR), "plot": str(plot), "train_loss": result.train_loss}


def classifier_accuracy(model: Any, pixels: Any, labels: Any, batch_size: int = 256) -> float:
    """Share of images (N, C, H, W) whose top logit is their label (N,)."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        predictions = torch.cat([model(pixels[i : i + batch_size].to(device)).argmax(-1).cpu()
                                 for i in range(0, len(labels), batch_size)])
    model.train(was_training)
    return float((predictions == labels).float().mean())


def plot_training(run: Path, title: str, metric: str, label: str) -> Path:
    """loss and an eval metric (metrics.jsonl's `metric` column) against steps, as RUN/accuracy.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from llmkit.io import atomic_write
    from llmkit.train.metrics import METRICS_FILE

    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines() if line.strip()]
    train_rows = [(row["step"], row["loss"]) for row in rows if row.get("kind") == "train"]
    eval_rows = [(row["step"], row[metric]) for row in rows if row.get("kind") == "eval" and metric in row]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if train_rows:
        left.plot(*zip(*train_rows), linewidth=1)
    left.set(xlabel="step", ylabel="training loss", title=f"{title}: loss")
    if eval_rows:
        right.plot(*zip(*eval_rows), "o-")
    right.set(xlabel="step", ylabel=label, title=f"{title}: {label}")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    path = run / ACCURACY_PLOT
    atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
    plt.close(figure)
    return path


def vision_classify(
    images: list[str] | None = None,
    model: str | None = None,
    top: int = 3,
    device: Device = "auto",
) -> list[dict[str, Any]]:
    """Classify images with a ViT classifier: the top labels and their probabilities, one line per image.

    Example: llmkit vision classify                          (held-out digits, with the model `vision train` wrote)
             llmkit vision classify --model runs/vit/model --images "[seven.png, three.png]"
             llmkit vision classify --model google-vit-base-patch16-224/ --images "[cat.jpg]"

    Images are preprocessed as the model directory's preprocessor_config.json says (ViT's defaults without one).
    llmkit's digit models read 8x8 grey images with light ink on a dark background, like scikit-learn's digits.

    Args:
        images: image files (PNG, JPEG, ...); default: 8 held-out digits, each with its true label.
        model: a ViTForImageClassification directory or an llmkit ViT classifier (default: the one `llmkit vision
            train` writes).
        top: labels shown per image.
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.data.images import load_image, preprocess, processing_for
    from llmkit.device import resolve_device
    from llmkit.errors import LlmkitError

    if top < 1:
        raise LlmkitError(f"--top={top} must be at least 1")
    directory = _classifier_dir(model)
    classifier = _load_classifier(directory, device)
    config = classifier.config
    processing = processing_for(config.n_channels, config.image_size, directory)
    if images:
        pixels = preprocess([load_image(path, "--images") for path in images], processing)
        names, truths = images, [None] * len(images)
    else:
        from llmkit.data.digits import digit_pixels, load_digits_split

        split = load_digits_split()
        pixels, names = digit_pixels(split.test_images[:8]), [f"held-out digit {i}" for i in range(8)]
        truths = [int(label) for label in split.test_labels[:8]]
    with torch.no_grad():
        probabilities = classifier(pixels.to(resolve_device(device))).softmax(-1).cpu()
    label_names = _label_names(directory, config.n_labels)
    results = []
    for name, truth, row in zip(names, truths, probabilities):
        best = row.topk(min(top, len(row)))
        ranked = [(label_names[i], float(p)) for p, i in zip(best.values.tolist(), best.indices.tolist())]
        shown = ", ".join(f"{label} {p:.1%}" for label, p in ranked)
        print(f"{name}: {shown}" + (f"  (true: {truth})" if truth is not None else ""))
        results.append({"image": name, "labels": ranked, "true": truth})
    return results


def _classifier_dir(model: str | None) -> Path:
    """--model, or the default run's model; a missing default says what to run first."""
    from llmkit.errors import LlmkitError

    if model is not None:
        return Path(model)
    default = builtin_run_dir() / MODEL_DIR
    if not default.is_dir():
        raise LlmkitError(f"--model not given and {default} does not exist; run `llmkit vision train` first (a few "
                          "minutes) or pass --model DIR")
    return default


def _load_classifier(directory: Path, device: str) -> Any:
    """A ViT classifier from --model; another family or a ViT without a classifier head is one error naming
    --model."""
    from llmkit.checkpoints import load_config, load_model
    from llmkit.errors import LlmkitError

    try:
        config = load_config(directory)
    except LlmkitError as error:
        raise LlmkitError(f"--model: {error}") from None
    if config.arch != "vision" or config.n_labels is None:
        kind = "a ViT without a classifier head" if config.arch == "vision" else f"a {config.arch} model"
        raise LlmkitError(f"--model: {directory} holds {kind}; pass a ViT image classifier (what `llmkit vision "
                          "train` writes, or a ViTForImageClassification directory)")
    return load_model(directory, device=device)


def _label_names(directory: Path, n_labels: int) -> list[str]:
    """Class names from a Hugging Face config.json's id2label; the class numbers otherwise."""
    data = json.loads((directory / "config.json").read_text())
    id2label = data.get("id2label") if isinstance(data, dict) else None
    if isinstance(id2label, dict) and len(id2label) == n_labels:
        return [str(id2label.get(str(i), i)) for i in range(n_labels)]
    return [str(i) for i in range(n_labels)]
