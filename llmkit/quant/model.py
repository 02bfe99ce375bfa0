"""Quantize a whole model and keep it quantized on disk. Transformations are functions model -> model:

    quantize(model, scheme, group_size, targets, head) -> model   each target nn.Linear -> QuantLinear (in place)
    dequantize(model) -> model                                   each QuantLinear -> Linear holding W_hat (inverse)

Native quantized checkpoint (a directory): config.json (the llmkit Config, unchanged), quantization.json (scheme,
group size, the quantized layers' names, whether the LM head is quantized and, for a calibrated method, its
`provenance`: method, group size, calibration tokens, GPTQ's damping / AWQ's alphas), model.safetensors with every
float tensor under its usual name and, for a quantized layer `L`, its packed tensors as `L.weight.<name>`
(QuantizedWeight.tensors, e.g. `L.weight.qweight` int8 + `L.weight.scale` fp32) plus `L.bias`. Loading reads the
packed tensors as they are: the model's RAM is about the file's size. `llmkit.checkpoints` (a lower layer) refuses
such a directory with a message naming `load_quantized`; the CLI verbs route quantized directories here
(llmkit/commands/common.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmkit.checkpoints import network_for, saved_config
from llmkit.checkpoints.native import CONFIG_FILE, QUANTIZATION_FILE, WEIGHTS_FILE, save_native
from llmkit.config import Config
from llmkit.device import resolve_device, resolve_dtype
from llmkit.errors import LlmkitError
from llmkit.io import atomic_write_text, read_json_object
from llmkit.models.decoder import Decoder
from llmkit.nn.linear import Linear
from llmkit.quant.formats import get_format
from llmkit.quant.linear import QuantLinear
from llmkit.quant.nf4 import NF4Linear
from llmkit.quant.packed import QuantizedWeight

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
HEAD = "lm_head"
PROVENANCE_ATTRIBUTE = "quantization_provenance"  # a calibrated method (gptq, awq) leaves on the model how it ran
QUANTIZATION_VERSION = 1


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}


def quantize(
    model: nn.Module, scheme: str, group_size: int | None = None, targets: tuple[str, ...] = DEFAULT_TARGETS,
    head: bool = False,
) -> nn.Module:
    """Replace each nn.Linear whose attribute name is in `targets` by a QuantLinear of `scheme` (in place; returns
    the model). head=True also quantizes the LM head (a tied head gets its own quantized copy; the embedding table
    stays float for the lookup)."""
    fmt = get_format(scheme)
    if quantized_layers(model) or any(isinstance(m, NF4Linear) for m in model.modules()):
        raise LlmkitError("the model is already quantized; quantize its float original, or call "
                          "llmkit.quant.dequantize(model) first")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets and name != HEAD]
    if not found:
        raise LlmkitError(f"no linear layer named {list(targets)} in the model; pass targets that name its layers")
    for width in sorted({linear.in_features for _, linear in found}):  # every shape checked before anything changes
        # raises naming --group_size (grouped formats) or the format's block (GGUF formats: rows are whole blocks)
        if not fmt.groups or width % (group_size or fmt.groups[0]):
            fmt.quantize(torch.zeros(1, width), group_size)
    with torch.no_grad():
        for name, linear in found:
            parent, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent), attribute, QuantLinear.from_linear(linear, scheme, group_size))
        if head:
            if not isinstance(model, Decoder):
                raise LlmkitError("head=True quantizes a decoder's LM head; this model is not a decoder")
            weight = model.lm_head.weight if model.lm_head is not None else model.embed.weight
            model.lm_head = QuantLinear(fmt.quantize(weight, group_size), int8_activations=False).to(weight.device)
    return model


def dequantize(model: nn.Module) -> nn.Module:
    """Inverse of `quantize`: every QuantLinear becomes a float Linear holding W_hat (fp32); a quantized copy of a
    tied head is dropped again. In place; returns the model."""
    layers = quantized_layers(model)
    if not layers:
        raise LlmkitError("the model holds no QuantLinear layer; nothing to dequantize")
    for name, layer in layers.items():
        if name == HEAD and isinstance(model, Decoder) and model.config.tie_embeddings:
            model.lm_head = None
            continue
        linear = Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                        device=next(layer.buffers()).device)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantized_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, linear.requires_grad_(False))
    return model


def scheme_of(model: nn.Module) -> tuple[str, int | None]:
    schemes = {(layer.scheme, layer.group_size) for layer in quantized_layers(model).values()}
    if len(schemes) != 1:
        raise LlmkitError(f"a quantized checkpoint holds one scheme; this model has {sorted(map(str, schemes))}")
    return schemes.pop()


def save_quantized(model: nn.Module, out_dir: str | Path, tokenizer=None) -> None:  # noqa: ANN001 (Tokenizer)
    """Write a quantized model as a native quantized checkpoint (each file atomically)."""
    scheme, group_size = scheme_of(model)
    layers = quantized_layers(model)
    state = {name: t for name, t in model.state_dict().items()
             if not any(name.startswith(layer + ".") for layer in layers)}
    for name, layer in layers.items():
        state.update({f"{name}.weight.{key}": t for key, t in layer.packed.tensors.items()})
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias
    info = {"version": QUANTIZATION_VERSION, "scheme": scheme, "group_size": group_size,
            "layers": sorted(name for name in layers if name != HEAD), "head": HEAD in layers}
    provenance = getattr(model, PROVENANCE_ATTRIBUTE, None)
    if provenance:
        info["provenance"] = provenance
    save_native(saved_config(model), state, out_dir)
    atomic_write_text(Path(out_dir) / QUANTIZATION_FILE, json.dumps(info, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out_dir)


def is_quantized_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / QUANTIZATION_FILE).is_file()


def read_quantization(path: str | Path) -> dict:
    """quantization.json of a quantized checkpoint, checked."""
    info = read_json_object(Path(path) / QUANTIZATION_FILE)
    if info.get("version") != QUANTIZATION_VERSION or not isinstance(info.get("layers"), list):
        raise LlmkitError(f"{Path(path) / QUANTIZATION_FILE} is not a version-{QUANTIZATION_VERSION} llmkit "
                          "quantization file; re-run llmkit quantize on the float model")
    get_format(info.get("scheme"))
    return info


def load_quantized(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> nn.Module:
    """A quantized checkpoint as a ready-to-run model (eval mode) whose quantized layers stay packed; float tensors
    (embedding, norms, biases) in `dtype`."""
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    path = Path(path)
    info, config = read_quantization(path), Config.load(path / CONFIG_FILE)
    try:
        with safe_open(str(path / WEIGHTS_FILE), framework="pt") as file:  # one allocation per tensor: aligned,
            tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (and freed one by one)
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{path / WEIGHTS_FILE} is not a readable safetensors file ({error}); re-run llmkit "
                          "quantize") from None
    with torch.device("meta"):
        model = network_for(config)
    names = info["layers"] + ([HEAD] if info["head"] else [])
    for name in names:
        prefix = f"{name}.weight."
        packed_tensors = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        bias = tensors.pop(f"{name}.bias", None)
        if not packed_tensors:
            raise LlmkitError(f"{path / WEIGHTS_FILE} has no packed tensors for layer {name}; re-run llmkit quantize")
        old = model.get_submodule(name) if name != HEAD or model.lm_head is not None else None
        shape = (old.out_features, old.in_features) if old is not None else tuple(model.embed.weight.shape)
        layer = QuantLinear(QuantizedWeight(info["scheme"], shape, info["group_size"], packed_tensors),
                            None if bias is None else bias.to(dtype), int8_activations=name != HEAD)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attribute, layer)
    expected = {k for k in model.state_dict() if not any(k.startswith(n + ".") for n in names)}
    if set(tensors) != expected:
        raise LlmkitError(f"{path / WEIGHTS_FILE} does not fit {CONFIG_FILE}: missing "
                          f"{sorted(expected - set(tensors))[:4]}, unexpected {sorted(set(tensors) - expected)[:4]}")
    model.load_state_dict({k: t.to(dtype) for k, t in tensors.items()}, strict=False, assign=True)
    if isinstance(model, Decoder):
        model.reset_position_buffers()
    if info.get("provenance"):  # saving it again keeps how it was calibrated
        setattr(model, PROVENANCE_ATTRIBUTE, info["provenance"])
    return model.to(device).eval()
