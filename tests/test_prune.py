"""Unstructured and N:M pruning (llmkit/quant/prune.py): exact sparsity, Wanda against a brute-force mask, SparseGPT
against the closed-form OBS update and against magnitude on correlated inputs, masks that survive training."""

import pytest
import torch

from llmkit import LlmkitError
from llmkit.quant.prune import (
    MaskKeeper,
    layer_sparsity,
    lowest_mask,
    n_m_mask,
    prune,
    pruned_masks,
    sparsegpt_prune_weight,
    target_linears,
)
from llmkit.train.loop import train
from llmkit.train.objectives import causal_lm_loss
from llmkit.train.settings import TrainSettings
from tests.helpers import correlated_inputs, tiny_decoder
from tests.train_script import token_source

pytestmark = pytest.mark.usefixtures("one_thread")


def calibration_ids(n: int = 8, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(0))



@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("sparsity", [0.5, 0.25])
def test_each_method_hits_the_sparsity_of_every_layer_exactly(method, sparsity):
    model = tiny_decoder()
    prune(model, method, sparsity=sparsity, calibration=calibration_ids(), progress=False)
    for name, linear in target_linears(model).items():
        zeros = int((linear.weight == 0).sum())
        assert zeros == round(sparsity * linear.weight.numel()), name
    if method == "wanda":  # Wanda's comparison group is the output row: every row hits it too
        for linear in target_linears(model).values():
            assert torch.all((linear.weight == 0).sum(1) == round(sparsity * linear.in_features))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize(("pattern", "n", "m"), [("2:4", 2, 4), ("4:8", 4, 8)])
def test_n_m_patterns_keep_n_of_every_m_consecutive_inputs(method, pattern, n, m):
    model = tiny_decoder()
    prune(model, method, pattern=pattern, calibration=calibration_ids(), progress=False)
    for name, linear in target_linears(model).items():
        groups = linear.weight.reshape(linear.out_features, -1, m)  # (out, in / m, m)
        assert torch.all((groups != 0).sum(-1) == n), name


def test_global_magnitude_hits_the_total_exactly_with_uneven_layers():
    model = tiny_decoder()
    weights = [linear.weight.detach().clone() for linear in target_linears(model).values()]
    prune(model, "magnitude", sparsity=0.3, scope="global")
    total = sum(w.numel() for w in weights)
    zeros = sum(int((linear.weight == 0).sum()) for linear in target_linears(model).values())
    assert zeros == round(0.3 * total)
    # one threshold for all: every kept weight is at least as large as every pruned one, across layers
    kept = torch.cat([w[linear.weight != 0].abs() for w, linear in zip(weights, target_linears(model).values(),
                                                                      strict=True)])
    pruned = torch.cat([w[linear.weight == 0].abs() for w, linear in zip(weights, target_linears(model).values(),
                                                                        strict=True)])
    assert kept.min() >= pruned.max()
    sparsities = set(layer_sparsity(model).values())
    assert len(sparsities) > 1  # the residual projections (smaller init) lose more


