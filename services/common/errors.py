"""Domain errors, each carrying the gRPC status it maps to.

Domain and storage code raise these; the server's error interceptor turns them into
statuses. Messages are shown to clients verbatim, so they must help a person fix the
request and must never contain secrets, tokens, aliases or message bodies.
"""

from __future__ import annotations

import math

import grpc


class ServiceError(Exception):
    """Base class: an error a client is meant to see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ServiceError):
    """A limit was hit; `retry_after` (seconds) says when trying again can succeed."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        if retry_after is not None:
            message = f"{message}; retry after {math.ceil(retry_after)} s"
        super().__init__(message)
        self.retry_after = retry_after


class IntegrityError(ServiceError):
    """Stored data failed authentication: tampered with, moved, or the wrong key.

    The client learns only that the data is unusable; the detail goes to the log.
    """

    code = grpc.StatusCode.DATA_LOSS

    def __init__(self, detail: str) -> None:
        super().__init__("stored data failed its integrity check; an operator has been alerted")
        self.detail = detail


class StartupError(Exception):
    """The service must not start (wrong key, unreadable database, bad config)."""
