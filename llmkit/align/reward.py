"""Reward model: a decoder backbone and a scalar head read at each sequence's last real token, trained on preference
pairs with the Bradley-Terry loss (Bradley & Terry 1952; as in InstructGPT, Ouyang et al. 2022):

    P(chosen > rejected) = sigmoid(r_c - r_r)        loss = -log sigmoid(r_c - r_r - m)

with an optional margin m (Llama 2, Touvron et al. 2023: how much better the chosen one is; 0 when not given).

Where the score is read matters. The head sees the final hidden state of the LAST REAL token (the response's EOS),
found from the attention mask, never from the pad id: SmolLM2's pad id equals its EOS id, so "the first pad token"
is the response's own EOS (or, with left padding, the padding before the prompt), and reading next to it scores a
wrong position; that is the known cause of the ~50-60% pairwise accuracy in TRL users' reports.

Saved as a directory (`save_reward_model`): a complete llmkit checkpoint of the backbone (any LoRA adapter merged
in; `llmkit chat --model DIR` runs it as a plain language model) plus `reward_head.safetensors` (the head's weight
(1, d_model)) and `reward_model.json` ({"kind": "reward_model", ...}) that marks it as a reward model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.errors import LlmkitError
from llmkit.io import atomic_write, atomic_write_text, read_json_object
from llmkit.tokenizer import Tokenizer
from llmkit.train.objectives import TokenLoss

HEAD_FILE = "reward_head.safetensors"
HEAD_KEY = "score.weight"
MARKER_FILE = "reward_model.json"
REWARD_KIND = "reward_model"


class RewardModel(nn.Module):
    """backbone (a Decoder) -> final norm -> hidden state at the last real token (B, C) -> score (B,)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config  # the loop and checkpoints read the model's config
        weight = backbone.embed.weight
        self.score = nn.Linear(backbone.config.d_model, 1, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.normal_(self.score.weight, std=1 / (backbone.config.d_model + 1) ** 0.5)  # as TRL's reward head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) of token ids (B, T) whose real tokens `attention_mask` marks with 1 (left or right padding)."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # (B, T, C)
        last = last_real_index(attention_mask, input_ids.shape)  # (B,)
        final = hidden[torch.arange(len(last), device=hidden.device), last.to(hidden.device)]  # (B, C)
        return self.score(self.backbone.final_norm(final)).squeeze(-1).float()


def last_real_index(attention_mask: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    """Index (B,) of each row's last token whose mask is 1: the largest such position, whatever side the padding is
    on (and whatever the pad id is). Without a mask every token of the (B, T) batch is real: T - 1."""
    if attention_mask is None:
        return torch.full((shape[0],), shape[1] - 1, dtype=torch.long)
    if not bool(attention_mask.bool().any(dim=1).all()):
        raise LlmkitError("a row of the batch has no real token (its attention_mask is all 0); drop empty sequences")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.bool() * positions).argmax(dim=1)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Per-pair -log sigmoid(r_c - r_r - margin) (P,)."""
    return -F.logsigmoid(chosen - rejected - margin)


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen rewards, rejected rewards), each (P,), of a preference batch (llmkit.align.preference.pair_batch)."""
    rewards = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (2P,)
    return rewards.chunk(2)


def reward_objective(margin: float = 0.0):  # noqa: ANN201 (an llmkit.train.objectives.Objective)
    """The loop's objective: summed Bradley-Terry loss over the batch's pairs, with accuracy (r_c > r_r) and the
    reward margin (r_c - r_r) as summed metrics (the loop logs their means)."""

    def objective(model: nn.Module, batch: dict[str, torch.Tensor]) -> TokenLoss:
        chosen, rejected = pair_rewards(model, batch)
        losses = bradley_terry_loss(chosen, rejected, margin)
        metrics = {"accuracy": wins(chosen, rejected).sum(), "margin": (chosen - rejected).detach().sum()}
        return TokenLoss(losses.sum(), torch.tensor(len(losses)), metrics=metrics)

    objective.loss_label = "Bradley-Terry loss (nats/pair)"
    return objective


def wins(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """1 where r_c > r_r, 0 where r_c < r_r, 1/2 for a tie (P,): a model that cannot tell the two apart scores the
    0.5 of chance, not 0 (a score read inside the shared prompt ties every pair)."""
    return ((chosen > rejected).float() + (chosen >= rejected).float()).detach() / 2


@torch.no_grad()
def pairwise_accuracy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Held-out pairwise accuracy (share of pairs with r_c > r_r; a tie counts half), mean margin and mean loss."""
    was_training = model.training
    model.eval()
    correct, margins, losses, count = 0.0, 0.0, 0.0, 0
    device = next(model.parameters()).device
    for batch in batches:
        chosen, rejected = pair_rewards(model, {name: tensor.to(device) for name, tensor in batch.items()})
        correct += float(wins(chosen, rejected).sum())
        margins += float((chosen - rejected).sum())
        losses += float(bradley_terry_loss(chosen, rejected).sum())
        count += len(chosen)
    model.train(was_training)
    if count == 0:
        raise LlmkitError("no held-out pairs to measure accuracy on; use more data or a larger --held_out")
    return {"accuracy": correct / count, "margin": margins / count, "loss": losses / count, "pairs": count}


@torch.no_grad()
def score(model: RewardModel, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 8) -> list[float]:
    """The reward of each whole text (prompt and response together), scored as in training: the tokenizer's ids,
    EOS appended, the head read at that EOS. Texts are right-padded in batches of `batch_size`."""
    if tokenizer.eos_id is None:
        raise LlmkitError("the tokenizer has no EOS token; the reward is read at the EOS that ends each text")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    scores: list[float] = []
    for start in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(text) + [tokenizer.eos_id] for text in texts[start:start + batch_size]]
        width = max(map(len, ids))
        input_ids = torch.tensor([row + [pad] * (width - len(row)) for row in ids], device=device)
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids], device=device)
        scores += model(input_ids, attention_mask=mask).tolist()
    model.train(was_training)
    return scores


# ---- files -----------------------------------------------------------------------------------------------------------


def save_reward_model(model: RewardModel, directory: str | Path, tokenizer: Tokenizer | None = None,
                      extra: dict | None = None) -> Path:
    """Write the backbone as an llmkit checkpoint (a LoRA adapter merged into a copy's weights first), the head and
    the marker file; `extra` (e.g. held-out accuracy) is stored in the marker."""
    import copy

    from llmkit.checkpoints import save_model
    from llmkit.peft.lora import lora_layers, merge_and_unload

    directory = Path(directory)
    backbone = model.backbone
    if lora_layers(backbone):
        backbone = merge_and_unload(copy.deepcopy(backbone))
    save_model(backbone, directory, tokenizer=tokenizer)
    head = {HEAD_KEY: model.score.weight.detach().contiguous().cpu()}
    atomic_write(directory / HEAD_FILE, lambda tmp: save_file(head, str(tmp)))
    record = {"kind": REWARD_KIND, "head": HEAD_FILE, "score_at": "last real token", **(extra or {})}
    atomic_write_text(directory / MARKER_FILE, json.dumps(record, indent=2))
    return directory


def is_reward_model(path: str | Path) -> bool:
    return (Path(path) / MARKER_FILE).is_file()


def load_reward_model(path: str | Path, dtype: str = "float32", device: str = "cpu") -> RewardModel:
    """A reward model directory written by `save_reward_model` (in eval mode)."""
    from llmkit.checkpoints import load_model

    path = Path(path)
    if not is_reward_model(path):
        raise LlmkitError(f"{path} is not a reward model (no {MARKER_FILE}); pass the --output of `llmkit reward train`")
    record = read_json_object(path / MARKER_FILE)
    if record.get("kind") != REWARD_KIND:
        raise LlmkitError(f"{path / MARKER_FILE} says kind={record.get('kind')!r}, not {REWARD_KIND!r}; train the "
                          "reward model again with `llmkit reward train`")
    model = RewardModel(load_model(path, dtype=dtype, device=device, arch="decoder"))
    try:
        head = load_file(str(path / HEAD_FILE))
    except (SafetensorError, OSError) as error:
        raise LlmkitError(f"{path / HEAD_FILE} is missing or unreadable ({error}); train the reward model again") from None
    weight = head.get(HEAD_KEY)
    if weight is None or tuple(weight.shape) != tuple(model.score.weight.shape):
        raise LlmkitError(f"{path / HEAD_FILE} has no {HEAD_KEY} of shape {tuple(model.score.weight.shape)}; it "
                          "belongs to another backbone: train the reward model again")
    with torch.no_grad():
        model.score.weight.copy_(weight)
    return model.eval()
