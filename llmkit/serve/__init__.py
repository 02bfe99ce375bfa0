"""Serving: the engine, the OpenAI-compatible HTTP server and the load tester (`llmkit bench serve`)."""

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
