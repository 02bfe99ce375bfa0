"""llmkit: a hackable PyTorch toolkit for the whole life of a transformer language model."""

from llmkit.config import Config
from llmkit.errors import LlmkitError

__all__ = ["Config", "LlmkitError"]
__version__ = "0.1.0"
