"""Errors as OpenAI sends them: a status code and `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import XGLMError

log = logging.getLogger("mlx_xglm.serving")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    500: "server_error",
    503: "server_overloaded",
}


class APIError(Exception):
    """An error the client gets as JSON with `status`; `param` names the request field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error response."""
    kind = ERROR_TYPES.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


# Fields that take several shapes: pydantic reports each shape's failure, this says what is allowed.
SHAPES = {
    "prompt": "prompt must be a string, a list of strings, a list of token ids or a list of lists of ids",
    "stop": "stop must be a string or a list of strings",
}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}".strip(), None
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if not loc:
        return "the request body must be a JSON object", None
    if loc[0] in SHAPES and len(loc) > 1 and first.get("type") != "missing":
        return SHAPES[loc[0]], loc[0]
    return f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}", loc[0]


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error as OpenAI's JSON; an unexpected one is logged here and never shown to the client."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(XGLMError)
    async def xglm_error(request: Request, exc: XGLMError):
        return error_response(400, str(exc), exc.param)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        if exc.status_code == 404:
            return error_response(404, f"no such endpoint: {request.method} {request.url.path}")
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(ConnectionAbortedError)
    async def client_gone(request: Request, exc: ConnectionAbortedError):
        # No traceback: a client that leaves is no server error. Its request's log line shows status 499
        # (nginx's "client closed the request"); nobody reads this answer.
        return error_response(499, "the client closed the request")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("error while answering %s %s", request.method, request.url.path)
        return error_response(500, "the server hit an internal error; see its log")
