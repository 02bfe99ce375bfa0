"""Applications built on a model: retrieval-augmented generation, few-shot and chain-of-thought prompting, PAL
with a sandbox, ReAct agents; each from the small parts in pipeline.py (model, template, parser, memory)."""

from llmkit.apps.pipeline import ConversationMemory, LocalModel, Pipeline, TextModel

__all__ = ["ConversationMemory", "LocalModel", "Pipeline", "TextModel"]
