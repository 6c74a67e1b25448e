"""`APIError` and the exception handlers that turn every failure into one JSON shape.

`prime serve` answers in OpenAI's shape ({"error": {"message", "type", "param",
"code"}}) so OpenAI clients raise the right exception; `jarvis serve`'s page reads
{"error": message}. Both install the same handlers, each with its own `ErrorShape`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jarvis_prime.errors import ImageInputError, ImageNotSupportedError


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self, shape: "ErrorShape | None" = None) -> JSONResponse:
        body = (shape or OPENAI).body(self)
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass(frozen=True)
class ErrorShape:
    """How a server writes errors: the JSON body, and the status of a request that
    fails validation (OpenAI says 400; FastAPI's own convention, kept by the page, 422)."""

    body: Callable[[APIError], dict[str, Any]]
    invalid_status: int


OPENAI = ErrorShape(lambda e: {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}, 400)
PLAIN = ErrorShape(lambda e: {"error": e.message}, 422)


_UNION_LABELS = {"body", "str", "int", "float", "bool", "bytes"}


def _field(loc: tuple[Any, ...]) -> str:
    """A field's path as a client wrote it: without "body" and pydantic's union branch
    labels (`str`, `list[tagged-union[TextPart,ImagePart]]`), which name types, not fields."""
    return ".".join(str(p) for p in loc if p not in _UNION_LABELS and "[" not in str(p)) or "body"


def invalid_request(err: RequestValidationError, status: int) -> APIError:
    """The most specific thing wrong with a request, naming the field: of a union's failed
    branches (content: a string or a list of parts) the deepest is what the client meant;
    otherwise the first."""
    errors = err.errors()
    first = max(errors, key=lambda e: len(_field(tuple(e.get("loc", ()))).split("."))) if errors else {}
    if first.get("type") == "json_invalid":
        return APIError(status, f"invalid JSON: {first.get('msg')}", code="invalid_json")
    where = _field(tuple(first.get("loc", ())))
    return APIError(status, f"{where}: {first.get('msg', 'invalid request')}", param=where, code="invalid_value")


def image_error(err: ImageInputError | ImageNotSupportedError) -> APIError:
    """A 400 for an image the model cannot take: a bad one names its part (the message
    starts `messages[i].content[j]: `), one sent to a model that cannot see says so."""
    if isinstance(err, ImageNotSupportedError):
        return APIError(400, f"the served model cannot see images: {err}", param="messages",
                        code="images_not_supported")
    where, sep, _ = str(err).partition(": ")
    return APIError(400, str(err), param=where if sep and where.startswith("messages[") else "messages",
                    code="invalid_image")


def install_error_handlers(app: FastAPI, shape: ErrorShape = OPENAI,
                           statuses: Mapping[type[Exception], int] | None = None) -> None:
    """Every error `app` answers in `shape`: APIError, invalid requests, HTTP errors
    (unknown routes included), and `statuses`' exception types (their message, that status)."""

    @app.exception_handler(APIError)
    async def _api_error(_request: Request, err: APIError) -> JSONResponse:
        return err.response(shape)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, err: RequestValidationError) -> JSONResponse:
        return invalid_request(err, shape.invalid_status).response(shape)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(err.status_code, str(err.detail), code=code, headers=err.headers).response(shape)

    for kind, status in (statuses or {}).items():
        app.add_exception_handler(kind, _answer_with(status, shape))


def _answer_with(status: int, shape: ErrorShape):
    async def handler(_request: Request, err: Exception) -> JSONResponse:
        return APIError(status, str(err)).response(shape)

    return handler
