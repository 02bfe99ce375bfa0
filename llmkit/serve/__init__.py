"""Serving: an engine that batches many generation requests continuously (llmkit/serve/engine.py)."""

from llmkit.serve.engine import Engine, EngineStats
from llmkit.serve.request import (
    EngineClosedError,
    QueueFullError,
    Request,
    RequestHandle,
    TokenConstraint,
    TokenEvent,
)

__all__ = [
    "Engine",
    "EngineClosedError",
    "EngineStats",
    "QueueFullError",
    "Request",
    "RequestHandle",
    "TokenConstraint",
    "TokenEvent",
]
