"""`llmkit info`: a model's shape, parameter count and memory needs, read from its config alone."""

from __future__ import annotations

from llmkit.commands.common import model_path
from llmkit.gguf_file import GgufFile


def info(model: str | None = None) -> None:
    """Show a model's configuration, parameter count and memory needs at each dtype.

    Example: llmkit info                      (the default SmolLM2-135M-Instruct)
             llmkit info --model gpt2         (a named preset: no weights needed)
             llmkit info --model my_model/

    Args:
        model: a preset name (see llmkit.presets), a .gguf file, a Hugging Face directory or an llmkit directory.
    """
    from llmkit.config import Config
    from llmkit.presets import PRESETS

    if model in PRESETS:
        config = Config.from_name(model)
    else:
        from llmkit.checkpoints import detect_format, load_config
        from llmkit.checkpoints.gguf import config_from_gguf, open_gguf

        path = model_path(model)
        reader = open_gguf(path) if detect_format(path) == "gguf" else None  # the header only: no weights are read
        config = config_from_gguf(reader) if reader is not None else load_config(path)
    print(format_info(config))
    if model not in PRESETS:
        from llmkit.quant import is_quantized_dir

        if is_quantized_dir(path):
            print(format_quantization(path))
        elif reader is not None:
            print(format_gguf_types(reader))


def format_gguf_types(reader: GgufFile) -> str:
    """Tensors per GGUF type and their bytes, from the file's header (no weights are read). chat/generate/evaluate
    keep the quantized types as they are stored, so the weights take about these bytes in RAM."""
    from llmkit.quant.gguf_load import FLOAT_TYPES, tensor_type_counts

    counts = tensor_type_counts(reader)
    lines = ["", "  GGUF tensors"]
    for name, (count, size) in counts.items():
        lines.append(f"    {name:<8} {count:4d} tensors  {size / 2**20:10,.1f} MiB")
    if any(name not in {kind.name for kind in FLOAT_TYPES} for name in counts):
        total = sum(size for _, size in counts.values()) / 2**20
        lines.append(f"  loaded quantized (the default of chat/generate/evaluate): the types above are kept, about "
                     f"{total:,.1f} MiB of weights; the float rows above are what a dequantized load takes")
    return "\n".join(lines)


def format_quantization(path) -> str:  # noqa: ANN001 (Path)
    """Scheme, quantized layers and the weights' RAM (= model.safetensors: it loads packed, as stored)."""
    from llmkit.checkpoints.native import WEIGHTS_FILE
    from llmkit.quant.model import read_quantization

    info = read_quantization(path)
    group = f", group size {info['group_size']}" if info["group_size"] else ""
    head = " + LM head" if info["head"] else ""
    ram = (path / WEIGHTS_FILE).stat().st_size / 2**20
    return (f"\n  quantized        {info['scheme']}{group}, {len(info['layers'])} linear layers{head}\n"
            f"  weights in RAM   {ram:,.1f} MiB (packed as in {WEIGHTS_FILE}; the float rows above are for comparison)"
            + (f"\n  calibrated       {format_provenance(info['provenance'])}" if info.get("provenance") else ""))


def format_provenance(provenance: dict) -> str:
    """One line on how a calibrated checkpoint was made (quantization.json's provenance, written by gptq / awq)."""
    line = (f"{provenance.get('method')}, group size {provenance.get('group_size')}, "
            f"{provenance.get('calibration_tokens', 0):,} calibration tokens")
    if "damp" in provenance:
        line += f", damp {provenance['damp']}" + (", act_order" if provenance.get("act_order") else "")
    alphas = [a for block in provenance.get("alphas", []) for a in block if a is not None]
    if alphas:
        line += (f", alpha searched on a {provenance.get('alpha_grid')}-point grid: mean {sum(alphas) / len(alphas):.2f}"
                 f" ({min(alphas):.2f} to {max(alphas):.2f} over {len(alphas)} scale groups)")
    return line


def format_info(config) -> str:  # noqa: ANN001 (Config; imported lazily to keep `--help` fast)
    """A readable table of a Config: shape, parameters, weight memory per dtype, KV-cache size."""
    from llmkit.estimate import count_parameters, kv_cache_bytes

    parameters = count_parameters(config)
    lines = [f"model {config.name}", ""]
    for field in ("vocab_size", "n_layers", "n_heads", "n_kv_heads", "d_model", "head_dim", "d_ff", "max_seq_len",
                  "norm", "mlp", "position", "rope_theta", "tie_embeddings", "qkv_bias"):
        lines.append(f"  {field:<16} {getattr(config, field)}")
    lines += ["", f"  parameters       {parameters:,}", "", "  weights memory"]
    for name, bytes_per_parameter in (("float32", 4), ("bfloat16", 2), ("int8", 1), ("int4", 0.5)):
        lines.append(f"    {name:<14} {parameters * bytes_per_parameter / 2**20:10,.1f} MiB")
    per_token = kv_cache_bytes(config, batch_size=1, n_tokens=1, bytes_per_value=2)
    full = kv_cache_bytes(config, batch_size=1, n_tokens=config.max_seq_len, bytes_per_value=2)
    lines += ["", f"  KV cache (bf16)  {per_token / 2**10:,.1f} KiB per token, "
                  f"{full / 2**20:,.1f} MiB for the full {config.max_seq_len:,}-token context"]
    return "\n".join(lines)
