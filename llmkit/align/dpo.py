"""Direct preference optimisation and its family: train the policy pi on preference pairs directly, no reward model,
no sampling (DPO, Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model"). With log-ratios of the summed response log-probs against a frozen reference pi_ref,

    l_c = log pi(y_c|x) - log pi_ref(y_c|x),   l_r = likewise for y_r,   z = l_c - l_r,   b = beta

the implicit reward of a response is b * l, and the losses (per pair; the batch loss is their mean) are:

    sigmoid       -log sig(b z)                                              DPO (Rafailov et al. 2023)
    conservative  -(1-e) log sig(b z) - e log sig(-b z)                      cDPO (Mitchell 2023), e = label smoothing
    robust        (-(1-e) log sig(b z) + e log sig(-b z)) / (1 - 2e)         rDPO (Chowdhury et al. 2024), unbiased
    hinge         max(0, 1 - b z)                                            SLiC-HF (Zhao et al. 2023)
    ipo           (l_c / n_c - l_r / n_r - 1 / (2 b))^2                      IPO (Azar et al. 2023); n: response tokens
    sigmoid_norm  -log sig(b (l_c / n_c - l_r / n_r))                        length-normalised DPO
    exo_pair      KL(softmax(b l) || (1-e, e)) over {c, r}                   EXO (Ji et al. 2024)
    nca_pair      -log sig(b l_c) - (log sig(-b l_c) + log sig(-b l_r)) / 2  NCA (Chen et al. 2024)
    bco_pair      -log sig(b l_c) - log sig(-b l_r)                          BCO (Jung et al. 2024)
    sppo_hard     (l_c - 1 / (2 b))^2 + (l_r + 1 / (2 b))^2                  SPPO, hard labels (Wu et al. 2024)
    aot           cDPO on sorted(log pi_c - log pi_r) - sorted(ref ones)     AOT (Melnyk et al. 2024), over the batch
    aot_unpaired  cDPO on sorted(l_c) - sorted(l_r)                          AOT, unpaired
    apo_zero      (1 - sig(b l_c)) + sig(b l_r)                              APO (D'Oosterlinck et al. 2024)
    apo_down      sig(b l_c) + (1 - sig(b z))                                APO
    discopop      (1-w) (-log sig(b z)) + w exp(-b z), w = sig(b z / tau)    DiscoPOP (Lu et al. 2024)
    simpo         cDPO on b (lbar_c - lbar_r) - gamma, lbar = log pi / n     SimPO (Meng et al. 2024): no reference

(these are TRL's formulas, which the tests hold the code to). Reference log-probs are computed once, before training
(`cache_reference_logps`), and stored with the pairs: the reference never runs during training. With LoRA the
reference is the base with the adapter disabled, so only one model is in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.align.preference import TokenizedPair, pair_batch
from llmkit.align.settings import DPOSettings
from llmkit.errors import LlmkitError
from llmkit.train.objectives import TokenLoss


@dataclass
class PairLogps:
    """Summed response log-probs of P pairs under the policy (and the reference), and response token counts; (P,)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(l_c, l_r): log-ratios to the reference."""
        if self.ref_chosen is None or self.ref_rejected is None:
            raise LlmkitError("this loss needs the reference model's log-probs, which are not cached with the pairs; "
                              "call llmkit.align.dpo.cache_reference_logps before training (or use --loss simpo)")
        return self.chosen - self.ref_chosen, self.rejected - self.ref_rejected


def response_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-prob of the response tokens, response token count), each (rows,), of a preference batch.
    Token t is predicted at position t - 1, so the LM head runs only at the positions before a response token."""
    mask = batch["response_mask"].bool()  # (R, T)
    predicted = mask[:, 1:]  # (R, T-1): is token t+1 a response token
    at = F.pad(predicted, (0, 1), value=False)  # (R, T): positions whose logits are needed
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], logits_at=at)  # (N, V)
    targets = batch["input_ids"][:, 1:][predicted]  # (N,)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    rows = torch.arange(mask.shape[0], device=mask.device)[:, None].expand_as(predicted)[predicted]  # (N,)
    sums = torch.zeros(mask.shape[0], device=token_logps.device).index_add(0, rows, token_logps)
    return sums, predicted.sum(dim=1)


def pair_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> PairLogps:
    logps, counts = response_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = counts.chunk(2)
    return PairLogps(chosen, rejected, batch.get("ref_chosen_logps"), batch.get("ref_rejected_logps"),
                     chosen_tokens, rejected_tokens)


# ---- the losses (module docstring) -----------------------------------------------------------------------------------

def _smoothed(logits: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def _length_normalised_delta(s: PairLogps) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return l_c / s.chosen_tokens.clamp(min=1) - l_r / s.rejected_tokens.clamp(min=1)


def _delta(s: PairLogps) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return l_c - l_r


def _robust(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    z, eps = o.beta * _delta(s), o.label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def _exo_pair(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    z, eps = o.beta * _delta(s), torch.tensor(o.label_smoothing)
    return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-eps))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(eps)))


