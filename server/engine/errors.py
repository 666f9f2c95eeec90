"""Errors the engine raises to its callers."""


class EngineError(Exception):
    """Base class for engine errors."""


class QueueFull(EngineError):
    """More requests are waiting than `--max-queue` allows."""


class ContextTooLong(EngineError):
    """Prefix + prompt + max_new_tokens does not fit the model's positions."""


class InvalidInput(EngineError):
    """The prompt cannot be served (empty, token ids outside the vocabulary)."""


class EngineStopped(EngineError):
    """The engine is shut down or its loop died."""
