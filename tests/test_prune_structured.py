"""Structured pruning (llmkit/quant/prune_structured.py): removing a head / neurons / blocks equals zeroing / skipping
them in the original, importance picks the lowest scores, and the smaller checkpoint reloads."""

import copy

import pytest
import torch

from llmkit import LlmkitError
from llmkit.checkpoints import load_model, save_model
from llmkit.quant.prune_structured import (
    head_importance,
    neuron_importance,
    prune_structured,
    remove_heads,
    remove_layers,
    remove_neurons,
)
from tests.helpers import tiny_decoder

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = 1e-6  # float64 models: only the summation order differs (fewer terms vs terms that are exact zeros)


def float64_decoder(**overrides) -> torch.nn.Module:
    return tiny_decoder(n_layers=3, **overrides).double()


def ids(n: int = 4, length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(1))


def test_removing_heads_equals_zeroing_their_output_projection():
    model = float64_decoder()  # tiny-llama: 4 query heads, 2 key/value groups of 2, head_dim 16
    keep = [[0, 3], [1, 2], [1, 3]]  # one head of each group per layer
    smaller = remove_heads(model, keep)
    assert smaller.config.n_heads == 2 and smaller.config.n_kv_heads == 2 and smaller.config.head_dim == 16
    assert smaller.blocks[0].attn.q_proj.weight.shape == (32, 64) and smaller.blocks[0].attn.o_proj.weight.shape == (64, 32)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for block, heads in zip(zeroed.blocks, keep, strict=True):
            for head in set(range(4)) - set(heads):
                block.attn.o_proj.weight[:, head * 16 : (head + 1) * 16] = 0
    torch.testing.assert_close(smaller(ids()), zeroed(ids()), rtol=0, atol=TOLERANCE)
    assert (smaller(ids()) - model(ids())).abs().max() > 1e-4  # the heads did matter


def test_removing_neurons_equals_zeroing_their_down_projection_columns():
    model = float64_decoder()
    generator = torch.Generator().manual_seed(0)
    keep = [sorted(torch.randperm(128, generator=generator)[:96].tolist()) for _ in range(3)]
    smaller = remove_neurons(model, keep)
    assert smaller.config.d_ff == 96 and smaller.blocks[1].mlp.down_proj.weight.shape == (64, 96)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for block, units in zip(zeroed.blocks, keep, strict=True):
            dropped = sorted(set(range(128)) - set(units))
            block.mlp.down_proj.weight[:, dropped] = 0
    torch.testing.assert_close(smaller(ids()), zeroed(ids()), rtol=0, atol=TOLERANCE)


def test_removing_layers_equals_skipping_them():
    model = float64_decoder()
    smaller = remove_layers(model, [0, 2])
    assert smaller.config.n_layers == 2
    skipped = copy.deepcopy(model)
    skipped.blocks = torch.nn.ModuleList([skipped.blocks[0], skipped.blocks[2]])
    torch.testing.assert_close(smaller(ids()), skipped(ids()), rtol=0, atol=TOLERANCE)
    # the renumbered blocks write their own KV-cache slots: decoding with a cache gives the same logits
    cache = smaller.new_cache(4, 24)
    torch.testing.assert_close(smaller(ids()[:, :12], cache=cache)[:, -1], smaller(ids()[:, :12])[:, -1],
                               rtol=0, atol=TOLERANCE)


def test_removing_layers_keeps_the_kept_layers_types():
    model = tiny_decoder(n_layers=3, sliding_window=8, layer_types=("local", "global", "local"))
    smaller = remove_layers(model, [1, 2])
    assert smaller.config.layer_types == ("global", "local") and smaller.config.local_layers == (1,)


def test_magnitude_importance_removes_the_lowest_scored_heads_and_neurons():
    model = tiny_decoder(n_layers=2)
    scores = head_importance(model)  # (layers, heads)
    by_hand = torch.stack([block.attn.o_proj.weight.detach().abs().reshape(64, 4, 16).sum((0, 2))
                           for block in model.blocks])
    torch.testing.assert_close(scores, by_hand)
    smaller = prune_structured(model, "heads", 0.5, importance="magnitude")
    for layer, block in enumerate(smaller.blocks):
        kept = [int(torch.argmax(scores[layer, 2 * g : 2 * g + 2])) + 2 * g for g in range(2)]
        channels = torch.cat([torch.arange(h * 16, (h + 1) * 16) for h in kept])
        assert torch.equal(block.attn.q_proj.weight, model.blocks[layer].attn.q_proj.weight[channels])
    neurons = neuron_importance(model)
    smaller = prune_structured(model, "neurons", 0.25, importance="magnitude")
    kept = torch.topk(neurons[0], 96).indices.sort().values
    assert torch.equal(smaller.blocks[0].mlp.up_proj.weight, model.blocks[0].mlp.up_proj.weight[kept])


