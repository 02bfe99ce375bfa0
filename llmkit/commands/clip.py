"""`llmkit clip train|classify`: CLIP trained on scikit-learn's handwritten digits with generated captions through the
one training loop, and zero-shot classification with it or with any Hugging Face CLIPModel directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llmkit.commands.common import Device
from llmkit.commands.vision import MODEL_DIR, builtin_run_dir, plot_training

BUILTIN_RUN = "llmkit/clip/clip-digits"  # under $XDG_CACHE_HOME (default ~/.cache)
MAX_CAPTION_TOKENS = 48


def clip_train(
    output: str | None = None,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    d_model: int = 64,
    n_layers: int = 2,
    projection_dim: int = 64,
    patch_size: int = 4,
    logit_scale_init: float = 1.0,
    eval_every: int = 250,
    seed: int = 0,
    device: Device = "auto",
) -> dict[str, Any]:
    """Train a small CLIP on scikit-learn's handwritten digits paired with generated captions, then measure zero-shot
    accuracy with caption templates it never saw.

    Example: llmkit clip train
             llmkit clip train --steps 300 --output runs/clip
             llmkit clip classify --model runs/clip/model --labels "[a drawing of a three, a drawing of a seven]"

    Each training image gets a caption from one of 10 templates ("a handwritten seven", "a photo of the digit 7",
    ...); the symmetric InfoNCE loss pulls it towards its caption and away from the batch's others. Held-out
    evaluation (every 5th image of each digit) classifies with 5 unseen templates ("a drawing of a seven", ...).
    OUTPUT gets the loop's checkpoints/, metrics.jsonl, loss.png, accuracy.png and model/ (with the caption
    tokenizer and preprocessor_config.json).

    Args:
        output: run directory (default: ~/.cache/llmkit/clip/clip-digits, which `clip classify` reads).
        steps: optimizer steps.
        batch_size: image-caption pairs per step (the contrastive loss's negatives are the batch's other pairs).
        lr: peak learning rate (AdamW, warmup then cosine decay).
        d_model: width of both towers.
        n_layers: transformer blocks per tower.
        projection_dim: width of the shared embedding space.
        patch_size: side of a square image patch in pixels (8x8 digits: 4 gives 4 patches).
        logit_scale_init: log of the starting inverse temperature. CLIP starts at log(1/0.07) = 2.66; with 10
            classes a batch holds many captions of the same digit, and that sharp start pulls every embedding
            together before they separate (the loss sits at log(batch) for hundreds of steps); 1.0 does not.
        eval_every: steps between zero-shot evaluations.
        seed: random seed (weights, data order, captions).
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.checkpoints import save_model
    from llmkit.data.digits import (
        DIGIT_IMAGE_SIZE,
        UNSEEN_TEMPLATES,
        DigitBatches,
        caption_tokenizer,
        digit_pixels,
        load_digits_split,
    )
    from llmkit.data.images import processing_for
    from llmkit.models.clip import CLIP, ClipConfig, clip_text_config, clip_vision_config
    from llmkit.train.loop import train
    from llmkit.train.objectives import clip_contrastive_loss
    from llmkit.train.settings import TrainSettings

    run = Path(output) if output else builtin_run_dir(BUILTIN_RUN)
    tokenizer = caption_tokenizer()
    config = ClipConfig(
        text=clip_text_config(tokenizer.vocab_size, tokenizer.eos_id, MAX_CAPTION_TOKENS, d_model, n_layers,
                              pad_id=tokenizer.pad_id),
        vision=clip_vision_config(DIGIT_IMAGE_SIZE, patch_size, 1, d_model, n_layers), projection_dim=projection_dim,
        logit_scale_init=logit_scale_init, name="clip-digits")
    torch.manual_seed(seed)
    model = CLIP(config)
    split = load_digits_split()
    test_pixels, test_labels = digit_pixels(split.test_images), torch.from_numpy(split.test_labels)
    print(f"CLIP {model.num_parameters():,} parameters; digits: {len(split.train_labels)} training, "
          f"{len(test_labels)} held-out images")

    def zero_shot(model: torch.nn.Module, step: int) -> dict[str, float]:
        accuracy = zero_shot_accuracy(model, tokenizer, test_pixels, test_labels, UNSEEN_TEMPLATES)
        print(f"step {step}: zero-shot accuracy (unseen templates) {accuracy:.2%}")
        return {"zero_shot_accuracy": accuracy}

    held_out = DigitBatches(split.test_images, split.test_labels, seed, augment=False, captions=tokenizer,
                            max_tokens=MAX_CAPTION_TOKENS)
    eval_batches = lambda: (held_out(i * batch_size, batch_size) for i in range(len(test_labels) // batch_size))
    settings = TrainSettings(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(100, steps // 10),
                             weight_decay=0.05, eval_every=eval_every, eval_batches=100, log_every=10,
                             checkpoint_every=steps, keep_last=1, seed=seed, device=device, betas=(0.9, 0.98))
    batches = DigitBatches(split.train_images, split.train_labels, seed, augment=True, captions=tokenizer,
                           max_tokens=MAX_CAPTION_TOKENS)
    result = train(model, clip_contrastive_loss, batches, settings, run, eval_batches, zero_shot, tokenizer=tokenizer)
    model.cpu().eval()
    accuracy = zero_shot_accuracy(model, tokenizer, test_pixels, test_labels, UNSEEN_TEMPLATES)
    save_model(model, run / MODEL_DIR, tokenizer)
    processing_for(1, DIGIT_IMAGE_SIZE).save(run / MODEL_DIR)
    plot = plot_training(run, "CLIP on digits", "zero_shot_accuracy", "zero-shot accuracy (unseen templates)")
    print(f"zero-shot accuracy with unseen templates {accuracy:.2%}; model: {run / MODEL_DIR}; plot: {plot}")
    return {"zero_shot_accuracy": accuracy, "model": str(run / MODEL_DIR), "plot": str(plot),
            "train_loss": result.train_loss}


def class_text_embeddings(model: Any, tokenizer: Any, templates: Any, n_classes: int = 10) -> Any:
    """One text embedding per digit (n_classes, D): the normalised mean over `templates` of its captions' embeddings
    (CLIP's prompt ensembling)."""
    import torch
    import torch.nn.functional as F

    from llmkit.data.digits import caption, encode_captions

    device = next(model.parameters()).device
    with torch.no_grad():
        per_template = [model.text_embeddings(encode_captions(
            tokenizer, [caption(d, template) for d in range(n_classes)], model.config.text.max_seq_len).to(device))
            for template in templates]  # each (n_classes, D)
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)


def zero_shot_accuracy(model: Any, tokenizer: Any, pixels: Any, labels: Any, templates: Any) -> float:
    """Share of images whose most similar class embedding (`class_text_embeddings` over `templates`) is their
    digit."""
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    classes = class_text_embeddings(model, tokenizer, templates)
    with torch.no_grad():
        predictions = (model.image_embeddings(pixels.to(device)) @ classes.T).argmax(-1).cpu()
    model.train(was_training)
    return float((predictions == labels).float().mean())


def clip_classify(
    labels: list[str] | None = None,
    images: list[str] | None = None,
    model: str | None = None,
    device: Device = "auto",
) -> list[dict[str, Any]]:
    """Zero-shot classification: the probability of each label (a caption) for each image, by CLIP similarity.

    Example: llmkit clip classify                   (held-out digits, the model `clip train` wrote, 10 digit labels)
             llmkit clip classify --model runs/clip/model --labels "[a drawing of a one, a drawing of a seven]"
             llmkit clip classify --model clip-vit-base-patch32/ --labels "[a cat, a dog]" --images "[cat.jpg]"

    Probabilities are softmax(exp(t) * cosine similarity) over the labels, t the model's learned temperature.

    Args:
        labels: the candidate captions (default: "a drawing of a zero" ... "a drawing of a nine").
        images: image files (PNG, JPEG, ...); default: 8 held-out digits, each with its true digit.
        model: a CLIPModel directory or an llmkit CLIP (default: the one `llmkit clip train` writes).
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.checkpoints import load_config, load_model, load_tokenizer
    from llmkit.data.digits import caption, digit_pixels, encode_captions, load_digits_split
    from llmkit.data.images import CLIP_PROCESSING, ImageProcessing, load_image, preprocess
    from llmkit.device import resolve_device
    from llmkit.errors import LlmkitError

    directory = Path(model) if model is not None else builtin_run_dir(BUILTIN_RUN) / MODEL_DIR
    if model is None and not directory.is_dir():
        raise LlmkitError(f"--model not given and {directory} does not exist; run `llmkit clip train` first (a few "
                          "minutes) or pass --model DIR")
    if labels is None:
        labels = [caption(d, "a drawing of a {word}") for d in range(10)]
    try:
        config = load_config(directory)
    except LlmkitError as error:
        raise LlmkitError(f"--model: {error}") from None
    if config.arch != "clip":
        raise LlmkitError(f"--model: {directory} holds a {config.arch} model; pass a CLIP model (what `llmkit clip "
                          "train` writes, or a CLIPModel directory)")
    tokenizer = load_tokenizer(directory)
    tokenizer_ids = encode_captions(tokenizer, labels, config.text.max_seq_len, "--labels")
    clip = load_model(directory, device=device)
    if images:
        processing = ImageProcessing.load(directory, CLIP_PROCESSING)
        pixels, names, truths = preprocess([load_image(path, "--images") for path in images], processing), images, \
            [None] * len(images)
    else:
        split = load_digits_split()
        pixels, names = digit_pixels(split.test_images[:8]), [f"held-out digit {i}" for i in range(8)]
        truths = [int(label) for label in split.test_labels[:8]]
    target = resolve_device(device)
    with torch.no_grad():
        logits = clip(pixels.to(target), tokenizer_ids.to(target))  # (images, labels)
    probabilities = logits.softmax(-1).cpu()
    results = []
    for name, truth, row in zip(names, truths, probabilities):
        order = row.argsort(descending=True).tolist()
        shown = ", ".join(f"{labels[i]!r} {float(row[i]):.1%}" for i in order[:5])
        print(f"{name}: {shown}" + (f"  (true: {truth})" if truth is not None else ""))
        results.append({"image": name, "probabilities": {labels[i]: float(row[i]) for i in order}, "true": truth})
    return results
