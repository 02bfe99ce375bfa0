"""Training data: read text (txt, JSONL, Parquet), filter and deduplicate it, train a byte-level BPE tokenizer,
tokenize into flat token shards with a manifest (`prepare`), and stream fixed-length windows from them (`shards`)."""
