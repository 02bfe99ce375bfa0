"""The preference losses against hand-computed values on tiny tensors and against TRL's own code (trl 1.16:
DPOTrainer._compute_loss for the DPO family, CPOTrainer.cpo_loss for SimPO) on random log-probs, <= 1e-6."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from llmkit.align.dpo import LOSSES, PairLogps, implicit_rewards, preference_losses, reward_metrics
from llmkit.align.settings import DPOSettings, PreferenceLoss
from llmkit.errors import LlmkitError

TOLERANCE = 1e-6  # float64 on both sides: only the order of operations differs
SMOOTHING = {"conservative": 0.1, "robust": 0.2, "exo_pair": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "simpo": 0.1}


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def one_pair(chosen: float, rejected: float, ref_chosen: float, ref_rejected: float, n_c: int = 1, n_r: int = 1
             ) -> PairLogps:
    t = lambda value: torch.tensor([value], dtype=torch.float64)  # noqa: E731
    return PairLogps(t(chosen), t(rejected), t(ref_chosen), t(ref_rejected), t(n_c), t(n_r))


def test_every_named_loss_is_implemented():
    assert set(LOSSES) == set(PreferenceLoss.__args__)


@pytest.mark.parametrize(("loss", "expected"), [
    # l_c = -1 - (-2) = 1, l_r = -3 - (-2.5) = -0.5, z = 1.5, beta = 0.5: b z = 0.75
    ("sigmoid", -math.log(sig(0.75))),
    ("conservative", -0.9 * math.log(sig(0.75)) - 0.1 * math.log(sig(-0.75))),
    ("robust", (-0.8 * math.log(sig(0.75)) + 0.2 * math.log(sig(-0.75))) / 0.6),
    ("hinge", 1 - 0.75),
    ("ipo", (1 / 2 - (-0.5) / 4 - 1 / (2 * 0.5)) ** 2),  # n_c = 2, n_r = 4 response tokens
    ("sigmoid_norm", -math.log(sig(0.5 * (1 / 2 + 0.5 / 4)))),
    ("bco_pair", -math.log(sig(0.5)) - math.log(sig(0.25))),
    ("sppo_hard", (1 - 1) ** 2 + (-0.5 + 1) ** 2),
    ("apo_zero", 1 - sig(0.5) + sig(-0.25)),
    ("simpo", -0.9 * math.log(sig(0.5 * (-1 / 2 + 3 / 4) - 0.5)) - 0.1 * math.log(sig(-(0.5 * (-1 / 2 + 3 / 4) - 0.5)))),
])
def test_losses_match_hand_computed_values(loss, expected):
    settings = DPOSettings(loss=loss, beta=0.5, label_smoothing=SMOOTHING.get(loss, 0.0))
    value = preference_losses(one_pair(-1.0, -3.0, -2.0, -2.5, n_c=2, n_r=4), settings)
    assert float(value) == pytest.approx(expected, abs=1e-12)


def test_sigmoid_gradient_pushes_chosen_up_and_rejected_down():
    scores = one_pair(-1.0, -3.0, -2.0, -2.5)
    scores.chosen.requires_grad_(True)
    scores.rejected.requires_grad_(True)
    preference_losses(scores, DPOSettings(beta=0.5)).sum().backward()
    # d/dl_c -log sig(b z) = -b (1 - sig(b z))
    assert float(scores.chosen.grad) == pytest.approx(-0.5 * (1 - sig(0.75)))
    assert float(scores.rejected.grad) == pytest.approx(0.5 * (1 - sig(0.75)))


def test_rewards_are_beta_times_log_ratios():
    chosen, rejected = implicit_rewards(one_pair(-1.0, -3.0, -2.0, -2.5), DPOSettings(beta=0.5))
    assert (float(chosen), float(rejected)) == (0.5, -0.25)
    metrics = reward_metrics(one_pair(-1.0, -3.0, -2.0, -2.5), DPOSettings(beta=0.5))
    assert float(metrics["rewards/margins"]) == 0.75 and float(metrics["rewards/accuracies"]) == 1.0


def test_reference_losses_refuse_missing_reference():
    scores = one_pair(-1.0, -3.0, 0.0, 0.0)
    scores.ref_chosen = scores.ref_rejected = None
    with pytest.raises(LlmkitError, match="reference"):
        preference_losses(scores, DPOSettings(loss="sigmoid"))
    assert torch.isfinite(preference_losses(scores, DPOSettings(loss="simpo")))  # reference-free


@pytest.mark.parametrize(("kwargs", "flag"), [({"beta": 0}, "--beta"), ({"loss": "conservative"}, "--label_smoothing"),
                                              ({"label_smoothing": 0.5}, "--label_smoothing"), ({"loss": "kto"}, "--loss")])
def test_bad_settings_name_the_flag(kwargs, flag):
    with pytest.raises(LlmkitError, match=flag):
        DPOSettings(**kwargs)


# ---- TRL ------------------------------------------------------------------------------------------------------------

TRL_DPO_LOSSES = ["sigmoid", "hinge", "ipo", "sigmoid_norm", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop"]


def random_scores(pairs: int = 6, seed: int = 0) -> tuple[PairLogps, torch.Tensor, torch.Tensor]:
    """Random summed log-probs with response lengths, and TRL's per-token inputs that sum to them: (scores,
    per_token_logps (2P, T-1), completion_mask (2P, T))."""
    generator = torch.Generator().manual_seed(seed)
    width = 8
    lengths = torch.randint(1, width - 1, (2 * pairs,), generator=generator)
    completion = torch.zeros(2 * pairs, width, dtype=torch.long)
    for row, length in enumerate(lengths.tolist()):
        completion[row, width - length:] = 1
    per_token = -torch.rand(2 * pairs, width - 1, generator=generator, dtype=torch.float64) * 3 * completion[:, 1:]
    sums = per_token.sum(dim=1)
    ref = sums + torch.randn(2 * pairs, generator=generator, dtype=torch.float64)
    counts = completion.sum(dim=1).double()
    scores = PairLogps(*sums.chunk(2), *ref.chunk(2), *counts.chunk(2))
    return scores, per_token, completion


def trl_dpo(loss: str, scores: PairLogps, per_token: torch.Tensor, completion: torch.Tensor, beta: float,
            smoothing: float, tau: float) -> tuple[float, dict[str, float]]:
    """TRL's DPOTrainer._compute_loss on a stand-in model that returns these per-token log-probs (no model loaded,
    reference log-probs precomputed, as TRL's precompute_ref_log_probs)."""
    from trl.trainer.dpo_trainer import DPOTrainer

    shape = per_token.shape
    outputs = SimpleNamespace(log_probs=per_token, entropy=torch.zeros(shape), mean_logits=torch.zeros(shape),
                              is_top1=torch.zeros(shape, dtype=torch.bool))
    model = SimpleNamespace(training=True)
    identity = lambda tensor: tensor  # noqa: E731
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=SimpleNamespace(device="cpu", gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss], loss_weights=[1.0], beta=beta, label_smoothing=smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=tau), _metrics={"train": defaultdict(list)}, _total_train_tokens=0,
        _tp_size=1)
    inputs = {"input_ids": torch.zeros(shape[0], shape[1] + 1, dtype=torch.long), "completion_mask": completion,
              "attention_mask": torch.ones_like(completion), "ref_chosen_logps": scores.ref_chosen,
              "ref_rejected_logps": scores.ref_rejected}
    loss_value = trainer._compute_loss(lambda **kwargs: outputs, inputs, return_outputs=False)
    return float(loss_value), {name: values[-1] for name, values in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss", TRL_DPO_LOSSES)
def test_losses_and_reward_metrics_match_trl(loss):
    scores, per_token, completion = random_scores()
    settings = DPOSettings(loss=loss, beta=0.3, label_smoothing=SMOOTHING.get(loss, 0.0), discopop_tau=0.05)
    expected, trl_metrics = trl_dpo(loss, scores, per_token, completion, settings.beta, settings.label_smoothing,
                                    settings.discopop_tau)
    assert float(preference_losses(scores, settings).mean()) == pytest.approx(expected, abs=TOLERANCE)
    ours = {name: float(value) / len(scores.chosen) for name, value in reward_metrics(scores, settings).items()}
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                 "logps/rejected"):
        assert ours[name] == pytest.approx(trl_metrics[name], abs=TOLERANCE), name


