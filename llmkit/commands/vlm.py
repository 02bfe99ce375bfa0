"""`llmkit vlm train|ask`: a Flamingo- or LLaVA-style vision-language model (llmkit/models/vlm.py) joining a frozen ViT
trained on scikit-learn's digits to frozen SmolLM2-135M-Instruct, trained through the one loop to caption digits
("this is a handwritten 3."), and asked about an image, with in-context examples for Flamingo.

A model directory holds only the new parts and references to the frozen ones, like a PEFT adapter directory:
vlm_config.json (the VLMConfig, the language model's path, the vision model's path) and vlm.safetensors (the
resampler, gated layers and `<image>` embedding, or the projector).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import Device
from llmkit.commands.vision import MODEL_DIR, builtin_run_dir, plot_training

BUILTIN_RUN = "llmkit/vlm/{style}-digits"  # under $XDG_CACHE_HOME (default ~/.cache)
VLM_CONFIG_FILE = "vlm_config.json"
VLM_WEIGHTS_FILE = "vlm.safetensors"
VISION_DIR = "vision"  # a run's own ViT, when `vlm train` trains one
EVAL_IMAGES = 50  # held-out digits captioned at each evaluation
MAX_CAPTION_TOKENS = 10


def vlm_train(
    style: Literal["flamingo", "llava"] = "llava",
    output: str | None = None,
    model: str | None = None,
    vision: str | None = None,
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 1e-3,
    n_latents: int = 8,
    resampler_layers: int = 1,
    cross_attn_every: int = 6,
    projector: Literal["linear", "mlp"] = "mlp",
    max_shots: int = 2,
    vision_steps: int = 300,
    eval_every: int = 30,
    seed: int = 0,
    device: Device = "auto",
) -> dict[str, Any]:
    """Train a vision-language model to caption scikit-learn's handwritten digits ("this is a handwritten 3.").

    Example: llmkit vlm train                               (LLaVA-style on SmolLM2-135M-Instruct, ~7 minutes)
             llmkit vlm train --style flamingo --steps 100 --output runs/flamingo
             llmkit vlm ask --image three.png

    The language model and the ViT stay frozen; only the new parts train (Flamingo: a Perceiver resampler, gated
    cross-attention layers before every CROSS_ATTN_EVERY-th block and the <image> embedding; LLaVA: the projector),
    on the caption tokens only. Flamingo rows interleave 1 to MAX_SHOTS + 1 captioned digits, the form it is asked in
    with in-context examples. Evaluation captions 50 held-out digits (every 5th of each class) and counts those whose
    caption names the right digit. OUTPUT gets the loop's checkpoints/, metrics.jsonl, loss.png, accuracy.png and
    model/ (vlm_config.json + vlm.safetensors: the new parts only, and the paths of the frozen models).

    Args:
        style: flamingo (resampler + gated cross-attention) or llava (projector to the LM's embeddings).
        output: run directory (default: ~/.cache/llmkit/vlm/STYLE-digits; `vlm ask` reads the llava one).
        model: the frozen language model (any llmkit, Hugging Face or .gguf decoder; default SmolLM2-135M-Instruct).
        vision: an llmkit ViT directory (what `llmkit vision train` writes; default: that run's model if present,
            else a ViT trained here for VISION_STEPS steps into OUTPUT/vision).
        steps: optimizer steps.
        batch_size: rows per step.
        lr: peak learning rate (AdamW, warmup then cosine decay).
        n_latents: Flamingo: visual tokens per image out of the resampler.
        resampler_layers: Flamingo: Perceiver resampler layers.
        cross_attn_every: Flamingo: a gated cross-attention layer before every this many decoder blocks.
        projector: LLaVA: linear or mlp (two layers with GELU, LLaVA-1.5).
        max_shots: Flamingo: most captioned examples before a training row's last image.
        vision_steps: steps of the ViT trained here when there is none.
        eval_every: steps between held-out caption evaluations.
        seed: random seed (new weights, data order).
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.commands.common import model_path
    from llmkit.data.digits import load_digits_split
    from llmkit.data.vlm_data import VLMBatches
    from llmkit.errors import LlmkitError
    from llmkit.models.vlm import VLMConfig, build_vlm, image_token_id
    from llmkit.peft.core import trainable_table
    from llmkit.train.loop import train
    from llmkit.train.objectives import vlm_caption_loss
    from llmkit.train.settings import TrainSettings

    for flag, value in (("--steps", steps), ("--batch_size", batch_size), ("--vision_steps", vision_steps)):
        if value < 1:
            raise LlmkitError(f"{flag}={value} must be at least 1")
    if max_shots < 0:
        raise LlmkitError(f"--max_shots={max_shots} must be 0 or more")
    config = VLMConfig(style=style, name=f"{style}-digits", n_latents=n_latents, resampler_layers=resampler_layers,
                       cross_attn_every=cross_attn_every, projector=projector)
    run = Path(output) if output else builtin_run_dir(BUILTIN_RUN.format(style=style))
    lm_path = model_path(model).resolve()
    vision_dir = _vision_dir(vision, run, vision_steps, seed, device)
    tokenizer = load_tokenizer(lm_path)
    decoder = load_model(lm_path, "float32", "cpu", arch="decoder")
    torch.manual_seed(seed)
    vlm = build_vlm(decoder, _load_vit(vision_dir, "--vision"), config)
    print(trainable_table(vlm))
    marker = image_token_id(vlm.decoder)
    per_image = vlm.tokens_per_image if style == "llava" else 1
    split = load_digits_split()
    shots = max_shots if style == "flamingo" else 0
    batches = VLMBatches(split.train_images, split.train_labels, tokenizer, marker, per_image, shots, seed)
    held_out = VLMBatches(split.test_images, split.test_labels, tokenizer, marker, per_image, shots, seed,
                          augment=False)
    eval_batches = lambda: (held_out(i * batch_size, batch_size) for i in range(4))

    def caption_eval(model: torch.nn.Module, step: int) -> dict[str, float]:
        accuracy = caption_accuracy(model, tokenizer, split, 0, EVAL_IMAGES)["accuracy"]
        print(f"step {step}: held-out caption accuracy (0 shots, {EVAL_IMAGES} digits) {accuracy:.0%}")
        return {"caption_accuracy": accuracy}

    settings = TrainSettings(max_steps=steps, batch_size=batch_size, lr=lr, warmup_steps=min(10, steps // 10),
                             weight_decay=0.0, eval_every=eval_every, eval_batches=4, log_every=5,
                             checkpoint_every=steps, keep_last=1, seed=seed, device=device)
    result = train(vlm, vlm_caption_loss, batches, settings, run, eval_batches, caption_eval)
    vlm.cpu().eval()
    save_vlm(vlm, run / MODEL_DIR, lm_path, vision_dir)
    plot = plot_training(run, f"{style} on digits", "caption_accuracy", "held-out caption accuracy (0 shots)")
    accuracy = caption_accuracy(vlm, tokenizer, split, 0, EVAL_IMAGES)
    print(f"held-out caption accuracy {accuracy['accuracy']:.0%}; e.g. {accuracy['examples'][0]!r}; model: "
          f"{run / MODEL_DIR}; plot: {plot}")
    return {"accuracy": accuracy["accuracy"], "model": str(run / MODEL_DIR), "plot": str(plot),
            "train_loss": result.train_loss}


def _vision_dir(vision: str | None, run: Path, steps: int, seed: int, device: str) -> Path:
    """--vision, else `vision train`'s default model, else a ViT trained now into RUN/vision."""
    if vision is not None:
        return Path(vision).resolve()
    default = builtin_run_dir() / MODEL_DIR
    if default.is_dir():
        return default.resolve()
    from llmkit.commands.vision import vision_train

    print(f"no ViT at {default}: training one for {steps} steps into {run / VISION_DIR}")
    return Path(vision_train(output=str(run / VISION_DIR), steps=steps, seed=seed, device=device)["model"]).resolve()


def _load_vit(directory: Path, flag: str) -> Any:
    """The ViT of an llmkit vision directory (a classifier's encoder), frozen by the VLM."""
    from llmkit.checkpoints import load_config, load_model
    from llmkit.errors import LlmkitError

    try:
        config = load_config(directory)
    except LlmkitError as error:
        raise LlmkitError(f"{flag}: {error}") from None
    if getattr(config, "arch", None) != "vision":
        raise LlmkitError(f"{flag}: {directory} holds no ViT; pass what `llmkit vision train` writes (RUN/model)")
    vit = load_model(directory)
    return getattr(vit, "encoder", vit)


def save_vlm(model: Any, directory: Path, language_model: Path, vision_model: Path) -> Path:
    """The new parts' tensors (vlm.safetensors) and vlm_config.json naming the frozen models, each atomically."""
    from safetensors.torch import save_file

    from llmkit.io import atomic_write, atomic_write_text
    from llmkit.peft.core import trainable_state_dict

    tensors = {name: tensor.contiguous().cpu() for name, tensor in trainable_state_dict(model).items()}
    record = {"vlm": model.config.to_dict(), "language_model": str(language_model), "vision_model": str(vision_model)}
    atomic_write(directory / VLM_WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp)))
    atomic_write_text(directory / VLM_CONFIG_FILE, json.dumps(record, indent=2))
    return directory


