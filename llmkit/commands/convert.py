"""`llmkit convert`: move a model between formats (GGUF, Hugging Face, llmkit), any family."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from llmkit.commands.common import refuse_replacing_model_dir


def convert(model: str, output: str, to: Literal["native", "hf"] = "native", overwrite: bool = False) -> None:
    """Convert a model between formats: GGUF or Hugging Face -> llmkit, or llmkit/GGUF -> Hugging Face. Every family
    converts both ways: decoders, BERT encoders (with their head) and T5 encoder-decoders.

    Example: llmkit convert --model SmolLM2-135M-Instruct.Q4_1.gguf --output smollm2/
             llmkit convert --model smollm2/ --output smollm2-hf/ --to hf
             llmkit convert --model my-bert/ --output my-bert-hf/ --to hf   # BertForMaskedLM etc., T5 alike

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
    from llmkit.tokenizer import TOKENIZER_FILE

    refuse_replacing_model_dir(output, model, overwrite)
    config, state_dict = load_weights(model)
    has_tokenizer = Path(model).is_file() or (Path(model) / TOKENIZER_FILE).is_file()  # a GGUF file always has one
    tokenizer = load_tokenizer(model) if has_tokenizer else None
    network = build_model(config, state_dict, source=model)  # checks every tensor against the config before writing anything
    if to == "hf":
        export_hf(network, output, tokenizer=tokenizer)
    else:
        save_model(network, output, tokenizer=tokenizer)
    note = "" if has_tokenizer else f"; {model} has no {TOKENIZER_FILE}, so no tokenizer files were written"
    print(f"wrote {config.name} ({network.num_parameters():,} parameters) to {output} ({to} format){note}")