def test_conservative_is_trl_cpo_sigmoid_with_label_smoothing_and_simpo_matches_trl():
    """TRL 1.16's DPO sigmoid has no label smoothing any more; its CPO trainer keeps cDPO's smoothed sigmoid, on
    log-probs without a reference (cpo_loss), and SimPO on length-averaged log-probs."""
    from trl.experimental.cpo.cpo_trainer import CPOTrainer

    scores, _, _ = random_scores(seed=1)
    for loss, ours_settings in [("simpo", DPOSettings(loss="simpo", beta=2.0, label_smoothing=0.1, simpo_gamma=0.7)),
                                ("sigmoid", DPOSettings(loss="conservative", beta=0.3, label_smoothing=0.1))]:
        trainer = SimpleNamespace(alpha=0.0, loss_type=loss, beta=ours_settings.beta, simpo_gamma=0.7,
                                  label_smoothing=0.1, accelerator=SimpleNamespace(device="cpu"))
        if loss == "simpo":
            chosen, rejected = scores.chosen / scores.chosen_tokens, scores.rejected / scores.rejected_tokens
            ours = preference_losses(scores, ours_settings)
        else:  # against zero reference log-probs, the log-ratios are the log-probs themselves
            chosen, rejected = scores.chosen, scores.rejected
            zero = PairLogps(chosen, rejected, torch.zeros_like(chosen), torch.zeros_like(rejected),
                             scores.chosen_tokens, scores.rejected_tokens)
            ours = preference_losses(zero, ours_settings)
        expected, trl_chosen, _ = CPOTrainer.cpo_loss(trainer, chosen, rejected)
        assert torch.allclose(ours, expected, atol=TOLERANCE, rtol=0), loss
        if loss == "simpo":
            assert torch.allclose(implicit_rewards(scores, ours_settings)[0], trl_chosen, atol=TOLERANCE, rtol=0)
