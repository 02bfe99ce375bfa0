"""Teacher logits cached on disk, so several students (or several runs of one) pay for the teacher's forward passes
once. An entry is keyed by the teacher and the data: sha256 of the teacher's weights (`teacher_fingerprint`) names
the cache's sub-folder, sha256 of a batch's token ids and scored positions names the file; a changed teacher or
changed data therefore never reads stale logits.

Full-vocabulary logits are large (SmolLM2: 49,152 floats per position, 100 MB for a batch of 4 x 128 tokens), so
`top_k` keeps the k largest logits of each position (values + ids, 8 bytes each): the teacher's distribution is then
renormalised over those k tokens and its tail has probability 0. Forward KL (Hinton's soft targets) only needs the
teacher's support and works with it; reverse KL and GKD divide by the teacher's probabilities and are refused with
top-k (use the full vocabulary or no cache). Top-k is applied the same way on the fly (`restrict_to_top_k`), so a
cached run and an on-the-fly run see identical teacher logits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llmkit.io import atomic_write

VALUES_KEY, IDS_KEY, LOGITS_KEY = "top_values", "top_ids", "logits"  # tensor names in a cache file
ENTRY_SUFFIX = ".safetensors"


def teacher_fingerprint(teacher: nn.Module) -> str:
    """sha256 over the teacher's tensor names, shapes, dtypes and bytes (its identity, whatever file it came from)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def batch_key(input_ids: torch.Tensor, scored: torch.Tensor, top_k: int | None) -> str:
    """sha256 of a batch's ids (B, T), its scored positions (B, T) and the top-k setting."""
    digest = hashlib.sha256(f"{tuple(input_ids.shape)}:{top_k}".encode())
    digest.update(input_ids.cpu().to(torch.int64).contiguous().numpy().tobytes())
    digest.update(scored.cpu().to(torch.uint8).contiguous().numpy().tobytes())
    return digest.hexdigest()


def restrict_to_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Logits (N, V) with all but each row's k largest set to -inf (probability 0 after softmax); None keeps all."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    values, ids = logits.topk(top_k, dim=-1)  # (N, k)
    return torch.full_like(logits, float("-inf")).scatter(-1, ids, values)


class TeacherLogitCache:
    """Teacher logits at a batch's scored positions, read from `directory` when this teacher saw this batch before,
    else computed (teacher in eval mode, no gradient) and written there atomically."""

    def __init__(self, directory: str | Path, teacher: nn.Module, top_k: int | None = None) -> None:
        self.teacher, self.top_k = teacher, top_k
        self.directory = Path(directory) / teacher_fingerprint(teacher)[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def logits(self, input_ids: torch.Tensor, scored: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Teacher logits (N, V) at the N scored positions; `compute()` gives them (N, V) on a miss."""
        path = self.directory / (batch_key(input_ids, scored, self.top_k) + ENTRY_SUFFIX)
        vocab_size = self.teacher.config.vocab_size
        if path.is_file():
            self.hits += 1
            stored = load_file(str(path))
            if LOGITS_KEY in stored:
                return stored[LOGITS_KEY].to(input_ids.device)
            values, ids = stored[VALUES_KEY], stored[IDS_KEY].long()
            full = torch.full((values.shape[0], vocab_size), float("-inf"), dtype=values.dtype)
            return full.scatter(-1, ids, values).to(input_ids.device)
        self.misses += 1
        logits = compute().float()  # (N, V)
        if self.top_k is None or self.top_k >= vocab_size:
            tensors = {LOGITS_KEY: logits.cpu().contiguous()}
        else:
            values, ids = logits.topk(self.top_k, dim=-1)
            tensors = {VALUES_KEY: values.cpu().contiguous(), IDS_KEY: ids.to(torch.int32).cpu().contiguous()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        return restrict_to_top_k(logits, self.top_k)
