"""OpenAI error bodies: every refusal the server gives, over HTTP or gRPC, is an `APIError` with its HTTP status.

Kept apart from the request rules and the response shapes because every serving module raises them: the request
parser (4xx naming the field), the router client (503 when no router answers) and the HTTP app (auth, drain).
"""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error the client caused (or a state it must wait out), with its HTTP status and OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def shutting_down() -> APIError:
    """The answer to a request that arrives, or needs a new router, while the server drains."""
    return APIError(
        503,
        "the server is shutting down; retry later",
        code="server_shutting_down",
        kind="server_error",
        headers={"Retry-After": "5"},
    )
