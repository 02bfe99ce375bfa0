"""The `llmkit` command. Every verb is a typed function in `llmkit/commands/`; jsonargparse turns its signature and
docstring into flags and `--help`. This module only registers them, in the order of a model's life: plan, data,
train, evaluate, use, ship. Anything the CLI does, Python does with the same names."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from llmkit.errors import LlmkitError

# OpenMP (torch's libgomp) lets a thread that waits at a barrier spin ~300,000 times before it sleeps. Beside another
# process that does the same (a second llmkit, a test run) on a 2-core machine, each of a decode step's ~150 parallel
# regions then waits for a thread the scheduler has given away: SmolLM2 Q4_0 decoded 0.8 tok/s there instead of ~95.
# With a spin of 10,000 it decodes ~43 tok/s there (100,000: 1.1); on an idle machine Q4_0 and F16 decode as fast as
# before and F32 ~10% slower (docs/benchmarks.md, 2026-12-07). libgomp reads this once, when torch loads it, so it is
# set here, before any verb imports torch; a user's own GOMP_SPINCOUNT or OMP_WAIT_POLICY is left alone.
OPENMP_SPIN_COUNT = "10000"
if "GOMP_SPINCOUNT" not in os.environ and "OMP_WAIT_POLICY" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT

# verb -> "module:function" under llmkit.commands (a dict is a verb group: `llmkit tokenizer train`). Modules are
# imported only when their verb runs or its help is shown, so `llmkit chat` never builds the other verbs' parsers.
COMMANDS: dict[str, Any] = {
    "info": "info:info",
    "estimate": "estimate:estimate",
    "tokenizer": {"train": "tokenizer:tokenizer_train"},
    "prepare": "prepare:prepare_data",
    "filter": "filter:filter_data",
    "augment": "augment:augment",
    "pretrain": "pretrain:pretrain",
    "finetune": "finetune:finetune",
    "distill": "distill:distill",
    "vision": {"train": "vision:vision_train", "classify": "vision:vision_classify"},
    "clip": {"train": "clip:clip_train", "classify": "clip:clip_classify"},
    "vlm": {"train": "vlm:vlm_train", "ask": "vlm:vlm_ask"},
    "reward": {"train": "reward:reward_train", "score": "reward:reward_score"},
    "dpo": "dpo:dpo",
    "ppo": "ppo:ppo",
    "constitution": "constitution:constitution",
    "moe": {"upcycle": "moe:moe_upcycle"},
    "quantize": "quantize:quantize",
    "prune": "prune:prune",
    "evaluate": "evaluate:evaluate",
    "perplexity": "perplexity:perplexity",
    "bench": {"peft": "bench:bench_peft", "quant": "bench_quant:bench_quant", "serve": "bench_serve:bench_serve"},
    "serve": "serve:serve",
    "generate": "chat:generate",
    "chat": "chat:chat",
    "embed": "embed:embed",
    "speech": {"train": "speech:speech_train", "transcribe": "speech:speech_transcribe"},
    "rag": {"index": "rag:rag_index", "ask": "rag:rag_ask", "eval": "rag:rag_eval"},
    "reason": "reason:reason",
    "cascade": "cascade:cascade",
    "pal": "pal:pal",
    "agent": "agent:agent",
    "convert": "convert:convert",
}


def command(target: str) -> Callable[..., Any]:
    """The verb function named by a COMMANDS entry, e.g. "chat:generate" -> llmkit.commands.chat.generate."""
    module, function = target.split(":")
    return getattr(importlib.import_module(f"llmkit.commands.{module}"), function)


def _selected(argv: list[str]) -> list[str]:
    """The verb (and group action) named in argv, e.g. ["tokenizer", "train"]; [] when none is."""
    words = [word for word in argv if not word.startswith("-")]
    level: Any = COMMANDS
    path = []
    for word in words:
        if not isinstance(level, dict) or word not in level:
            break
        path.append(word)
        level = level[word]
    return path


def build_parser(argv: list[str] | None = None):  # noqa: ANN201 (jsonargparse.ArgumentParser, imported lazily)
    """One sub-command per verb; each verb's docstring (with its example) is its `--help` text. Given argv, only the
    verb it names gets its flags (building every verb's flags takes over a second); the others are listed."""
    import inspect

    from jsonargparse import ActionConfigFile, ArgumentParser
    from jsonargparse import DefaultHelpFormatter as Formatter

    class HelpFormatter(Formatter):
        def _fill_text(self, text: str, width: int, indent: str) -> str:  # keep the examples' line breaks
            return "".join(indent + line for line in text.splitlines(keepends=True))

    selected = None if argv is None else _selected(argv)
    parser = ArgumentParser(prog="llmkit", formatter_class=HelpFormatter,
                            description="llmkit: plan, prepare data for, train, evaluate, run and convert language models.")

    def add_verbs(parent: ArgumentParser, commands: dict[str, Any], dest: str, prefix: list[str]) -> None:
        verbs = parent.add_subcommands(dest=dest)
        for name, target in commands.items():
            if isinstance(target, dict):
                group = ArgumentParser(description=f"llmkit {name} commands.", formatter_class=HelpFormatter)
                verbs.add_subcommand(name, group, help=f"{name} commands: {', '.join(target)}")
                add_verbs(group, target, "action", [*prefix, name])  # jsonargparse wants the parent level added first
                continue
            function = command(target)
            description = (inspect.getdoc(function) or "").split("\n\nArgs:")[0]
            verb = ArgumentParser(description=description, formatter_class=HelpFormatter)
            if selected is None or selected == [*prefix, name]:
                verb.add_argument("--config", action=ActionConfigFile, help="YAML recipe whose keys are this verb's options")
                verb.add_function_arguments(function, as_positional=False)
            verbs.add_subcommand(name, verb, help=description.splitlines()[0])

    add_verbs(parser, COMMANDS, "verb", [])
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point: run one verb; a bad input prints one line and exits with status 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    parsed = parser.parse_args(argv)
    try:
        # dataclass options become instances, which check their values (`instantiate` since jsonargparse 4.49)
        instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
        arguments = instantiate(parsed)
        target, arguments = COMMANDS[arguments.verb], arguments[arguments.verb]
        if isinstance(target, dict):
            target, arguments = target[arguments.action], arguments[arguments.action]
        options = {key: value for key, value in vars(arguments).items() if key not in ("config", "__path__")}
        command(target)(**options)
    except LlmkitError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as interrupt:  # training saved a checkpoint and says so; 143 when it was a SIGTERM
        sys.exit(getattr(interrupt, "exit_status", 130))


if __name__ == "__main__":
    main()
