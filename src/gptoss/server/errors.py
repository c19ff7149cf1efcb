"""Every failure leaves the server as OpenAI's error JSON, never as a stack trace.

``{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`` is what the official clients
parse into their exception classes (BadRequestError, AuthenticationError, RateLimitError, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}


class APIError(Exception):
    """An error to report to the client as it is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# The other APIs this server speaks answer errors in their own shapes, chosen by path prefix
# (the Anthropic SDK and the Ollama client parse those, not OpenAI's).
ErrorShape = Callable[[APIError], dict[str, Any]]
_SHAPES: dict[str, ErrorShape] = {}


def register_error_shape(prefix: str, shape: ErrorShape) -> None:
    _SHAPES[prefix] = shape


def error_response(path: str, exc: APIError) -> JSONResponse:
    """`exc` as the API that owns `path` reports errors."""
    shape = next((s for prefix, s in _SHAPES.items() if path.startswith(prefix)), None)
    if shape is None:
        return exc.response()
    return JSONResponse(shape(exc), status_code=exc.status, headers=exc.headers)


# Union branches appear in pydantic's error locations ("input.str", "input.list[...]"): not fields.
_BRANCH_LABELS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(p for p in parts if "[" not in p and p not in _BRANCH_LABELS) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    """The most specific problem pydantic found, with `param` naming the field (OpenAI answers
    400 where FastAPI would answer 422)."""
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    if any(e.get("type") == "json_invalid" for e in errors):
        return APIError(400, "We could not parse the JSON body of your request.", code="invalid_json")
    # With unions pydantic reports every branch; the deepest location is the real complaint.
    worst = max(errors, key=lambda e: len(e.get("loc", ())))
    param = _param(worst.get("loc", ()))
    message = worst.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 413:  # a body without Content-Length, cut off by the Gate
            message = "The request body is larger than this server accepts."
        return error_response(request.url.path, APIError(exc.status_code, message, headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_response(
            request.url.path, APIError(500, "The server had an error while processing your request.")
        )
