"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}


@dataclass
class ApiError(Exception):
    """Raised anywhere in a handler; the app turns it into the JSON error response."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None
    type: str | None = None

    def body(self) -> dict:
        kind = self.type or _TYPES.get(self.status, "invalid_request_error")
        return {"error": {"message": _utf8(self.message), "type": kind, "param": _utf8(self.param),
                          "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def _utf8(text: str | None) -> str | None:
    """Client text echoed in an error must still encode (a lone surrogate would turn the 4xx into a 500)."""
    return None if text is None else text.encode("utf-8", "replace").decode("utf-8")
