"""The one exception type llmkit raises for bad input; the CLI prints its message, no traceback."""


class LlmkitError(Exception):
    """A user-facing error: the message names the thing that is wrong and how to fix it."""
