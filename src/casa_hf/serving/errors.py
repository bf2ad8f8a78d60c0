"""The one error type of the server: an HTTP status and a message naming the problem, as OpenAI's JSON error body."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; `param` names the offending field (OpenAI's `error.param`)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
