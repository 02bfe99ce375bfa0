"""The shared data folder (../shared/data beside the checkout): the real datasets that built-in tasks, the default
fine-tuning run and the tests read."""

from __future__ import annotations

import os
from pathlib import Path

import llmkit
from llmkit.errors import LlmkitError

DATA_ENV = "LLMKIT_SHARED_DATA"


def shared_data_dir() -> Path:
    """The shared data folder: $LLMKIT_SHARED_DATA, else `shared/data` beside the repository checkout."""
    path = Path(os.environ.get(DATA_ENV) or Path(llmkit.__file__).resolve().parents[2] / "shared" / "data")
    if not path.is_dir():
        raise LlmkitError(f"the built-in tasks read their data from {path}, which does not exist; check out the shared "
                          f"data beside the repository (../shared/data) or set {DATA_ENV} to its folder")
    return path


def shared_data_file(relative: str) -> Path:
    """A file under the shared data folder, which must exist."""
    path = shared_data_dir() / relative
    if not path.is_file():
        raise LlmkitError(f"{path} is missing from the shared data; restore it (see the folder's SOURCE.md)")
    return path
