"""Engine errors, each worded so the user knows what to do next."""


class EngineError(RuntimeError):
    """Base class: any problem in the engine that a user can act on."""


class ModelError(EngineError):
    """The model file is missing, unreadable, not a GGUF, or failed to load."""


class ContextFullError(EngineError):
    """The conversation no longer fits in the model's context window."""


class StateError(EngineError):
    """A saved memory state cannot be used here (corrupt, truncated, other model or config)."""


class CancelledError(EngineError):
    """Taking a message in was stopped; the memory is back where it was before it."""
