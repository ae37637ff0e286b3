"""Domain errors. Each maps to one gRPC status code in one place (`specserve.server`)."""

from __future__ import annotations


class SpecServeError(Exception):
    """Base of every error a client may see; the message is safe to show."""


class InvalidArgument(SpecServeError):
    """A request field is malformed or out of range; the message names the field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class ResourceExhausted(SpecServeError):
    """Admission refused; `retry_after_ms` hints when to try again."""

    def __init__(self, message: str, retry_after_ms: int = 0):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class Unavailable(SpecServeError):
    """A dependency needed for this request is down."""


class DeadlineExceeded(SpecServeError):
    """The request ran past its deadline."""


class FailedPrecondition(SpecServeError):
    """The request does not fit the current state (for example a session out of sync)."""
