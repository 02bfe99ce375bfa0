"""Settings of the preference losses: a plain dataclass with no torch import, so `llmkit dpo --help` shows them as
typed flags (`--loss`, `--beta`) without loading torch; the values are checked when the settings are made."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmkit.errors import LlmkitError

# The keys of llmkit.align.dpo.LOSSES (a test keeps them equal). simpo needs no reference model.
PreferenceLoss = Literal["sigmoid", "conservative", "robust", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair",
                         "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "simpo"]
REFERENCE_FREE = ("simpo",)
AlignMethod = Literal["lora", "full"]  # how the reward model's backbone or the DPO policy trains
ALIGN_METHODS = ("lora", "full")
NEEDS_SMOOTHING = ("conservative", "robust", "exo_pair")  # label_smoothing is their epsilon


@dataclass
class DPOSettings:
    """Which preference loss and its constants.

    Args:
        loss: sigmoid (DPO), conservative (cDPO: label smoothing), robust (rDPO), hinge (SLiC), ipo, sigmoid_norm
            (length-normalised DPO), exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down,
            discopop, or simpo (reference-free: no reference log-probs are computed).
        beta: inverse temperature of the implicit reward beta * log(pi / pi_ref) (IPO: its tau; SimPO: its beta,
            2-2.5 in the paper).
        label_smoothing: epsilon, the assumed share of flipped labels (conservative, robust, exo_pair; aot; simpo).
        simpo_gamma: SimPO's target reward margin gamma (0.5-1.5 in the paper).
        discopop_tau: DiscoPOP's temperature of the mixing sigmoid.
    """

    loss: PreferenceLoss = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05

    def __post_init__(self) -> None:
        if self.loss not in PreferenceLoss.__args__:
            raise LlmkitError(f"--loss {self.loss} is unknown; choose one of {', '.join(PreferenceLoss.__args__)}")
        if not self.beta > 0:
            raise LlmkitError(f"--beta {self.beta} must be positive (0.1 is usual for DPO, 2.0 for SimPO)")
        if not 0 <= self.label_smoothing < 0.5:
            raise LlmkitError(f"--label_smoothing {self.label_smoothing} must be in [0, 0.5): the share of labels "
                              "assumed flipped")
        if self.loss in NEEDS_SMOOTHING and self.label_smoothing == 0 and self.loss != "robust":
            raise LlmkitError(f"--loss {self.loss} needs --label_smoothing above 0 (e.g. 0.1); with 0 use --loss "
                              "sigmoid")
        if not self.discopop_tau > 0:
            raise LlmkitError(f"--discopop_tau {self.discopop_tau} must be positive (0.05 in the paper)")

    @property
    def reference_free(self) -> bool:
        return self.loss in REFERENCE_FREE
