"""`llmkit pretrain`: train a language model from scratch (or continue pretraining one) on token shards.
A thin recipe: it prepares the data, builds the model and hands both to the one training loop."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from llmkit.commands.common import as_paths
from llmkit.errors import LlmkitError
from llmkit.train.settings import TrainSettings, check_settings

DATA_DIR = "data"  # inside the run directory when the recipe prepares the data itself
DEFAULT_PRESETS = {"decoder": "mini", "encoder": "mini-bert", "seq2seq": "mini-t5"}  # --model when none is given
MASK_TOKEN = "[MASK]"
ENCODER_SPECIAL_TOKENS = ["<|endoftext|>", MASK_TOKEN]  # the tokenizer trained for masked-LM pretraining
SENTINEL_TOKENS = [f"<extra_id_{i}>" for i in range(100)]  # span corruption: one per replaced span, as in T5
SEQ2SEQ_SPECIAL_TOKENS = ["<|endoftext|>", *SENTINEL_TOKENS]
SPECIAL_TOKENS = {"encoder": ENCODER_SPECIAL_TOKENS, "seq2seq": SEQ2SEQ_SPECIAL_TOKENS}  # per --arch; default otherwise


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
    model: str | None = None,
    arch: Literal["decoder", "encoder", "seq2seq"] = "decoder",
    data: list[str] | str | None = None,
    tokenizer: str | None = None,
    vocab_size: int = 2048,
    seq_len: int = 128,
    init: str | None = None,
    mixer: Literal["attention", "hyena", "retnet", "mamba"] = "attention",
    output: str = "runs/pretrain",
    train: TrainSettings = PRETRAIN_DEFAULTS,
    sample: SampleSettings = SampleSettings(),  # noqa: B008 (a frozen value; jsonargparse shows its fields)
) -> Any:
    """Pretrain a language model: progress bar, validation loss, samples, checkpoints, a loss curve PNG.

    Example: llmkit pretrain                                 (mini model on Tiny Shakespeare, a few minutes on a CPU)
             llmkit pretrain --train.max_steps 2000 --train.precision bf16-mixed --output runs/big
             llmkit pretrain --data "[books/, web.jsonl.gz]" --vocab_size 8192 --train.device cuda
             llmkit pretrain --data data/corpus          (a folder made by `llmkit prepare`: it holds manifest.json)
             llmkit pretrain --arch seq2seq --output runs/t5   (mini-t5 encoder-decoder, T5 span corruption)
             llmkit pretrain --mixer retnet --output runs/retnet   (RetNet retention instead of attention)
             llmkit pretrain --config recipes/pretrain_gpt2_124m.yaml
             torchrun --nproc_per_node 8 -m llmkit.cli pretrain --config recipes/pretrain_gpt2_124m.yaml

    --data is either a folder made by `llmkit prepare` (it holds manifest.json), used as it is, or text files and
    folders, prepared into OUTPUT/data first; without --data it trains on the built-in Tiny Shakespeare with a BPE
    tokenizer trained on it. The device and precision are loop settings: --train.device, --train.precision.
    The run directory OUTPUT holds data/ (shards), checkpoints/step-N/ (each a complete model: try
    `llmkit chat --model OUTPUT/checkpoints/step-N`), metrics.jsonl, metrics.csv and loss.png. Running the same
    command again resumes from the latest checkpoint (after a crash or a kill, exactly where it was).

    Args:
        model: preset name (mini, gpt2, smollm2-135m, tiny-llama, mini-bert, ...); its vocabulary is resized to the
            tokenizer's (default: mini, or mini-bert with --arch encoder, mini-t5 with --arch seq2seq).
        arch: decoder (next-token prediction), encoder (BERT masked-LM: 15% of the tokens are hidden and predicted)
            or seq2seq (T5 span corruption: 15% of the tokens, in spans, become sentinels the decoder fills in).
        data: a folder made by `llmkit prepare`, or .txt/.md, .jsonl(.gz), .parquet files or folders to prepare into
            OUTPUT/data (default: the built-in Tiny Shakespeare).
        tokenizer: raw --data only: the tokenizer to prepare it with (default: train a BPE tokenizer of VOCAB_SIZE
            tokens on it).
        vocab_size: raw --data only: size of the tokenizer trained when none is given.
        seq_len: tokens per training sequence (at most the model's context window).
        init: start from these weights instead of a random init (continued pretraining): .gguf, HF or llmkit path.
        mixer: each block's sequence mixer in a decoder built from --model: attention, or hyena, retnet or mamba
            in its place (docs/mixers.md).
        output: run directory (checkpoints, metrics, plots); an existing run there is resumed.
        train: the training loop's settings (steps, batch, lr, schedule, precision, device, compile, distributed, ...).
        sample: text sampled at each evaluation.
    """
    import torch

    from llmkit.checkpoints import load_tokenizer
    from llmkit.commands.prepare import prepare_corpus
    from llmkit.data.prepare import load_manifest, manifest_tokenizer_path
    from llmkit.data.shards import SequenceStream, TokenShards, validation_batches
    from llmkit.device import resolve_device
    from llmkit.train.distributed import barrier, init_cluster, shut_down
    from llmkit.train.loop import train as train_loop
    from llmkit.train.objectives import causal_lm_batch, causal_lm_objective

    if arch not in DEFAULT_PRESETS:
        raise LlmkitError(f"arch={arch!r} cannot be pretrained by this recipe; choose one of {', '.join(DEFAULT_PRESETS)}")
    model = model or DEFAULT_PRESETS[arch]
    if mixer != "attention" and (arch != "decoder" or init is not None):
        raise LlmkitError(f"--mixer {mixer} builds a new decoder; it goes with --arch decoder and without --init "
                          "(a loaded model keeps its own mixers)")
    check_settings(train)  # one readable line before any data or model work
    cluster = init_cluster(resolve_device(train.device), train.distributed)
    try:
        run_dir = Path(output)
        prepared = prepared_folder(data)
        data_dir = prepared or run_dir / DATA_DIR
        if init is not None and not data and tokenizer is None:
            tokenizer = init  # continued pretraining: the data must be in the model's own ids
        if prepared is None and cluster.is_main:
            prepare_corpus(as_paths(data), data_dir, tokenizer=tokenizer, vocab_size=vocab_size, progress=cluster.is_main,
                           special_tokens=SPECIAL_TOKENS.get(arch),
                           replace_hint="choose another --output for a run on other data")
        barrier(cluster)
        manifest = load_manifest(data_dir)
        tokenizer_path = manifest_tokenizer_path(data_dir, manifest)
        if tokenizer_path is None:
            raise LlmkitError(f"{data_dir}/manifest.json names no tokenizer; re-run `llmkit prepare` with --tokenizer")
        text_tokenizer = load_tokenizer(tokenizer_path)
        check_data_tokenizer(data_dir, manifest, text_tokenizer, tokenizer_path, init)

        torch.manual_seed(train.seed)
        if arch == "encoder":
            network, objective, to_batch = masked_lm_parts(model, init, manifest, text_tokenizer, seq_len, train.seed)
        elif arch == "seq2seq":
            network, objective, to_batch = span_corruption_parts(model, init, manifest, text_tokenizer, train.seed)
        else:
            network = build_network(model, init, manifest["vocab_size"], manifest["eos_id"], seq_len, mixer)
            objective, to_batch = causal_lm_objective(train.loss_chunk), lambda tokens, key: causal_lm_batch(tokens)
        stream = SequenceStream(TokenShards(data_dir, "train"), seq_len, seed=train.seed)
        has_validation = manifest["splits"].get("val", {}).get("n_tokens", 0) > seq_len
        if not has_validation and train.eval_every:
            print("no validation split in the data: validation loss is off (prepare with --val_fraction > 0)")
            train = replace(train, eval_every=0)
        validation = TokenShards(data_dir, "val") if has_validation else None

        def batches(position: int, batch_size: int, rank: int, world_size: int) -> dict[str, Any]:
            return to_batch(stream.batch(position, batch_size, rank, world_size), (position, rank))

        def eval_batches():
            batches = validation_batches(validation, seq_len, train.batch_size, max_batches=train.eval_batches)
            for index, tokens in enumerate(batches):
                yield to_batch(tokens, (index, -1))  # the same masks at every evaluation

        def on_eval(trained: Any, step: int) -> dict:
            text = (sample_span_fill if arch == "seq2seq" else sample_text)(trained, text_tokenizer, sample)
            if cluster.is_main:
                print(f"--- sample at step {step} ---\n{sample.prompt}{text}\n---")
            return {"sample": text}

        if train.resume == "auto":
            check_resume_vocabulary(run_dir, data_dir, manifest, text_tokenizer, tokenizer_path,
                                    network.config.vocab_size)
        if cluster.is_main:
            print(f"{network.config.name}: {network.num_parameters():,} parameters; {len(stream):,} training sequences of "
                  f"{seq_len} tokens; run directory {run_dir}")
        result = train_loop(network, objective, batches, train, run_dir,
                            eval_batches=eval_batches if validation is not None else None,
                            on_eval=on_eval if sample.max_new_tokens > 0 and arch != "encoder" else None,
                            tokenizer=text_tokenizer, cluster=cluster)
        if cluster.is_main:
            print(f"done: {result.steps} steps, {result.tokens:,} tokens, train loss {result.train_loss:.4f}"
                  + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
            usage = {"encoder": "llmkit.checkpoints.load_model", "seq2seq": "llmkit.checkpoints.load_model"
                     }.get(arch, f"chat: llmkit generate --model {result.checkpoint} --prompt ...")
            print(f"model: {result.checkpoint}  ({usage})")
            if result.plot is not None:
                print(f"loss curve: {result.plot}")
        return result
    finally:
        shut_down(cluster)  # destroys the process group of a torchrun run


def prepared_folder(data: list[str] | str | None) -> Path | None:
    """The folder `llmkit prepare` made that --data names (it holds manifest.json), or None when --data names text
    to prepare (or nothing: the built-in corpus). Raises on a path that does not exist or on a mix of both kinds."""
    from llmkit.data.prepare import MANIFEST

    paths = [Path(path) for path in as_paths(data)]
    missing = [str(path) for path in paths if not path.exists()]
    if missing:
        raise LlmkitError(f"--data {missing[0]} does not exist: pass a folder made by `llmkit prepare` (it holds "
                          f"{MANIFEST}) or .txt/.md/.jsonl/.parquet files or folders")
    prepared = [path for path in paths if (path / MANIFEST).is_file()]
    if prepared and len(paths) > 1:
        raise LlmkitError(f"--data mixes the prepared folder {prepared[0]} with other paths; pass that folder alone, "
                          "or only text files and folders to prepare")
    return prepared[0] if prepared else None


def check_data_tokenizer(data_dir: Path, manifest: dict, tokenizer: Any, tokenizer_path: Path, init: str | None) -> None:
    """Refuse shards whose ids mean other tokens than the model's: the tokenizer recorded in the manifest must still
    be the one at its path, and with --init it must be the model's own. Two vocabularies of one size pass a size
    check and train silently on the wrong tokens."""
    from llmkit.checkpoints import load_tokenizer

    recorded = manifest.get("tokenizer", {}).get("vocab_sha256")  # absent in manifests written before it was kept
    if recorded is not None and recorded != tokenizer.fingerprint:
        raise LlmkitError(f"the tokenizer at {tokenizer_path} is not the one --data {data_dir} was tokenized with (its "
                          f"vocabulary changed since): run `llmkit prepare --output {data_dir}` again")
    if init is None:
        return
    try:
        model_tokenizer = load_tokenizer(init)
    except LlmkitError:
        print(f"{init} has no tokenizer to compare with the data's; only the vocabulary size is checked")
        return
    if model_tokenizer.fingerprint != tokenizer.fingerprint:
        raise LlmkitError(
            f"--data {data_dir} was tokenized with {tokenizer_path} ({manifest['vocab_size']:,} tokens) but --init "
            f"{init} reads ids with its own tokenizer ({model_tokenizer.vocab_size:,} tokens), another vocabulary: "
            f"prepare the data with the model's tokenizer (llmkit prepare --tokenizer {init} --output DIR)"
        )


def check_resume_vocabulary(run_dir: Path, data_dir: Path, manifest: dict, tokenizer: Any, tokenizer_path: Path,
                            vocab_size: int) -> None:
    """Refuse to resume a run on data of another vocabulary, naming both (sizes and tokenizers), before the training
    loop's config check says only that the configs differ."""
    from llmkit.checkpoints import load_config, load_tokenizer
    from llmkit.train.checkpoint import list_checkpoints

    existing = list_checkpoints(run_dir)
    if not existing:
        return
    latest = existing[-1]
    try:
        saved_vocab = load_config(latest).vocab_size
        saved = load_tokenizer(latest)
    except LlmkitError:
        return  # a partial checkpoint: the loop reports it
    if saved_vocab == vocab_size and saved.fingerprint == tokenizer.fingerprint:
        return
    raise LlmkitError(
        f"{run_dir} holds a run on a {saved.vocab_size:,}-token vocabulary (model {saved_vocab:,} ids, tokenizer in "
        f"{latest}) but --data {data_dir} uses a {manifest['vocab_size']:,}-token vocabulary (tokenizer "
        f"{tokenizer_path}){'' if saved.vocab_size != manifest['vocab_size'] else ' with other tokens'}: resume with "
        "the data it was trained on, or pass a new --output for a new run"
    )


def build_network(model: str, init: str | None, vocab_size: int, eos_id: int | None, seq_len: int,
                  mixer: str = "attention") -> Any:
    """The model to train: a preset resized to the data's vocabulary (its blocks' sequence mixer `mixer`), or
    pretrained weights (`init`)."""
    from llmkit.config import Config
    from llmkit.models.decoder import Decoder

    if init is not None:
        from llmkit.checkpoints import load_model

        network = load_model(init, arch="decoder")
        network.train()
        if network.config.vocab_size < vocab_size:
            raise LlmkitError(f"{init} has a vocabulary of {network.config.vocab_size} tokens but the data uses ids up "
                              f"to {vocab_size - 1}; prepare the data with that model's tokenizer (--tokenizer {init})")
        config = network.config
    else:
        config = Config.from_name(model, vocab_size=vocab_size, eos_id=eos_id, bos_id=None, mixer=mixer)
        network = Decoder(config)
    if seq_len > config.max_seq_len:
        raise LlmkitError(f"seq_len={seq_len} exceeds {config.name}'s context window of {config.max_seq_len}; "
                          "pass a smaller --seq_len")
    return network


def masked_lm_parts(
    model: str, init: str | None, manifest: dict, tokenizer: Any, seq_len: int, seed: int
) -> tuple[Any, Any, Any]:
    """Masked-LM pretraining (BERT): the MaskedLM to train, its objective, and a batch function that hides 15% of
    each window's tokens. The encoder sees the window's first seq_len tokens as they are (no next-token shift)."""
    import torch

    from llmkit.config import Config
    from llmkit.models.encoder import MaskedLM
    from llmkit.train.objectives import masked_lm_batch, masked_lm_loss

    mask_id = tokenizer.token_to_id(MASK_TOKEN)
    if mask_id is None:
        raise LlmkitError(f"the tokenizer has no {MASK_TOKEN} token, which masked-LM pretraining hides words with; "
                          "leave out --tokenizer and --data so pretrain trains one, or pass a tokenizer that has it")
    vocab_size = manifest["vocab_size"]
    if init is not None:
        from llmkit.checkpoints import load_model

        network = load_model(init, arch="encoder")
        if not isinstance(network, MaskedLM) or network.config.vocab_size < vocab_size:
            raise LlmkitError(f"{init} is not a masked-LM encoder covering the data's {vocab_size} token ids; pass a "
                              "BertForMaskedLM or an llmkit encoder checkpoint and prepare the data with its tokenizer")
        network.train()
    else:
        config = Config.from_name(model, vocab_size=vocab_size, eos_id=manifest["eos_id"], bos_id=None)
        if config.arch != "encoder":
            raise LlmkitError(f"--model {model} is a {config.arch}; --arch encoder needs an encoder preset such as "
                              "mini-bert")
        network = MaskedLM(replace(config, encoder_head="masked_lm"))  # checkpoints reload as a MaskedLM
    if seq_len > network.config.max_seq_len:
        raise LlmkitError(f"seq_len={seq_len} exceeds {network.config.name}'s {network.config.max_seq_len} positions; "
                          "pass a smaller --seq_len")
    special_ids = tokenizer.special_ids

    def to_batch(tokens: Any, key: tuple[int, int]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(hash((seed, *key)) % 2**63)  # the same masks on a resumed run
        return masked_lm_batch(tokens[:, :-1], mask_id, vocab_size, special_ids, generator)  # (B, T)

    return network, masked_lm_loss, to_batch


def span_corruption_parts(
    model: str, init: str | None, manifest: dict, tokenizer: Any, seed: int
) -> tuple[Any, Any, Any]:
    """Span-corruption pretraining (T5): the Seq2Seq to train, its objective, and a batch function that replaces 15%
    of each window's tokens, in spans of 3 on average, by sentinels; the decoder learns to write the spans."""
    import torch

    from llmkit.config import Config
    from llmkit.models.seq2seq import Seq2Seq
    from llmkit.train.objectives import seq2seq_loss, span_corruption_batch

    sentinel_ids = [tokenizer.token_to_id(token) for token in SENTINEL_TOKENS]
    if None in sentinel_ids:
        raise LlmkitError(f"the tokenizer lacks the sentinel tokens {SENTINEL_TOKENS[0]}..{SENTINEL_TOKENS[-1]} that "
                          "span corruption replaces spans with; leave out --tokenizer and --data so pretrain trains "
                          "one, or pass a T5 tokenizer")
    vocab_size, eos_id = manifest["vocab_size"], manifest["eos_id"]
    if init is not None:
        from llmkit.checkpoints import load_model

        network = load_model(init, arch="seq2seq")
        if network.config.vocab_size < vocab_size:
            raise LlmkitError(f"{init} has a vocabulary of {network.config.vocab_size} tokens but the data uses ids up "
                              f"to {vocab_size - 1}; prepare the data with that model's tokenizer (--tokenizer {init})")
        network.train()
    else:
        config = Config.from_name(model, vocab_size=vocab_size, eos_id=eos_id, decoder_start_id=eos_id, bos_id=None)
        if config.arch != "seq2seq":
            raise LlmkitError(f"--model {model} is a {config.arch}; --arch seq2seq needs an encoder-decoder preset "
                              "such as mini-t5")
        network = Seq2Seq(config)
    start_id = network.config.decoder_start_id

    def to_batch(tokens: Any, key: tuple[int, int]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(hash((seed, *key)) % 2**63)  # the same spans on a resumed run
        return span_corruption_batch(tokens[:, :-1], sentinel_ids, generator, eos_id=eos_id, decoder_start_id=start_id)

    return network, seq2seq_loss, to_batch


def sample_span_fill(model: Any, tokenizer: Any, sample: SampleSettings) -> str:
    """What a seq2seq model writes for a gap (<extra_id_0>) after the sample prompt (back in training mode after)."""
    import torch

    from llmkit.generate import SamplingSettings
    from llmkit.generate.seq2seq import generate_seq2seq

    sentinel_ids = [tokenizer.token_to_id(token) for token in SENTINEL_TOKENS]
    ids = tokenizer.encode(sample.prompt, add_bos=False) + [sentinel_ids[0], tokenizer.eos_id]
    was_training = model.training
    model.eval()
    settings = SamplingSettings(temperature=sample.temperature, seed=sample.seed)
    source = torch.tensor([ids], device=next(model.parameters()).device)  # (1, S)
    new = generate_seq2seq(model, source, sample.max_new_tokens, settings=settings,
                           stop_ids={tokenizer.eos_id, sentinel_ids[1]})[0]
    model.train(was_training)
    return tokenizer.decode([token for token in new.tolist() if token not in {*sentinel_ids, tokenizer.eos_id}])


def sample_text(model: Any, tokenizer: Any, sample: SampleSettings) -> str:
    """A continuation of the sample prompt (the model is put back in training mode afterwards)."""
    from llmkit.generate import SamplingSettings, generate

    was_training = model.training
    model.eval()
    settings = SamplingSettings(temperature=sample.temperature, seed=sample.seed)
    text = generate(model, tokenizer, sample.prompt, max_new_tokens=sample.max_new_tokens, settings=settings)
    model.train(was_training)
    return text
