"""`llmkit pretrain`: train a language model from scratch (or continue pretraining one) on token shards.
A thin recipe: it prepares the data, builds the model and hands both to the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmkit.errors import LlmkitError
from llmkit.train.settings import TrainSettings

if TYPE_CHECKING:
    import torch

    from llmkit.models.decoder import Decoder
    from llmkit.train.loop import TrainResult

DATA_DIR = "data"  # inside the run directory when the recipe prepares the data itself


@dataclass(frozen=True)
class SampleSettings:
    """Text generated at every evaluation, to watch the model learn."""

    prompt: str = "ROMEO:"  # the built-in corpus is Shakespeare; use a prompt from your own data
    max_new_tokens: int = 60
    temperature: float = 0.8  # 0 is greedy
    seed: int = 0


# A few minutes on a laptop CPU for the built-in corpus and the `mini` model.
PRETRAIN_DEFAULTS = TrainSettings(max_steps=300, batch_size=16, lr=2e-3, warmup_steps=30, eval_every=100,
                                  eval_batches=10, checkpoint_every=100, log_every=10)


def pretrain(
    model: str = "mini",
    data: str | None = None,
    inputs: list[str] | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 2048,
    seq_len: int = 128,
    init: str | None = None,
    output: str = "runs/pretrain",
    train: TrainSettings = PRETRAIN_DEFAULTS,
    sample: SampleSettings = SampleSettings(),  # noqa: B008 (a frozen value; jsonargparse shows its fields)
) -> TrainResult:
    """Pretrain a language model: progress bar, validation loss, samples, checkpoints, a loss curve PNG.

    Example: llmkit pretrain                                 (mini model on Tiny Shakespeare, a few minutes on a CPU)
             llmkit pretrain --train.max_steps 2000 --train.precision bf16-mixed --output runs/big
             llmkit pretrain --config recipes/pretrain_gpt2_124m.yaml
             torchrun --nproc_per_node 8 -m llmkit.cli pretrain --config recipes/pretrain_gpt2_124m.yaml

    Without --data or --inputs it trains on the built-in Tiny Shakespeare with a BPE tokenizer trained on it.
    The run directory OUTPUT holds data/ (shards), checkpoints/step-N/ (each a complete model: try
    `llmkit chat --model OUTPUT/checkpoints/step-N`), metrics.jsonl, metrics.csv and loss.png. Running the same
    command again resumes from the latest checkpoint (after a crash or a kill, exactly where it was).

    Args:
        model: preset name (mini, gpt2, smollm2-135m, tiny-llama, ...); its vocabulary is resized to the tokenizer's.
        data: folder made by `llmkit prepare` (default: prepare INPUTS into OUTPUT/data).
        inputs: text/JSONL/Parquet files to prepare when --data is not given (default: built-in Tiny Shakespeare).
        tokenizer: tokenizer for preparing INPUTS (default: train a BPE tokenizer of VOCAB_SIZE tokens on them).
        vocab_size: size of the tokenizer trained when none is given.
        seq_len: tokens per training sequence (at most the model's context window).
        init: start from these weights instead of a random init (continued pretraining): .gguf, HF or llmkit path.
        output: run directory (checkpoints, metrics, plots); an existing run there is resumed.
        train: the training loop's settings (steps, batch, lr, schedule, precision, compile, distributed, ...).
        sample: text sampled at each evaluation.
    """
    import torch

    from llmkit.checkpoints import load_tokenizer, resolve_device
    from llmkit.data.prepare import load_manifest, manifest_tokenizer_path, prepare_data
    from llmkit.data.shards import SequenceStream, TokenShards, validation_batches
    from llmkit.train.distributed import barrier, init_cluster
    from llmkit.train.loop import train as train_loop
    from llmkit.train.objectives import causal_lm_batch, causal_lm_loss

    cluster = init_cluster(resolve_device(train.device), train.distributed)
    run_dir = Path(output)
    data_dir = Path(data) if data else run_dir / DATA_DIR
    if data is None and cluster.is_main:
        prepare_data(inputs=inputs, output=str(data_dir), tokenizer=tokenizer, vocab_size=vocab_size,
                     progress=cluster.is_main)
    barrier(cluster)
    manifest = load_manifest(data_dir)
    tokenizer_path = manifest_tokenizer_path(data_dir, manifest)
    if tokenizer_path is None:
        raise LlmkitError(f"{data_dir}/manifest.json names no tokenizer; re-run `llmkit prepare` with --tokenizer")
    text_tokenizer = load_tokenizer(tokenizer_path)

    torch.manual_seed(train.seed)
    network = build_network(model, init, manifest["vocab_size"], manifest["eos_id"], seq_len)
    stream = SequenceStream(TokenShards(data_dir, "train"), seq_len, seed=train.seed)
    has_validation = manifest["splits"].get("val", {}).get("n_tokens", 0) > seq_len
    if not has_validation and train.eval_every:
        print("no validation split in the data: validation loss is off (prepare with --val_fraction > 0)")
        train = replace(train, eval_every=0)
    validation = TokenShards(data_dir, "val") if has_validation else None

    def batches(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, torch.Tensor]:
        return causal_lm_batch(stream.batch(position, batch_size, rank, world_size))

    def eval_batches():
        for tokens in validation_batches(validation, seq_len, train.batch_size, max_batches=train.eval_batches):
            yield causal_lm_batch(tokens)

    def on_eval(trained: torch.nn.Module, step: int) -> dict:
        text = sample_text(trained, text_tokenizer, sample)
        if cluster.is_main:
            print(f"--- sample at step {step} ---\n{sample.prompt}{text}\n---")
        return {"sample": text}

    if cluster.is_main:
        print(f"{network.config.name}: {network.num_parameters():,} parameters; {len(stream):,} training sequences of "
              f"{seq_len} tokens; run directory {run_dir}")
    result = train_loop(network, causal_lm_loss, batches, train, run_dir,
                        eval_batches=eval_batches if validation is not None else None,
                        on_eval=on_eval if sample.max_new_tokens > 0 else None, tokenizer=text_tokenizer, cluster=cluster)
    if cluster.is_main:
        print(f"done: {result.steps} steps, {result.tokens:,} tokens, train loss {result.train_loss:.4f}"
              + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
        print(f"model: {result.checkpoint}  (chat: llmkit generate --model {result.checkpoint} --prompt ...)")
        if result.plot is not None:
            print(f"loss curve: {result.plot}")
    return result


def build_network(model: str, init: str | None, vocab_size: int, eos_id: int | None, seq_len: int) -> Decoder:
    """The model to train: a preset resized to the data's vocabulary, or pretrained weights (`init`)."""
    from llmkit.config import Config
    from llmkit.models.decoder import Decoder

    if init is not None:
        from llmkit.checkpoints import load_model

        network = load_model(init)
        network.train()
        if network.config.vocab_size < vocab_size:
            raise LlmkitError(f"{init} has a vocabulary of {network.config.vocab_size} tokens but the data uses ids up "
                              f"to {vocab_size - 1}; prepare the data with that model's tokenizer (--tokenizer {init})")
        config = network.config
    else:
        config = Config.from_name(model, vocab_size=vocab_size, eos_id=eos_id, bos_id=None)
        network = Decoder(config)
    if seq_len > config.max_seq_len:
        raise LlmkitError(f"seq_len={seq_len} exceeds {config.name}'s context window of {config.max_seq_len}; "
                          "pass a smaller --seq_len")
    return network


def sample_text(model: torch.nn.Module, tokenizer: Any, sample: SampleSettings) -> str:
    """A continuation of the sample prompt (the model is put back in training mode afterwards)."""
    from llmkit.generate import SamplingSettings, generate

    was_training = model.training
    model.eval()
    settings = SamplingSettings(temperature=sample.temperature, seed=sample.seed)
    text = generate(model, tokenizer, sample.prompt, max_new_tokens=sample.max_new_tokens, settings=settings)
    model.train(was_training)
    return text