def load_vlm(directory: str | Path, device: str = "cpu", flag: str = "--model") -> tuple[Any, Any]:
    """(model, tokenizer) of a `vlm train` model directory: the frozen models it names, its new parts loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.errors import LlmkitError
    from llmkit.io import read_json_object
    from llmkit.models.vlm import VLMConfig, build_vlm
    from llmkit.peft.core import load_trained_tensors

    directory = Path(directory)
    if not (directory / VLM_CONFIG_FILE).is_file():
        raise LlmkitError(f"{flag}: {directory} has no {VLM_CONFIG_FILE}; pass the model/ folder `llmkit vlm train` "
                          "wrote")
    record = read_json_object(directory / VLM_CONFIG_FILE)
    try:
        config = VLMConfig(**record["vlm"])
        language_model, vision_model = Path(record["language_model"]), Path(record["vision_model"])
        tensors = load_file(str(directory / VLM_WEIGHTS_FILE))
    except (KeyError, TypeError) as error:
        raise LlmkitError(f"{flag}: {directory / VLM_CONFIG_FILE} lacks {error}; train the model again") from None
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{flag}: {directory / VLM_WEIGHTS_FILE} is missing or unreadable ({error})") from None
    for path, what in ((language_model, "language model"), (vision_model, "vision model")):
        if not path.exists():
            raise LlmkitError(f"{flag}: the {what} {path} that {directory} was trained on is gone; restore it or train "
                              "again")
    decoder = load_model(language_model, "float32", "cpu", arch="decoder")
    model = build_vlm(decoder, _load_vit(vision_model, flag), config)
    load_trained_tensors(model, tensors, directory / VLM_WEIGHTS_FILE)
    from llmkit.device import resolve_device

    return model.to(resolve_device(device)).eval(), load_tokenizer(language_model)


def generate_captions(model: Any, tokenizer: Any, prompts: list[list[int]], pixel_values: Any,
                      max_new_tokens: int = MAX_CAPTION_TOKENS) -> list[str]:
    """Greedy continuations (up to a newline) of prompts (token ids with `<image>` markers), one row per prompt, its
    images pixel_values (B, M, C, H, W), decoded with a KV cache; rows are left-padded to one length."""
    import torch

    from llmkit.data.vlm_data import left_pad
    from llmkit.models.vlm import FlamingoVLM, image_token_id

    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    ids, mask = left_pad(prompts, pad)
    ids, mask, pixel_values = ids.to(device), mask.to(device), pixel_values.to(device)
    cache = model.decoder.new_cache(len(prompts), ids.shape[1] + max_new_tokens)
    generated: list[list[int]] = [[] for _ in prompts]
    with torch.no_grad():
        if isinstance(model, FlamingoVLM):
            visual = model.visual_tokens(pixel_values)
            images_before = (ids == image_token_id(model.decoder)).sum(dim=1)
            step = lambda tokens: model(tokens, cache=cache, visual=visual, images_before=images_before)
            logits = model(ids, cache=cache, attention_mask=mask, visual=visual)
        else:
            step = lambda tokens: model(tokens, cache=cache)
            logits = model(ids, pixel_values, cache=cache, attention_mask=mask)
        for _ in range(max_new_tokens):
            tokens = logits[:, -1].argmax(-1)  # (B,)
            for row, token in zip(generated, tokens.tolist()):
                row.append(token)
            texts = [tokenizer.decode(row, skip_special_tokens=True) for row in generated]
            if all("\n" in text or row[-1] == tokenizer.eos_id for text, row in zip(texts, generated)):
                break
            logits = step(tokens[:, None])
    return [tokenizer.decode(row, skip_special_tokens=True).split("\n")[0] for row in generated]


def caption_accuracy(model: Any, tokenizer: Any, split: Any, shots: int, n_images: int, seed: int = 0,
                     batch_size: int = 25) -> dict[str, Any]:
    """Share of the first `n_images` held-out digits whose greedy caption names their digit, each asked after
    `shots` captioned training digits drawn at random (Flamingo's in-context examples); and example captions."""
    import torch

    from llmkit.data.digits import digit_pixels
    from llmkit.data.vlm_data import digit_named, few_shot_ids
    from llmkit.models.vlm import image_token_id

    was_training = model.training
    model.eval()
    per_image = getattr(model, "tokens_per_image", 1) if model.config.style == "llava" else 1
    marker = image_token_id(model.decoder)
    generator = torch.Generator().manual_seed(seed)
    shot_index = torch.randint(len(split.train_labels), (n_images, shots), generator=generator)
    train_pixels, test_pixels = digit_pixels(split.train_images), digit_pixels(split.test_images)
    correct, examples = 0, []
    for start in range(0, n_images, batch_size):
        rows = range(start, min(start + batch_size, n_images))
        prompts = [few_shot_ids(tokenizer, [int(split.train_labels[i]) for i in shot_index[r]], marker, per_image)
                   for r in rows]
        pixels = torch.stack([torch.cat([train_pixels[shot_index[r]], test_pixels[r : r + 1]]) for r in rows])
        captions = generate_captions(model, tokenizer, prompts, pixels)
        for r, text in zip(rows, captions):
            correct += digit_named(text) == int(split.test_labels[r])
            examples.append(f"{int(split.test_labels[r])}: {text.strip()}")
    model.train(was_training)
    return {"accuracy": correct / n_images, "examples": examples}


def vlm_ask(
    image: str | None = None,
    prompt: str = "What digit is this?",
    model: str | None = None,
    shots: int = 0,
    max_new_tokens: int = MAX_CAPTION_TOKENS,
    device: Device = "auto",
) -> dict[str, Any]:
    """Ask a vision-language model about an image; Flamingo can first see captioned examples (in-context learning).

    Example: llmkit vlm ask                                  (a held-out digit, the LLaVA model `vlm train` wrote)
             llmkit vlm ask --image three.png --prompt "What digit is this?"
             llmkit vlm ask --model runs/flamingo/model --image three.png --shots 4

    Images are preprocessed as the ViT's directory says (8x8 grey, light ink on dark, like scikit-learn's digits).

    Args:
        image: an image file (PNG, JPEG, ...); default: the first held-out digit.
        prompt: the text after the image.
        model: a `vlm train` model directory (default: the LLaVA one `llmkit vlm train` writes).
        shots: Flamingo: captioned training digits shown before the image (in-context examples).
        max_new_tokens: most tokens generated.
        device: auto, cpu, cuda or cuda:N.
    """
    import torch

    from llmkit.data.digits import digit_pixels, load_digits_split
    from llmkit.data.images import load_image, preprocess, processing_for
    from llmkit.data.vlm_data import few_shot_ids
    from llmkit.errors import LlmkitError
    from llmkit.models.vlm import image_token_id

    if shots < 0:
        raise LlmkitError(f"--shots={shots} must be 0 or more")
    if max_new_tokens < 1:
        raise LlmkitError(f"--max_new_tokens={max_new_tokens} must be at least 1")
    directory = Path(model) if model is not None else builtin_run_dir(BUILTIN_RUN.format(style="llava")) / MODEL_DIR
    if model is None and not directory.is_dir():
        raise LlmkitError(f"--model not given and {directory} does not exist; run `llmkit vlm train` first (a few "
                          "minutes) or pass --model DIR")
    config = _read_style(directory)
    if shots and config != "flamingo":
        raise LlmkitError(f"--shots={shots}: in-context examples need a Flamingo model; {directory} is {config}")
    if image is not None:
        picture = load_image(image, "--image")  # before loading the models: a bad file fails fast
    vlm, tokenizer = load_vlm(directory, device)
    split = load_digits_split()
    if image is not None:
        vision = vlm.vision.config
        query = preprocess([picture], processing_for(vision.n_channels, vision.image_size,
                                                      _vision_path(directory)))  # (1, C, H, W)
        truth = None
    else:
        query, truth = digit_pixels(split.test_images[:1]), int(split.test_labels[0])
    generator = torch.Generator().manual_seed(0)
    chosen = torch.randint(len(split.train_labels), (shots,), generator=generator)
    per_image = vlm.tokens_per_image if config == "llava" else 1
    ids = few_shot_ids(tokenizer, [int(split.train_labels[i]) for i in chosen], image_token_id(vlm.decoder),
                       per_image, question=prompt)
    pixels = torch.cat([digit_pixels(split.train_images[chosen.numpy()]), query])[None]  # (1, shots + 1, C, H, W)
    answer = generate_captions(vlm, tokenizer, [ids], pixels, max_new_tokens)[0]
    print(f"{image or 'held-out digit 0'}: {answer.strip()}" + (f"  (true: {truth})" if truth is not None else ""))
    return {"image": image, "answer": answer, "shots": shots, "true": truth}


def _read_style(directory: Path) -> str:
    from llmkit.errors import LlmkitError
    from llmkit.io import read_json_object

    if not (directory / VLM_CONFIG_FILE).is_file():
        raise LlmkitError(f"--model: {directory} has no {VLM_CONFIG_FILE}; pass the model/ folder `llmkit vlm train` "
                          "wrote")
    style = read_json_object(directory / VLM_CONFIG_FILE).get("vlm", {}).get("style")
    if style not in ("flamingo", "llava"):
        raise LlmkitError(f"--model: {directory / VLM_CONFIG_FILE} names no style (flamingo or llava); train again")
    return style


def _vision_path(directory: Path) -> Path:
    from llmkit.io import read_json_object

    return Path(read_json_object(directory / VLM_CONFIG_FILE)["vision_model"])
