"""What several verbs share: the option types every verb spells the same way, and the default model."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Device = str  # "auto", "cpu", "cuda", "cuda:1"
Dtype = Literal["float32", "bfloat16", "float16"]


def model_path(model: str | None) -> Path:
    """The model a verb runs: the path given, or the default SmolLM2-135M-Instruct GGUF."""
    from llmkit.checkpoints import default_model_path

    return Path(model) if model else default_model_path()


def with_adapter(llm, adapter: str, path: Path):  # noqa: ANN001, ANN202 (torch types, imported lazily)
    """`llm` with the fine-tuned adapter directory `adapter` applied, in eval mode."""
    from llmkit.checkpoints import load_tokenizer
    from llmkit.peft.registry import load_adapter

    return load_adapter(llm, adapter, tokenizer=load_tokenizer(path)).eval()
