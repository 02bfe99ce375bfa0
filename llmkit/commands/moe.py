"""`llmkit moe upcycle`: turn a dense decoder into a mixture of experts (sparse upcycling, llmkit/models/upcycle.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.commands.common import refuse_replacing_model_dir


def moe_upcycle(
    model: str,
    output: str,
    n_experts: int = 8,
    experts_per_token: int | None = None,
    router: Literal["topk", "switch"] = "topk",
    capacity_factor: float = 1.25,
    seed: int = 0,
    overwrite: bool = False,
    dtype: Literal["float32", "bfloat16", "float16"] = "float32",
) -> Path:
    """Turn a dense model into a mixture of experts (sparse upcycling) and write it as an llmkit checkpoint.

    Example: llmkit moe upcycle --model smollm2/ --output smollm2-moe/ --n_experts 8
             llmkit moe upcycle --model tiny/ --output tiny-switch/ --n_experts 4 --router switch

    Every block's FFN is copied into each expert and a small random router is added; with the top-k router the
    new model computes the same logits as the dense one until training moves the experts apart. Train it further
    with `llmkit pretrain` (the load-balancing and router z-losses are added while training).

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory of a dense model.
        output: directory for the llmkit checkpoint (config.json, model.safetensors, tokenizer files).
        n_experts: experts per block.
        experts_per_token: experts each token is routed to (default: 2 for topk, 1 for switch).
        router: topk (Mixtral: top-k, renormalised) or switch (top-1 with capacity and token dropping).
        capacity_factor: switch only: an expert takes at most ceil(capacity_factor * tokens / n_experts) tokens.
        seed: random seed of the router initialisation.
        overwrite: write into an OUTPUT that already holds files (the files written are replaced).
        dtype: weights' dtype.
    """
    import torch

    from llmkit.checkpoints import load_model, load_tokenizer, save_model
    from llmkit.models.upcycle import upcycle_to_moe

    refuse_replacing_model_dir(output, model, overwrite)
    dense = load_model(model, dtype=dtype, arch="decoder")
    tokenizer = load_tokenizer(model)
    dense_parameters = dense.num_parameters()
    torch.manual_seed(seed)
    upcycled = upcycle_to_moe(dense, n_experts, experts_per_token, router=router, capacity_factor=capacity_factor)
    save_model(upcycled, output, tokenizer=tokenizer)
    config = upcycled.config
    print(f"wrote {config.name} upcycled to {config.n_experts} experts ({config.router}, {config.experts_per_token} "
          f"per token): {dense_parameters:,} -> {upcycled.num_parameters():,} parameters, to {output}")
    return Path(output)
