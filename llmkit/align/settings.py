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


KLEstimator = Literal["k1", "k3"]  # per-token estimators of KL(pi || pi_ref) (llmkit.align.ppo)
KL_ESTIMATORS = ("k1", "k3")


@dataclass
class PPOSettings:
    """The PPO algorithm's constants (llmkit.align.ppo has the math).

    Args:
        kl_coef: beta of the per-token KL penalty -beta * KL_t added to the rewards (the initial value when adaptive).
        target_kl: with a value, the adaptive controller (Ziegler et al. 2019) steers the per-sequence KL toward it;
            None keeps kl_coef fixed.
        kl_horizon: the adaptive controller's horizon in rollouts: coef *= 1 + clip(KL/target - 1, -0.2, 0.2) * n / horizon.
        kl_estimator: k1 (log p - log p_ref) or k3 ((r - 1) - log r, r = p_ref / p; never negative).
        gamma: discount of GAE (1.0: no discount within a response).
        lam: lambda of GAE (bias-variance trade-off of the advantages; 0.95 as in Ziegler et al.).
        clip_range: epsilon of the clipped policy loss: the ratio pi / pi_old is clipped to [1 - eps, 1 + eps].
        vf_clip: the value prediction may move at most this far from the rollout's value (clipped value loss).
        vf_coef: weight of the value loss in the total loss.
        ppo_epochs: passes over each rollout batch.
        minibatch_size: responses per gradient step inside an epoch.
        whiten_advantages: normalise the advantages to mean 0, variance 1 over each rollout batch.
        missing_eos_penalty: subtracted from the score of a response that ends without EOS (None: no penalty).
    """

    kl_coef: float = 0.05
    target_kl: float | None = None
    kl_horizon: int = 10000
    kl_estimator: KLEstimator = "k1"
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    vf_clip: float = 0.2
    vf_coef: float = 0.1
    ppo_epochs: int = 4
    minibatch_size: int = 4
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None

    def __post_init__(self) -> None:
        if not self.kl_coef >= 0:
            raise LlmkitError(f"--kl_coef {self.kl_coef} must be >= 0 (0.05 is usual; 0 turns the KL penalty off)")
        if self.target_kl is not None and not self.target_kl > 0:
            raise LlmkitError(f"--target_kl {self.target_kl} must be positive (nats per sequence, e.g. 6), or null "
                              "for a fixed --kl_coef")
        if self.target_kl is not None and self.kl_coef == 0:
            raise LlmkitError("--target_kl needs a positive --kl_coef to adapt (0 stays 0); e.g. --kl_coef 0.05")
        if self.kl_horizon < 1:
            raise LlmkitError(f"--kl_horizon {self.kl_horizon} must be >= 1 (10000 in Ziegler et al. 2019)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise LlmkitError(f"--kl_estimator {self.kl_estimator} is unknown; choose k1 or k3")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise LlmkitError(f"--{name} {getattr(self, name)} must be in [0, 1]")
        for name in ("clip_range", "vf_clip"):
            if not getattr(self, name) > 0:
                raise LlmkitError(f"--{name} {getattr(self, name)} must be positive (0.2 is usual)")
        if not self.vf_coef >= 0:
            raise LlmkitError(f"--vf_coef {self.vf_coef} must be >= 0 (0.1 is usual)")
        if self.ppo_epochs < 1 or self.minibatch_size < 1:
            raise LlmkitError(f"--ppo_epochs {self.ppo_epochs} and --minibatch_size {self.minibatch_size} must be >= 1")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise LlmkitError(f"--missing_eos_penalty {self.missing_eos_penalty} must be >= 0 (it is subtracted)")


@dataclass
class PPOTrainSettings:
    """The PPO loop: how many rollouts, of how many prompts, and the optimizer.

    Args:
        steps: rollout-and-update rounds.
        rollout_batch: prompts sampled per round (the adaptive KL controller's n).
        lr: AdamW learning rate of the policy (LoRA or all weights) and the value head.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradients are clipped to this global norm.
        max_new_tokens: longest response in tokens.
        temperature: sampling temperature of the rollouts (1.0: the policy's own distribution, which PPO assumes).
        top_k: keep only the k most likely tokens when sampling (null: off).
        top_p: nucleus sampling mass (null: off).
        seed: seeds the prompt order, the value head and the sampling.
        samples_logged: responses written into each step's metrics row.
        precision: fp32, or bf16-mixed (autocast of rollouts and updates over fp32 weights; fp16 would need loss
            scaling, which this loop does not do).
        device: auto, cpu, cuda or cuda:N (the policy, its reference and a reward model all move there).
        checkpoint_every: steps between checkpoints in OUTPUT/checkpoints (one is also written at the end and on
            Ctrl-C / SIGTERM).
        keep_last: checkpoints kept.
        resume: auto continues from OUTPUT's latest checkpoint (same settings); never refuses an OUTPUT that holds one.
    """

    steps: int = 10
    rollout_batch: int = 8
    lr: float = 1e-4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_new_tokens: int = 24
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    samples_logged: int = 2
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    device: str = "auto"
    checkpoint_every: int = 10
    keep_last: int = 2
    resume: Literal["auto", "never"] = "auto"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16-mixed"):
            raise LlmkitError(f"--train.precision {self.precision} is not supported by PPO; use fp32 or bf16-mixed "
                              "(fp16 needs loss scaling)")
        if self.checkpoint_every < 1 or self.keep_last < 1:
            raise LlmkitError(f"--train.checkpoint_every {self.checkpoint_every} and --train.keep_last "
                              f"{self.keep_last} must each be >= 1")
        if self.resume not in ("auto", "never"):
            raise LlmkitError(f"--train.resume {self.resume} must be auto or never")
        if self.steps < 1 or self.rollout_batch < 1 or self.max_new_tokens < 1:
            raise LlmkitError(f"--train.steps {self.steps}, --train.rollout_batch {self.rollout_batch} and "
                              f"--train.max_new_tokens {self.max_new_tokens} must each be >= 1")
        if not self.lr >= 0:
            raise LlmkitError(f"--train.lr {self.lr} must be >= 0 (1e-4 suits LoRA, 1e-6 full fine-tuning)")
        if not self.max_grad_norm > 0:
            raise LlmkitError(f"--train.max_grad_norm {self.max_grad_norm} must be positive")
        if not self.temperature > 0:
            raise LlmkitError(f"--train.temperature {self.temperature} must be positive: PPO needs sampled responses "
                              "(1.0 samples the policy itself)")
