"""Small builders several test files share: JSONL files, a byte-level tokenizer, a tiny random decoder, the CLI.

Plain functions (imported as `from tests.helpers import ...`, like tests/train_script.py) rather than fixtures:
each test states the variant it needs in the call, and module-scoped fixtures stay in the files that cache them.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import AddedToken, decoders, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import bytes_to_unicode

from llmkit.checkpoints.hf import load_hf
from llmkit.cli import main
from llmkit.config import Config
from llmkit.data.shared import shared_data_file
from llmkit.models.decoder import Decoder
from llmkit.tokenizer import Tokenizer

SHAKESPEARE_FILE = "tinyshakespeare/input.txt"  # in the shared data ($LLMKIT_SHARED_DATA or ../shared/data)


def shakespeare_text() -> str:
    """Tiny Shakespeare (1.1 MB) from the shared data folder: a real English text for statistics on large samples."""
    return shared_data_file(SHAKESPEARE_FILE).read_text(encoding="utf-8")


def write_jsonl(path: Path, rows: Sequence[Any], compress: bool = False) -> Path:
    """One line per row: a str is written as it is (to make bad lines), anything else as JSON; gzip with `compress`."""
    text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as file:
            file.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def byte_tokenizer(
    specials: Sequence[str] = (),
    bos_id: int | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
) -> Tokenizer:
    """GPT-2 byte-level tokens with no merges: id = byte value, so a 2-byte character is two tokens and a text
    splits the same way however it is cut into context and continuation. `specials` get ids 256, 257, ..."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    backend = BackendTokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True) for token in specials])
    return Tokenizer(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos, chat_template=chat_template)


def load_llmkit(directory: Path) -> Decoder:
    """An llmkit Decoder (eval mode) from a Hugging Face directory, through `load_hf` alone (config + state dict)."""
    config, state = load_hf(directory)
    model = Decoder(config)
    model.load_state_dict(state)
    return model.eval()


def tiny_decoder(preset: str = "tiny-llama", seed: int = 0, **overrides: Any) -> Decoder:
    """A named tiny preset (with field overrides), seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return Decoder(Config.from_name(preset, **overrides)).eval()


def run_cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """Run `llmkit ARGV` in this process: (exit code, stdout, stderr)."""
    try:
        main(list(argv))
        code = 0
    except SystemExit as exit:
        code = exit.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cli_status(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    """Run `llmkit ARGV` in this process: (exit code, stderr)."""
    code, _, err = run_cli(capsys, *argv)
    return code, err


def correlated_inputs(n: int = 1024, width: int = 256, seed: int = 0) -> torch.Tensor:
    """Layer inputs (n, width) whose channels are strongly correlated (a random mixing of fewer latent factors, plus
    a few loud channels): where GPTQ's and SparseGPT's spreading of one column's error over the others pays."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, width // 4, generator=g, dtype=torch.float64)
    x = latent @ torch.randn(width // 4, width, generator=g, dtype=torch.float64) / 8
    x += 0.05 * torch.randn(n, width, generator=g, dtype=torch.float64)
    x[:, :4] *= 10
    return x


def random_lora_dir(base: torch.nn.Module, directory: Path, rank: int, seed: int, std: float = 0.2,
                    **settings: Any) -> Path:
    """An llmkit LoRA adapter directory for `base` (left unchanged) with random A and a random, non-zero B (a fresh
    adapter's B is zero, which would hide every bug in the update); alpha = 2 x rank."""
    import copy

    from llmkit.peft.core import save_adapter
    from llmkit.peft.lora import LoraSettings, apply_lora

    lora = LoraSettings(rank=rank, alpha=2.0 * rank, **settings)
    model = apply_lora(copy.deepcopy(base), lora)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return save_adapter(model, directory, "lora", lora)


class ScriptedModel:
    """A deterministic stand-in for an application's TextModel (llmkit.apps.pipeline): each call answers with the
    next scripted reply, or with `reply(prompt)` when a function is given, and records the prompts it saw. Chat
    prompts are the plain transcript ("User: ...\nAssistant:"); tokens are counted as whitespace-separated words."""

    def __init__(self, replies: Sequence[str] | Any, context_window: int = 2048) -> None:
        self.reply = replies if callable(replies) else None
        self.replies = [] if callable(replies) else list(replies)
        self.prompts: list[str] = []
        self.context_window = context_window

    def _next(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if self.reply is not None:
            return self.reply(prompt)
        if not self.replies:
            raise AssertionError(f"ScriptedModel ran out of replies at prompt {prompt[-80:]!r}")
        return self.replies.pop(0)

    def complete(self, prompts: Sequence[str], max_new_tokens: int, settings: Any = None,
                 stop: Sequence[str] = ()) -> list[str]:
        outputs = []
        for prompt in prompts:
            text = self._next(prompt)
            cuts = [text.index(s) for s in stop if s in text]
            outputs.append(text[:min(cuts)] if cuts else text)
        return outputs

    def complete_json(self, prompt: str, schema: Any, max_new_tokens: int, settings: Any = None) -> str:
        return self._next(prompt)

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        from llmkit.chat_template import plain_transcript

        return plain_transcript(messages)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def int8_activation_bound(x: torch.Tensor, w_hat: torch.Tensor) -> torch.Tensor:
    """(rows, out) bound on |x W_hat^T - y| when the kernel rounds each block of 32 of x to int8 (llama.cpp's Q8_0
    activations): |x - dx qx| <= dx / 2 per value, dx = max|x_block| / 127 (x 1 + 2^-10 for its fp16 rounding), so
    the error is at most sum over blocks of max|x_block| / 254 (1 + 2^-10) ||w_block||_1."""
    rows, out_features = x.numel() // w_hat.shape[1], w_hat.shape[0]
    amax = x.double().reshape(rows, -1, 32).abs().amax(-1)  # (rows, blocks)
    w_l1 = w_hat.double().reshape(out_features, -1, 32).abs().sum(-1)  # (out, blocks)
    return (amax / 254 * (1 + 2**-10)) @ w_l1.T
