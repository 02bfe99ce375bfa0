"""`llmkit tokenizer train`: learn a byte-level BPE tokenizer from text (the training is llmkit/data/tokenizer_train.py)."""

from __future__ import annotations

from pathlib import Path

from llmkit.commands.common import as_paths
from llmkit.data.tokenizer_train import save_trained, train_tokenizer, training_record


def tokenizer_train(
    data: list[str] | str | None = None,
    output: str = "tokenizer",
    vocab_size: int = 8192,
    text_field: str = "text",
    min_frequency: int = 2,
) -> None:
    """Train a byte-level BPE tokenizer on your text and save it as a Hugging Face tokenizer directory.

    Example: llmkit tokenizer train                  (an 8,192-token BPE of the built-in Tiny Shakespeare -> tokenizer/)
             llmkit tokenizer train --data corpus.txt --output my_tokenizer --vocab_size 8192
             llmkit tokenizer train --data "[texts/, extra.jsonl.gz]" --text_field content --vocab_size 32000

    Reads .txt/.md files (one document each), .jsonl/.jsonl.gz (one document per line, field TEXT_FIELD) and
    .parquet (column TEXT_FIELD); a folder stands for its files. Writes OUTPUT/tokenizer.json and
    tokenizer_config.json, which llmkit and transformers' AutoTokenizer both load. <|endoftext|> is the EOS token.

    Args:
        data: text files or folders to learn the merges from (default: the built-in Tiny Shakespeare).
        output: folder to write the tokenizer into.
        vocab_size: number of tokens: 256 bytes + special tokens + learned merges.
        text_field: JSONL field / Parquet column that holds the text.
        min_frequency: a pair seen fewer times than this is never merged.
    """
    from llmkit.data.sources import builtin_corpus_path

    paths = as_paths(data) or [str(builtin_corpus_path())]
    tokenizer = train_tokenizer(paths, vocab_size=vocab_size, text_field=text_field, min_frequency=min_frequency)
    save_trained(tokenizer, output, training_record(paths, vocab_size, text_field, min_frequency))
    note = "" if tokenizer.vocab_size == vocab_size else f" (the text has too few distinct pairs for {vocab_size:,})"
    print(f"wrote {Path(output)}: byte-level BPE with {tokenizer.vocab_size:,} tokens{note}, "
          f"EOS {tokenizer.id_to_token(tokenizer.eos_id)!r} = {tokenizer.eos_id}")