def test_activation_importance_drops_the_block_that_changes_the_stream_least(tmp_path):
    model = tiny_decoder(n_layers=3)
    with torch.no_grad():  # block 1 adds (almost) nothing to the residual stream
        model.blocks[1].attn.o_proj.weight.mul_(1e-3)
        model.blocks[1].mlp.down_proj.weight.mul_(1e-3)
    smaller = prune_structured(model, "layers", 0.34, calibration=ids())
    assert smaller.config.n_layers == 2
    assert torch.equal(smaller.blocks[1].attn.q_proj.weight, model.blocks[2].attn.q_proj.weight)


def test_the_smaller_checkpoint_reloads_and_matches(tmp_path):
    model = tiny_decoder(n_layers=2)
    smaller = prune_structured(model, "heads", 0.5, calibration=ids())
    smaller = prune_structured(smaller, "neurons", 0.5, calibration=ids())
    save_model(smaller, tmp_path / "small")
    reloaded = load_model(tmp_path / "small")
    assert (reloaded.config.n_heads, reloaded.config.d_ff) == (2, 64)
    assert reloaded.num_parameters() < model.num_parameters()
    torch.testing.assert_close(reloaded(ids()), smaller(ids()), rtol=0, atol=0)


@pytest.mark.parametrize(("structure", "amount", "importance", "message"), [
    ("heads", 0.1, "magnitude", "removes 0"),
    ("heads", 1.0, "magnitude", "is not a fraction"),
    ("neurons", 0.5, "activation", r"pass --data \(or --importance magnitude\)"),
    ("layers", 0.5, "activation", "pass --data"),
    ("layers", 0.5, "magnitude", "drop --importance magnitude"),
    ("experts", 0.5, "magnitude", "is not one of"),
])
def test_bad_structured_settings_raise_one_readable_line(structure, amount, importance, message):
    with pytest.raises(LlmkitError, match=message) as error:
        prune_structured(tiny_decoder(), structure, amount, importance=importance)
    assert "\n" not in str(error.value)


def test_remove_heads_refuses_uneven_groups():
    with pytest.raises(LlmkitError, match="from each of the 2 key/value groups"):
        remove_heads(tiny_decoder(), [[0, 1], [0, 1]])  # both from group 0


def test_block_influence_is_one_minus_the_mean_cosine_between_each_blocks_input_and_output():
    from llmkit.quant.prune_structured import block_influence

    model = float64_decoder().eval()
    captured: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {i: [] for i in range(3)}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: captured[i].append((args[0], out)))
             for i, block in enumerate(model.blocks)]
    calibration = ids()
    with torch.no_grad():
        model(calibration)  # the whole model at once: a walk independent of block_influence's block-by-block one
    for hook in hooks:
        hook.remove()
    expected = [1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean().item() for [(x, y)] in captured.values()]
    torch.testing.assert_close(block_influence(model, calibration, batch_size=3), torch.tensor(expected),
                               rtol=0, atol=1e-7)  # scores are kept in float32


def test_an_identity_block_has_zero_influence_and_is_dropped_first():
    from llmkit.quant.prune_structured import block_influence, most_influential_blocks

    model = tiny_decoder(n_layers=4)
    with torch.no_grad():  # zeroed output projections: block 2 returns its input unchanged
        model.blocks[2].attn.o_proj.weight.zero_()
        model.blocks[2].mlp.down_proj.weight.zero_()
    influence = block_influence(model, ids())
    assert influence[2].abs() < 1e-6 and bool((influence[[0, 1, 3]] > 1e-3).all())
    assert most_influential_blocks(influence, 3) == [0, 1, 3]
    assert most_influential_blocks(influence, 1) == [int(influence.argmax())]
    with pytest.raises(LlmkitError, match="keeping 5 of 4 blocks is impossible"):
        most_influential_blocks(influence, 5)
