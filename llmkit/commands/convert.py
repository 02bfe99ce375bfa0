"""`llmkit convert`: move a model between formats (GGUF, Hugging Face, llmkit)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.errors import LlmkitError


def convert(source: str, out: str, to: Literal["native", "hf"] = "native") -> None:
    """Convert a model between formats: GGUF or Hugging Face -> llmkit, or llmkit/GGUF -> Hugging Face.

    Example: llmkit convert --source SmolLM2-135M-Instruct.Q4_1.gguf --out smollm2/
             llmkit convert --source smollm2/ --out smollm2-hf/ --to hf

    Args:
        source: .gguf file, Hugging Face directory or llmkit directory.
        out: output directory (created; files are written atomically).
        to: "native" (llmkit directory) or "hf" (Hugging Face safetensors directory that transformers loads).
    """
    from llmkit.checkpoints import build_model, load_tokenizer, load_weights, save_model
    from llmkit.checkpoints.hf import export_hf

    if Path(out).resolve() == Path(source).resolve():
        raise LlmkitError(f"--out {out} is the same as --source; choose another output directory")
    config, state_dict = load_weights(source)
    tokenizer = load_tokenizer(source)
    model = build_model(config, state_dict, source=source)  # checks every tensor before writing anything
    if to == "hf":
        export_hf(model, out, tokenizer=tokenizer)
    else:
        save_model(model, out, tokenizer=tokenizer)
    print(f"wrote {config.name} ({model.num_parameters():,} parameters) to {out} ({to} format)")
