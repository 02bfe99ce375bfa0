"""`llmkit convert`: move a model between formats (GGUF, Hugging Face, llmkit)."""

from __future__ import annotations

from typing import Literal

from llmkit.commands.common import refuse_replacing_model_dir


def convert(model: str, output: str, to: Literal["native", "hf"] = "native", overwrite: bool = False) -> None:
    """Convert a model between formats: GGUF or Hugging Face -> llmkit, or llmkit/GGUF -> Hugging Face.

    Example: llmkit convert --model SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2/
             llmkit convert --model smollm2/ --output smollm2-hf/ --to hf

    OUTPUT must be a new or empty directory (another model's files are never replaced unless you pass --overwrite),
    and neither the input model nor a folder inside it.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory.
        output: output directory (created; files are written atomically).
        to: "native" (llmkit directory) or "hf" (Hugging Face safetensors directory that transformers loads).
        overwrite: replace the files of a directory that already holds some (files convert does not write are kept).
    """
    from llmkit.checkpoints import build_model, load_tokenizer, load_weights, save_model
    from llmkit.checkpoints.hf import export_hf

    refuse_replacing_model_dir(output, model, overwrite)
    config, state_dict = load_weights(model)
    tokenizer = load_tokenizer(model)
    network = build_model(config, state_dict, source=model)  # checks every tensor against the config before writing anything
    if to == "hf":
        export_hf(network, output, tokenizer=tokenizer)
    else:
        save_model(network, output, tokenizer=tokenizer)
    print(f"wrote {config.name} ({network.num_parameters():,} parameters) to {output} ({to} format)")
