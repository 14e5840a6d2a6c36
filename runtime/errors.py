"""Exceptions the engine raises to its users."""


class EngineDeadError(RuntimeError):
    """A child process died or failed: in-flight and later calls fail with this."""


class EngineOverloadedError(RuntimeError):
    """The request queue is full (``max_queued_requests``)."""
