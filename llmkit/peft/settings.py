"""The settings of every fine-tuning method: plain dataclasses with no torch import, so `llmkit finetune --help`
shows them as typed flags (`--lora.rank 16`, `--prefix.n_virtual_tokens 20`) without loading torch. Each method
module (lora.py, ia3.py, ...) applies its own; the values are checked here, when the settings are made, so a bad
flag fails before any model loads."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from llmkit.errors import LlmkitError

LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LoraInit = Literal["kaiming", "gaussian"]
LORA_INITS = ("kaiming", "gaussian")
PromptInit = Literal["random", "text"]
PROMPT_INITS = ("random", "text")
SelectiveMode = Literal["bitfit", "last_blocks", "modules", "full"]
SELECTIVE_MODES = ("bitfit", "last_blocks", "modules", "full")
Activation = Literal["gelu", "relu", "silu", "tanh"]  # the keys of llmkit.peft.adapters.ACTIVATIONS
ComputeDtype = Literal["float32", "bfloat16"]  # the keys of llmkit.quant.nf4.COMPUTE_DTYPES
NF4_BLOCK_SIZE = 64  # = llmkit.quant.nf4.DEFAULT_BLOCK_SIZE (QLoRA, bitsandbytes); a test keeps them equal
NF4_TARGETS = LLAMA_PROJECTIONS  # = llmkit.quant.nf4.DEFAULT_TARGETS


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class LoraSettings:
    """One adapter: its rank, scale, dropout, which linear layers it targets and how A is initialised.

    Args:
        rank: rank r of the update B A (8 or 16 are common).
        alpha: scale numerator: the update is multiplied by alpha / rank (often 2 x rank).
        dropout: dropout on the adapter's input only (the base path never sees it).
        targets: module-name patterns: a name ("q_proj" matches every blocks.N.attn.q_proj) or a glob ("blocks.1*.mlp.*").
        rslora: scale alpha / sqrt(rank) instead of alpha / rank (steadier at high ranks).
        dora: DoRA: a trained magnitude per output row times the LoRA-adapted direction.
        init: A's initialisation: kaiming uniform (nn.Linear's, as peft) or gaussian N(0, 1/rank); B starts at 0.
        adapter_name: name of this adapter (several can sit on one base).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LLAMA_PROJECTIONS
    rslora: bool = False
    dora: bool = False
    init: LoraInit = "kaiming"
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not isinstance(self.rank, int) or self.rank < 1:
            raise LlmkitError(f"LoRA rank={self.rank!r} must be a positive integer (8 or 16 are common)")
        if not self.alpha > 0:
            raise LlmkitError(f"LoRA alpha={self.alpha!r} must be positive (often 2 x rank)")
        if not 0.0 <= self.dropout < 1.0:
            raise LlmkitError(f"LoRA dropout={self.dropout!r} must be in [0, 1) (0.05 or 0.1 are common)")
        if self.init not in LORA_INITS:
            raise LlmkitError(f"LoRA init={self.init!r} is unknown; choose one of {', '.join(LORA_INITS)}")
        if not self.targets:
            raise LlmkitError("LoRA targets is empty; name the linear layers to adapt, e.g. ('q_proj', 'v_proj')")
        if not self.adapter_name.isidentifier():
            raise LlmkitError(f"adapter_name={self.adapter_name!r} must be a Python identifier (letters, digits, _; "
                              "no dots), e.g. 'default' or 'summarise'")

    @property
    def scale(self) -> float:
        """s in y = W0 x + s B A x."""
        return self.alpha / math.sqrt(self.rank) if self.rslora else self.alpha / self.rank


@dataclass
class QLoraSettings(LoraSettings):
    """LoRA's settings (rank, alpha, dropout, targets, ...) plus how the base is quantised to NF4.

    Args:
        double_quant: quantise the block scales again (0.127 instead of 0.5 bit per weight).
        compute_dtype: the base's matmuls: float32, or bfloat16 (QLoRA's choice on GPUs).
        block_size: weights per absmax scale.
        nf4_targets: linear layers of the base stored in NF4 (the paper quantises them all); LoRA goes where
            `targets` says.
    """

    double_quant: bool = True
    compute_dtype: ComputeDtype = "float32"
    block_size: int = NF4_BLOCK_SIZE
    nf4_targets: tuple[str, ...] = NF4_TARGETS

    def __post_init__(self) -> None:
        super().__post_init__()
        self.nf4_targets = (self.nf4_targets,) if isinstance(self.nf4_targets, str) else tuple(self.nf4_targets)
        if self.compute_dtype not in ComputeDtype.__args__:
            raise LlmkitError(f"QLoRA compute_dtype={self.compute_dtype!r} is unknown; choose one of "
                              f"{', '.join(ComputeDtype.__args__)}")
        if self.dora:
            raise LlmkitError("QLoRA with dora=True: DoRA needs the float weight of each layer, which NF4 does not "
                              "keep; use LoraSettings(dora=True) on an unquantised model, or QLoRA without DoRA")

    def lora(self) -> LoraSettings:
        """The LoRA part of these settings."""
        names = {field.name for field in dataclasses.fields(LoraSettings)}
        return LoraSettings(**{name: getattr(self, name) for name in names})


