"""AdamW parameter groups and learning-rate schedules."""

from __future__ import annotations

import math

import pytest
import torch

from llmkit.config import Config
from llmkit.errors import LlmkitError
from llmkit.models.decoder import Decoder
from llmkit.train.optim import build_optimizer, build_scheduler, lr_multiplier, parameter_groups


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = Decoder(Config.from_name("tiny-gpt2"))  # layer norms with biases, learned positions, tied head
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): name for name, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.q_proj.weight" in decayed and "blocks.1.mlp.down_proj.weight" in decayed
    assert {"embed.weight", "pos_embed.weight", "final_norm.weight", "final_norm.bias", "blocks.0.attn.q_proj.bias"} <= kept
    assert decayed.isdisjoint(kept) and len(decayed) + len(kept) == len(list(model.parameters()))


def test_frozen_parameters_are_left_out_and_none_trainable_is_an_error():
    model = Decoder(Config.from_name("tiny-llama"))
    model.embed.weight.requires_grad_(False)
    groups = parameter_groups(model, 0.1)
    assert all(p is not model.embed.weight for group in groups for p in group["params"])
    model.requires_grad_(False)
    with pytest.raises(LlmkitError, match="no trainable parameters"):
        parameter_groups(model, 0.1)


def test_optimizer_uses_the_fused_kernel_on_cpu():
    optimizer = build_optimizer(Decoder(Config.from_name("tiny-llama")), lr=1e-3)
    assert optimizer.defaults["fused"] is True


@pytest.mark.parametrize(("schedule", "step", "expected"), [
    ("cosine", 0, 0.1),  # warmup: (step + 1) / warmup_steps
    ("cosine", 9, 1.0),
    ("cosine", 10, 1.0),  # decay starts at the peak
    ("cosine", 55, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))),
    ("cosine", 100, 0.1),  # ends at min_lr_ratio
    ("cosine", 500, 0.1),  # and stays there
    ("linear", 55, 0.1 + 0.9 * 0.5),
    ("linear", 100, 0.1),
    ("constant", 80, 1.0),
])
def test_schedule_values(schedule, step, expected):
    assert lr_multiplier(step, schedule, warmup_steps=10, max_steps=100, min_lr_ratio=0.1) == pytest.approx(expected)


def test_scheduler_drives_the_optimizer_learning_rate():
    optimizer = build_optimizer(Decoder(Config.from_name("tiny-llama")), lr=1e-3)
    scheduler = build_scheduler(optimizer, "linear", warmup_steps=2, max_steps=4, min_lr_ratio=0.0)
    seen = []
    for _ in range(4):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([5e-4, 1e-3, 1e-3, 5e-4])


def test_lr_scaled_parameters_get_their_own_group_that_the_schedule_scales_alike():
    model = Decoder(Config.from_name("tiny-llama"))
    model.final_norm.weight.lr_scale = 10.0  # a no-decay parameter at 10x the learning rate
    optimizer = build_optimizer(model, lr=1e-3)
    scaled = [group for group in optimizer.param_groups
              if len(group["params"]) == 1 and group["params"][0] is model.final_norm.weight]
    assert len(scaled) == 1 and scaled[0]["weight_decay"] == 0.0
    assert all(model.final_norm.weight is not p for group in optimizer.param_groups[:2] for p in group["params"])
    scheduler = build_scheduler(optimizer, "linear", warmup_steps=2, max_steps=4, min_lr_ratio=0.0)
    seen = []
    for _ in range(3):
        seen += [optimizer.param_groups[0]["lr"], scaled[0]["lr"]]
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([5e-4, 5e-3, 1e-3, 1e-2, 1e-3, 1e-2])
    with pytest.raises(LlmkitError, match="lr_scale=10.0: pass lr"):
        parameter_groups(model, 0.1)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(schedule="exponential", warmup_steps=0, max_steps=10), "unknown learning-rate schedule 'exponential'"),
    (dict(schedule="cosine", warmup_steps=20, max_steps=10), "warmup_steps=20 must be between 0 and max_steps=10"),
    (dict(schedule="cosine", warmup_steps=0, max_steps=10, min_lr_ratio=5.0), r"min_lr_ratio=5.0 must be in \[0, 1\]"),
    (dict(schedule="linear", warmup_steps=0, max_steps=10, min_lr_ratio=-0.1), r"min_lr_ratio=-0.1 must be in \[0, 1\]"),
])
def test_bad_schedules_are_refused(kwargs, message):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
    with pytest.raises(LlmkitError, match=message):
        build_scheduler(optimizer, **kwargs)
