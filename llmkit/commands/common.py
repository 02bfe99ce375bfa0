"""What several verbs share: the option types every verb spells the same way, and the default model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal

Device = str  # "auto", "cpu", "cuda", "cuda:1"
Dtype = Literal["float32", "bfloat16", "float16"]
GgufWeights = Literal["quantized", "float"]  # a quantized .gguf: keep the file's blocks, or dequantize at load


def model_path(model: str | None) -> Path:
    """The model a verb runs: the path given, or the default SmolLM2-135M-Instruct GGUF."""
    from llmkit.checkpoints import default_model_path

    return Path(model) if model else default_model_path()


def load_decoder(path: Path, dtype: str = "float32", device: str = "cpu",  # noqa: ANN201 (a Decoder)
                 weights: GgufWeights = "quantized", kv_cache_dtype: str | None = None, int8_prefill: bool = False):
    """The decoder at `path` for the verbs that run one: a quantized llmkit checkpoint through llmkit.quant (it stays
    packed); a .gguf whose matrices are quantized through llmkit.quant.load_gguf_quantized (the file's blocks kept:
    ~1/4 of the fp32 RAM and, measured on SmolLM2 Q4_1, 1.9x the fp32 decode speed on one thread; weights="float"
    dequantizes to fp32 at load instead); any other checkpoint through llmkit.checkpoints.load_model. `dtype` is that
    of the activations and float tensors. For the decode loop, q/k/v and gate/up projections are fused (one
    product each, float ones by llmkit.nn.fused, quantized ones on llmkit's GGUF kernels by llmkit.quant.fused;
    names, adapters and checkpoints still see the separate projections) and bfloat16 matrices get a
    oneDNN-packed copy (llmkit.nn.fused; measured in docs/benchmarks.md, "Decode speed"); a prompt's float32
    products run on oneDNN (llmkit.nn.fused.use_onednn_for_prompts: 1.1-4x MKL's GEMM here). `kv_cache_dtype` (None:
    `dtype`; float16 for a GGUF file run in float32: `gguf_kv_cache_dtype`) is the dtype its KV caches take
    (Decoder.kv_dtype). `int8_prefill` runs prompts through the Q4_0/Q4_1/Q8_0 layers with int8 activations
    (llmkit.quant.set_int8_prefill); a model without such layers says so on stderr and runs as before."""
    from llmkit.device import resolve_dtype
    from llmkit.nn.fused import fuse_projections, pack_bfloat16_weights, use_onednn_for_prompts
    from llmkit.quant.fused import fuse_quantized_projections

    model = _load_unfused_decoder(path, dtype, device, weights)
    model = use_onednn_for_prompts(pack_bfloat16_weights(fuse_projections(fuse_quantized_projections(model))))
    if kv_cache_dtype is None:
        kv_cache_dtype = gguf_kv_cache_dtype(path, dtype)
    if kv_cache_dtype is not None:
        model.kv_dtype = resolve_dtype(kv_cache_dtype)
    if int8_prefill:
        from llmkit.quant import set_int8_prefill

        if not set_int8_prefill(model):
            print(f"llmkit: --int8_prefill: {path} has no Q4_0/Q4_1/Q8_0 layers on llmkit's kernels; its prompts run "
                  "as without it", file=sys.stderr)
    return model


def gguf_kv_cache_dtype(path: Path, dtype: str) -> str | None:
    """The KV cache's dtype when the user names none: float16 for a GGUF file run with float32 activations, what
    llama.cpp keeps a GGUF model's cache in by default (half the memory and half the bytes each decode step reads:
    measured 1.0-1.1x decode on SmolLM2, the same greedy tokens at F16 and F32; docs/quantization.md), else None
    (the activations' dtype: a Hugging Face or llmkit checkpoint keeps transformers' float32 cache)."""
    import torch

    from llmkit.checkpoints import detect_format
    from llmkit.device import resolve_dtype

    return "float16" if resolve_dtype(dtype) == torch.float32 and detect_format(path) == "gguf" else None


def _load_unfused_decoder(path: Path, dtype: str, device: str, weights: GgufWeights):  # noqa: ANN202 (a Decoder)
    from llmkit.checkpoints import detect_format, load_model, require_arch
    from llmkit.quant import is_quantized_dir, load_quantized

    if weights not in ("quantized", "float"):
        from llmkit.errors import LlmkitError

        raise LlmkitError(f"weights={weights!r}: choose 'quantized' (keep a GGUF's blocks) or 'float' (dequantize)")
    if weights == "quantized" and detect_format(path) == "gguf":
        from llmkit.quant.gguf_load import is_quantized_gguf, load_gguf_quantized

        if is_quantized_gguf(path):
            return load_gguf_quantized(path, dtype=dtype, device=device)
    if is_quantized_dir(path):
        from llmkit.checkpoints import load_config

        require_arch(load_config(path), "decoder", path)
        return load_quantized(path, dtype=dtype, device=device)
    return load_model(path, dtype=dtype, device=device, arch="decoder")


def local_model(model: str | None, dtype: str = "float32", device: str = "cpu", weights: GgufWeights = "quantized",
                batch_size: int | None = None):  # noqa: ANN201 (an llmkit.apps.LocalModel)
    """The decoder at `model` (default SmolLM2-135M-Instruct) and its tokenizer as an application model
    (llmkit.apps.LocalModel), loaded as `load_decoder` loads it; `batch_size` prompts per generate call."""
    from llmkit.apps import LocalModel
    from llmkit.checkpoints import load_tokenizer

    path = model_path(model)
    llm = LocalModel(load_decoder(path, dtype, device, weights), load_tokenizer(path))
    if batch_size is not None:
        llm.batch_size = batch_size
    return llm


def with_adapter(llm, adapter: str, path: Path):  # noqa: ANN001, ANN202 (torch types, imported lazily)
    """`llm` with the fine-tuned adapter directory `adapter` applied, in eval mode."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.peft.registry import load_adapter

    return load_adapter(llm, adapter, tokenizer=load_tokenizer(path)).eval()