@dataclass
class PromptTuningSettings:
    """P virtual tokens; initialised at random (at the token embeddings' scale) or from a text's token embeddings.

    Args:
        n_virtual_tokens: trainable embeddings prepended to every input.
        init: random, or text (start from the token embeddings of init_text).
        init_text: the text whose token embeddings start the soft prompt (init text).
    """

    n_virtual_tokens: int = 20
    init: PromptInit = "random"
    init_text: str | None = None

    def __post_init__(self) -> None:
        if not _positive_int(self.n_virtual_tokens):
            raise LlmkitError(f"PromptTuningSettings.n_virtual_tokens={self.n_virtual_tokens!r} must be an integer "
                              ">= 1; use e.g. 20")
        if self.init not in PROMPT_INITS:
            raise LlmkitError(f"PromptTuningSettings.init={self.init!r} is not one of {PROMPT_INITS}; use 'text' with "
                              "init_text, or 'random'")
        if self.init == "text" and not self.init_text:
            raise LlmkitError("PromptTuningSettings.init='text' needs init_text, e.g. 'Classify the sentiment:'")


@dataclass
class PrefixTuningSettings:
    """P prefix slots per layer; `reparameterize` trains them through an MLP (embedding -> `hidden` -> tanh ->
    n_layers * 2 * kv_dim), folded away after training.

    Args:
        n_virtual_tokens: prefix keys/values per layer.
        reparameterize: train through a small MLP (more stable), folded away when saving.
        hidden: width of the reparameterisation MLP (peft: encoder_hidden_size).
    """

    n_virtual_tokens: int = 20
    reparameterize: bool = True
    hidden: int = 512

    def __post_init__(self) -> None:
        for name in ("n_virtual_tokens", "hidden"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise LlmkitError(f"PrefixTuningSettings.{name}={value!r} must be an integer >= 1; use e.g. 20 "
                                  "virtual tokens and a hidden width of 512")


@dataclass
class IA3Settings:
    """Which linears get a vector (matched by the last part of the module name) and which of them are
    feed-forward layers, whose *input* is scaled instead of their output.

    Args:
        targets: linears whose output (or, for feed-forward ones, input) is scaled by a learned vector.
        feedforward: the targets that are feed-forward layers (their input is scaled).
    """

    targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    feedforward: tuple[str, ...] = ("down_proj",)

    def __post_init__(self) -> None:
        self.targets, self.feedforward = tuple(self.targets), tuple(self.feedforward)  # lists from JSON
        if not self.targets:
            raise LlmkitError("IA3Settings.targets is empty; name the linears to scale, e.g. ('k_proj', 'v_proj', "
                              "'down_proj')")
        stray = [name for name in self.feedforward if name not in self.targets]
        if stray:
            raise LlmkitError(f"IA3Settings.feedforward names {stray}, which are not in targets {list(self.targets)}; "
                              "feed-forward layers must also be targets")


@dataclass
class AdapterSettings:
    """Width of the bottleneck and its nonlinearity.

    Args:
        bottleneck: width of the down-projection (Houlsby adapters after attention and FFN).
        activation: gelu, relu, silu or tanh.
    """

    bottleneck: int = 64
    activation: Activation = "gelu"

    def __post_init__(self) -> None:
        if not _positive_int(self.bottleneck):
            raise LlmkitError(f"AdapterSettings.bottleneck={self.bottleneck!r} must be an integer >= 1; use e.g. 64")
        if self.activation not in Activation.__args__:
            raise LlmkitError(f"AdapterSettings.activation={self.activation!r} is not one of "
                              f"{sorted(Activation.__args__)}; use e.g. 'gelu'")


@dataclass
class SelectiveSettings:
    """Which of the model's parameters train; the others are frozen.

    Args:
        mode: bitfit (biases), last_blocks, modules (by name patterns) or full.
        n_blocks: mode last_blocks: how many blocks, counted from the output.
        patterns: mode modules: module or parameter name globs, e.g. [blocks.*.mlp].
    """

    mode: SelectiveMode = "last_blocks"
    n_blocks: int = 2
    patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.patterns = (self.patterns,) if isinstance(self.patterns, str) else tuple(self.patterns)
        if self.mode not in SELECTIVE_MODES:
            raise LlmkitError(f"selective mode={self.mode!r} is unknown; choose one of {', '.join(SELECTIVE_MODES)}")
        if self.mode == "modules" and not self.patterns:
            raise LlmkitError("selective mode 'modules' needs patterns naming what to train, e.g. "
                              "patterns=('blocks.*.mlp',)")
        if self.mode != "modules" and self.patterns:
            raise LlmkitError(f"patterns {list(self.patterns)} apply only to mode 'modules', not {self.mode!r}; "
                              "drop them or set mode='modules'")
        if self.mode == "last_blocks" and (not isinstance(self.n_blocks, int) or self.n_blocks < 1):
            raise LlmkitError(f"n_blocks={self.n_blocks!r} must be a positive integer (how many final blocks train)")


# method name -> its settings dataclass (llmkit.peft.registry.METHODS pairs each with the function applying it)
SETTINGS: dict[str, type] = {
    "lora": LoraSettings,
    "qlora": QLoraSettings,
    "prompt": PromptTuningSettings,
    "prefix": PrefixTuningSettings,
    "ia3": IA3Settings,
    "adapter": AdapterSettings,
    "selective": SelectiveSettings,
}
