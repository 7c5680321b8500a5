"""The errors a request can end in, each with its HTTP status.

Every adapter maps :class:`ServeError` to a response with ``status`` and the JSON body
``{"error": message}``; anything else that escapes is a bug of ours (500).
"""

from __future__ import annotations


class ServeError(Exception):
    """A request that cannot be answered, and why; ``status`` is the HTTP status."""

    status = 400

    def __init__(self, message: str, status: int = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status

    def __str__(self) -> str:
        return self.message


class BadRequest(ServeError):
    """400: the body, an image, a parameter or a target is wrong."""

    status = 400


class NotFound(ServeError):
    """404: a model name that is not served."""

    status = 404


class TooLarge(ServeError):
    """413: the body, an image's pixel count or the number of instances is over a limit."""

    status = 413


class Unavailable(ServeError):
    """503: the server is shutting down (or not ready yet); retry elsewhere."""

    status = 503