def as_paths(data: list[str] | str | None) -> list[str]:
    """--data as a list: one path or a list of them (files or folders)."""
    if data is None:
        return []
    return [data] if isinstance(data, str) else list(data)


def refuse_writing_onto_inputs(output: str | Path, inputs: list[str], flag: str = "--output") -> None:
    """Raise when `output` is one of the inputs: a folder given as input, or any file read from them. llmkit never
    replaces the data it reads (`filter --output` onto its input once turned 45 lines into 40 without a word)."""
    from llmkit.data.sources import expand_inputs
    from llmkit.errors import LlmkitError

    target = Path(output).resolve()
    existing = [path for path in inputs if Path(path).exists()]
    read = {Path(path).resolve() for path in existing}
    try:
        read |= {path.resolve() for path in expand_inputs(existing)} if existing else set()
    except LlmkitError:  # an unreadable input: the verb reports it in its own words when it reads
        pass
    if target in read:
        raise LlmkitError(f"{flag} {output} is also an input (--data); choose another {flag}: llmkit never writes over "
                          "the data it reads")


def refuse_existing_file(output: str | Path, overwrite: bool, flag: str = "--output") -> None:
    """Raise when `output` already exists and --overwrite was not given (or it is a folder, not a file)."""
    from llmkit.errors import LlmkitError

    path = Path(output)
    if path.is_dir():
        raise LlmkitError(f"{flag} {output} is a folder; pass a file name")
    if path.exists() and not overwrite:
        raise LlmkitError(f"{flag} {output} already exists; pass --overwrite to replace it, or choose another {flag}")


def refuse_replacing_model_dir(output: str | Path, model: str | Path, overwrite: bool) -> None:
    """Raise unless `output` may receive a model: not a file, not the input model (or inside it), and empty or new
    unless --overwrite is given (then the files written are replaced and any others are left as they are)."""
    from llmkit.errors import LlmkitError
    from llmkit.io import TEMP_MARK

    path, source = Path(output), Path(model).resolve()
    if path.exists() and not path.is_dir():
        raise LlmkitError(f"--output {output} is a file; pass a directory for the model's files")
    if path.resolve() == source or source in path.resolve().parents:
        raise LlmkitError(f"--output {output} is the same as --model or inside it; choose another output directory")
    held = sorted(entry.name for entry in path.iterdir() if TEMP_MARK not in entry.name) if path.is_dir() else []
    if held and not overwrite:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise LlmkitError(f"--output {output} already holds files ({shown}); pass --overwrite to replace them, or "
                          "choose a new or empty directory")
