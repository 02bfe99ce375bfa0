"""Images in: load a file (PIL), resize, center-crop, rescale and normalise into the pixel tensor a ViT or CLIP reads,
step for step as transformers' `ViTImageProcessor` and `CLIPImageProcessor` (PIL backend) do, so an imported
checkpoint sees the pixels it was trained on.

    ViT   resize to (224, 224), bilinear            -> x / 255 -> (x - 0.5) / 0.5
    CLIP  resize the shorter side to 224, bicubic   -> center crop 224 x 224 -> x / 255 -> (x - mean) / std

`ImageProcessing` holds those choices and reads/writes them as the `preprocessor_config.json` of a model
directory (transformers' file), so a trained llmkit model carries its own preprocessing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkit.errors import LlmkitError

PREPROCESSOR_FILE = "preprocessor_config.json"
# PIL's resampling filters by number, as transformers writes them in preprocessor_config.json
NEAREST, BILINEAR, BICUBIC = 0, 2, 3
IMAGENET_STANDARD_MEAN = IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)  # transformers' ViT defaults
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageProcessing:
    """How an image becomes pixels: resize (to `size` (height, width), or the shorter side to `shortest_edge`
    keeping the aspect ratio), an optional center crop, x * rescale, then (x - mean) / std per channel.
    `grayscale` gives one channel (llmkit's digit models), otherwise RGB."""

    size: tuple[int, int] | None = (224, 224)
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    resample: int = BILINEAR
    rescale: float = 1 / 255
    mean: tuple[float, ...] = IMAGENET_STANDARD_MEAN
    std: tuple[float, ...] = IMAGENET_STANDARD_STD
    grayscale: bool = False

    def __post_init__(self) -> None:
        if (self.size is None) == (self.shortest_edge is None):
            raise LlmkitError("image processing resizes to exactly one of size (height, width) or shortest_edge; set "
                              "one of them")
        channels = 1 if self.grayscale else 3
        if len(self.mean) != channels or len(self.std) != channels or min(self.std) <= 0:
            raise LlmkitError(f"image processing: mean {self.mean} and std {self.std} need {channels} values each "
                              "(std positive)")

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) of the pixels this gives, when fixed (a crop or an exact size)."""
        return self.crop or self.size or (self.shortest_edge, self.shortest_edge)

    def to_hf(self) -> dict[str, Any]:
        """transformers' preprocessor_config.json fields for these choices."""
        size = ({"height": self.size[0], "width": self.size[1]} if self.size else
                {"shortest_edge": self.shortest_edge})
        data: dict[str, Any] = dict(
            image_processor_type="CLIPImageProcessor" if self.crop else "ViTImageProcessor", do_resize=True,
            size=size, resample=self.resample, do_center_crop=self.crop is not None, do_rescale=True,
            rescale_factor=self.rescale, do_normalize=True, image_mean=list(self.mean), image_std=list(self.std),
            do_convert_rgb=not self.grayscale, llmkit_grayscale=self.grayscale)
        if self.crop:
            data["crop_size"] = {"height": self.crop[0], "width": self.crop[1]}
        return data

    def save(self, directory: str | Path) -> None:
        from llmkit.io import atomic_write_text

        atomic_write_text(Path(directory) / PREPROCESSOR_FILE, json.dumps(self.to_hf(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, default: ImageProcessing | None = None) -> ImageProcessing:
        """A model directory's preprocessor_config.json; `default` (or an error) when it has none."""
        from llmkit.io import read_json_object

        path = Path(directory) / PREPROCESSOR_FILE
        if not path.is_file():
            if default is not None:
                return default
            raise LlmkitError(f"{path} is missing; the model directory does not say how to preprocess images")
        data = read_json_object(path)
        try:
            size = data.get("size") or {"height": 224, "width": 224}
            crop = data.get("crop_size") if data.get("do_center_crop") else None
            return cls(size=(size["height"], size["width"]) if "height" in size else None,
                       shortest_edge=size.get("shortest_edge"), crop=(crop["height"], crop["width"]) if crop else None,
                       resample=int(data.get("resample", BILINEAR)), rescale=float(data.get("rescale_factor", 1 / 255)),
                       mean=tuple(data.get("image_mean", IMAGENET_STANDARD_MEAN)),
                       std=tuple(data.get("image_std", IMAGENET_STANDARD_STD)),
                       grayscale=bool(data.get("llmkit_grayscale", False)))
        except (KeyError, TypeError, ValueError) as error:
            raise LlmkitError(f"{path}: not an image processor config transformers or llmkit wrote ({error!r})") from None


VIT_PROCESSING = ImageProcessing()  # transformers' ViTImageProcessor defaults
CLIP_PROCESSING = ImageProcessing(size=None, shortest_edge=224, crop=(224, 224), resample=BICUBIC,
                                  mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


def load_image(path: str | Path, flag: str = "IMAGES"):  # noqa: ANN201 (a PIL image; PIL is imported lazily)
    """The image in a file (any format PIL reads); a missing file or one that is not an image is one error naming
    `flag`, the argument it came from."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise LlmkitError(f"{flag}: {path} does not exist or is not a file; pass image files (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError) as error:
        raise LlmkitError(f"{flag}: {path} is not an image PIL can read ({error}); pass a PNG, JPEG, ...") from None


def preprocess(images: Sequence[Any], processing: ImageProcessing) -> torch.Tensor:
    """Pixels (B, C, H, W) float32 of PIL images or uint8 arrays (H, W) / (H, W, 3), each resized, cropped, rescaled
    and normalised as `processing` says."""
    return torch.stack([torch.from_numpy(_pixels(image, processing)) for image in images])


def _pixels(image: Any, processing: ImageProcessing) -> np.ndarray:
    """One image's (C, H, W) float32 pixels."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image = image.convert("L" if processing.grayscale else "RGB")
    if processing.size is not None:
        height, width = processing.size
    else:
        height, width = _shortest_edge_size(image.height, image.width, processing.shortest_edge)
    image = image.resize((width, height), resample=processing.resample)
    array = np.asarray(image).astype(np.float32)  # (H, W) or (H, W, 3), 0..255
    array = array[:, :, None] if array.ndim == 2 else array
    if processing.crop is not None:
        array = center_crop(array, *processing.crop)
    array = array * np.float32(processing.rescale)
    array = (array - np.asarray(processing.mean, dtype=np.float32)) / np.asarray(processing.std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))  # (C, H, W)


def _shortest_edge_size(height: int, width: int, edge: int) -> tuple[int, int]:
    """(height, width) with the shorter side `edge` and the longer scaled to keep the aspect ratio (rounded down, as
    transformers' get_resize_output_image_size)."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(edge * long / short)
    return (new_long, edge) if width <= height else (edge, new_long)


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The central (height, width) window of an (H, W, C) array (top/left offsets rounded down)."""
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    if top < 0 or left < 0:
        raise LlmkitError(f"cannot crop {height}x{width} from a {array.shape[0]}x{array.shape[1]} image; resize it "
                          "larger first")
    return array[top : top + height, left : left + width]


def processing_for(n_channels: int, image_size: int, directory: str | Path | None = None) -> ImageProcessing:
    """A model's preprocessing: its directory's preprocessor_config.json when there is one, else ViT's defaults at
    its image size (one channel: grayscale)."""
    default = replace(VIT_PROCESSING, size=(image_size, image_size), grayscale=n_channels == 1,
                      mean=VIT_PROCESSING.mean[:n_channels], std=VIT_PROCESSING.std[:n_channels])
    return ImageProcessing.load(directory, default) if directory is not None else default


def sample_photos() -> dict[str, np.ndarray]:
    """Real photos shipped in scikit-image (`skimage.data`), uint8 RGB: the astronaut, Chelsea the cat, coffee, a
    rocket."""
    from skimage import data

    return {name: getattr(data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