def _nca_pair(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return -F.logsigmoid(o.beta * l_c) - 0.5 * F.logsigmoid(-o.beta * l_c) - 0.5 * F.logsigmoid(-o.beta * l_r)


def _bco_pair(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return -F.logsigmoid(o.beta * l_c) - F.logsigmoid(-o.beta * l_r)


def _sppo_hard(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return (l_c - 0.5 / o.beta) ** 2 + (l_r + 0.5 / o.beta) ** 2


def _aot(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    s.ratios()  # checks the reference is there
    delta = (s.chosen - s.rejected).sort(dim=0).values - (s.ref_chosen - s.ref_rejected).sort(dim=0).values
    return _smoothed(o.beta * delta, o.label_smoothing)


def _aot_unpaired(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return _smoothed(o.beta * (l_c.sort(dim=0).values - l_r.sort(dim=0).values), o.label_smoothing)


def _apo_zero(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return 1 - torch.sigmoid(o.beta * l_c) + torch.sigmoid(o.beta * l_r)


def _apo_down(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    l_c, l_r = s.ratios()
    return torch.sigmoid(o.beta * l_c) + 1 - torch.sigmoid(o.beta * (l_c - l_r))


def _discopop(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    z = o.beta * _delta(s)
    mix = torch.sigmoid(z / o.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


def _simpo(s: PairLogps, o: DPOSettings) -> torch.Tensor:
    average = s.chosen / s.chosen_tokens.clamp(min=1) - s.rejected / s.rejected_tokens.clamp(min=1)
    return _smoothed(o.beta * average - o.simpo_gamma, o.label_smoothing)


# name -> per-pair loss (P,) of (log-probs, settings); the names are llmkit.align.settings.PreferenceLoss
LOSSES: dict[str, Callable[[PairLogps, DPOSettings], torch.Tensor]] = {
    "sigmoid": lambda s, o: -F.logsigmoid(o.beta * _delta(s)),
    "conservative": lambda s, o: _smoothed(o.beta * _delta(s), o.label_smoothing),
    "robust": _robust,
    "hinge": lambda s, o: torch.relu(1 - o.beta * _delta(s)),
    "ipo": lambda s, o: (_length_normalised_delta(s) - 1 / (2 * o.beta)) ** 2,
    "sigmoid_norm": lambda s, o: -F.logsigmoid(o.beta * _length_normalised_delta(s)),
    "exo_pair": _exo_pair,
    "nca_pair": _nca_pair,
    "bco_pair": _bco_pair,
    "sppo_hard": _sppo_hard,
    "aot": _aot,
    "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero,
    "apo_down": _apo_down,
    "discopop": _discopop,
    "simpo": _simpo,
}


def preference_losses(scores: PairLogps, settings: DPOSettings) -> torch.Tensor:
    """Per-pair losses (P,) of the loss `settings.loss` names."""
    return LOSSES[settings.loss](scores, settings)


def implicit_rewards(scores: PairLogps, settings: DPOSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) rewards (P,) as TRL logs them: b * log-ratio to the reference; reference-free SimPO:
    b * the mean token log-prob."""
    if settings.reference_free:
        return (settings.beta * scores.chosen / scores.chosen_tokens.clamp(min=1),
                settings.beta * scores.rejected / scores.rejected_tokens.clamp(min=1))
    l_c, l_r = scores.ratios()
    return settings.beta * l_c, settings.beta * l_r


def reward_metrics(scores: PairLogps, settings: DPOSettings) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the loop logs their means): rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies (share with chosen reward > rejected, strictly, as TRL), logps/chosen, logps/rejected."""
    chosen, rejected = (reward.detach() for reward in implicit_rewards(scores, settings))
    return {"rewards/chosen": chosen.sum(), "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(), "rewards/accuracies": (chosen > rejected).float().sum(),
            "logps/chosen": scores.chosen.detach().sum(), "logps/rejected": scores.rejected.detach().sum()}


def dpo_objective(settings: DPOSettings):  # noqa: ANN201 (an llmkit.train.objectives.Objective)
    """The loop's objective: the summed per-pair loss over the batch's pairs (the loop averages over pairs), with
    the reward metrics."""

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLoss:
        scores = pair_logps(model, batch)
        losses = preference_losses(scores, settings)
        return TokenLoss(losses.sum(), torch.tensor(len(losses)), metrics=reward_metrics(scores, settings))

    objective.loss_label = f"{settings.loss} preference loss (per pair)"
    return objective


@torch.no_grad()
def cache_reference_logps(model: nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, batch_size: int = 8) -> None:
    """Store the reference's summed response log-probs in each pair (ref_chosen_logp, ref_rejected_logp). The
    reference is `model` as it is now; a model carrying LoRA adapters is scored with them disabled (the base)."""
    from contextlib import nullcontext

    from llmkit.peft.lora import disable_adapters, lora_layers

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with disable_adapters(model) if lora_layers(model) else nullcontext():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start:start + batch_size]
            batch = {name: tensor.to(device) for name, tensor in pair_batch(chunk, pad_id).items()}
            logps, _ = response_logps(model, batch)
            chosen, rejected = logps.chunk(2)
            for pair, chosen_logp, rejected_logp in zip(chunk, chosen.tolist(), rejected.tolist(), strict=True):
                pair.ref_chosen_logp, pair.ref_rejected_logp = chosen_logp, rejected_logp
    model.train(was_training)


@torch.no_grad()
def preference_metrics(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], settings: DPOSettings
                       ) -> dict[str, float]:
    """Mean loss and reward metrics over held-out batches (each pair once)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals: dict[str, float] = {}
    count = 0
    for batch in batches:
        scores = pair_logps(model, {name: tensor.to(device) for name, tensor in batch.items()})
        values = {"loss": preference_losses(scores, settings).sum(), **reward_metrics(scores, settings)}
        for name, value in values.items():
            totals[name] = totals.get(name, 0.0) + float(value)
        count += len(scores.chosen)
    model.train(was_training)
    if count == 0:
        raise LlmkitError("no held-out pairs to measure; use more data or a larger --held_out")
    return {name: total / count for name, total in totals.items()}