def test_wanda_mask_equals_a_brute_force_mask_from_the_layer_inputs():
    model = tiny_decoder()
    ids = calibration_ids()
    captured = []
    handle = model.blocks[0].attn.q_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    with torch.no_grad():
        model(ids)
    handle.remove()
    x = torch.cat([c.reshape(-1, c.shape[-1]) for c in captured]).double()  # (tokens, in)
    weight = model.blocks[0].attn.q_proj.weight.detach().double().clone()
    expected = torch.ones_like(weight, dtype=torch.bool)
    for row in range(weight.shape[0]):  # brute force: each row, its in/2 lowest |W_ij| * ||X_j||_2, one by one
        scores = [(abs(float(weight[row, j])) * float(x[:, j].pow(2).sum().sqrt()), j) for j in range(weight.shape[1])]
        for _, j in sorted(scores)[: weight.shape[1] // 2]:
            expected[row, j] = False
    prune(model, "wanda", sparsity=0.5, calibration=ids, progress=False)
    assert torch.equal(model.blocks[0].attn.q_proj.weight != 0, expected)


def test_sparsegpt_pruning_one_column_equals_the_closed_form_obs_update():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(6, 6, generator=g, dtype=torch.float64)
    hessian = a @ a.t() + 6 * torch.eye(6, dtype=torch.float64)  # a known, well-conditioned H
    weight = torch.tensor([[0.01, 1.0, -2.0, 1.5, 0.7, -1.2]], dtype=torch.float64)  # column 0 is the least salient
    pruned = sparsegpt_prune_weight(weight, hessian, sparsity=1 / 6, percdamp=0.0)
    h_inv = torch.linalg.inv(hessian)
    q = 0
    expected = weight[0] - weight[0, q] / h_inv[q, q] * h_inv[:, q]  # w - (w_q / [H^-1]_qq) H^-1_{:, q}
    assert pruned[0, q] == 0
    torch.testing.assert_close(pruned[0], expected, rtol=0, atol=1e-12)  # float64 throughout


def test_sparsegpt_reconstructs_the_layer_output_better_than_magnitude_and_wanda():
    x = correlated_inputs(width=128)
    weight = torch.randn(32, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hessian = 2 * x.t() @ x / x.shape[0]

    def output_error(w_hat: torch.Tensor) -> float:
        return float(torch.linalg.norm(x @ weight.t() - x @ w_hat.t()))

    magnitude = weight * lowest_mask(weight.abs(), weight.numel() // 2)
    norms = x.pow(2).sum(0).sqrt()
    wanda = weight * torch.ones_like(weight, dtype=torch.bool).scatter_(
        1, torch.argsort(weight.abs() * norms, dim=1)[:, :64], False)
    sparsegpt = sparsegpt_prune_weight(weight, hessian, sparsity=0.5, block_size=64)
    assert int((sparsegpt == 0).sum()) == weight.numel() // 2
    assert output_error(sparsegpt) < 0.7 * output_error(magnitude)
    assert output_error(sparsegpt) < output_error(wanda) < output_error(magnitude)
    two_of_four = sparsegpt_prune_weight(weight, hessian, pattern=(2, 4), block_size=64)
    magnitude_two_of_four = weight * n_m_mask(weight.abs(), 2, 4)
    assert output_error(two_of_four) < 0.7 * output_error(magnitude_two_of_four)


def quiet_settings(**overrides) -> TrainSettings:
    values = dict(max_steps=3, batch_size=4, warmup_steps=1, eval_every=0, log_every=1, checkpoint_every=100, lr=1e-2)
    values.update(overrides)
    return TrainSettings(**values)


def test_masks_survive_adamw_steps_through_the_training_loop(tmp_path):
    model = tiny_decoder()
    model.train()
    prune(model, "magnitude", sparsity=0.5)
    masks = pruned_masks(model)
    before = {name: linear.weight.detach().clone() for name, linear in target_linears(model).items()}
    with MaskKeeper(model):
        train(model, causal_lm_loss, token_source(), quiet_settings(), tmp_path / "kept")
    for name, linear in target_linears(model).items():
        assert torch.equal(linear.weight != 0, masks[name]), name  # zeros stayed zero, kept weights stayed non-zero
        assert not torch.equal(linear.weight, before[name])  # and the kept ones did train
    # without the keeper the same steps fill the zeros in: the test above could fail
    train(model, causal_lm_loss, token_source(), quiet_settings(), tmp_path / "plain")
    assert any(not torch.equal(linear.weight != 0, masks[name]) for name, linear in target_linears(model).items())


def test_mask_keeper_refuses_masks_of_layers_the_model_lacks():
    with pytest.raises(LlmkitError, match="masks name layers the model lacks"):
        MaskKeeper(tiny_decoder(), {"blocks.9.attn.q_proj": torch.ones(64, 64, dtype=torch.bool)})


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(sparsity=1.5), "--sparsity 1.5 is not a fraction"),
    (dict(pattern="3:2"), "N must be from 1 to M - 1"),
    (dict(pattern="two:four"), "is not N:M"),
    (dict(pattern="2:3"), "not a multiple of 3"),
    (dict(sparsity=0.5, pattern="2:4"), "exactly one of --sparsity"),
    (dict(method="wanda", sparsity=0.5), "pass calibration text"),
    (dict(method="wanda", sparsity=0.5, scope="global"), "--scope global ranks weights across layers by magnitude"),
    (dict(method="obs", sparsity=0.5), "is not one of"),
])
def test_bad_settings_raise_one_readable_line(kwargs, message):
    with pytest.raises(LlmkitError, match=message) as error:
        prune(tiny_decoder(), **kwargs)
    assert "\n" not in str(error.value)
