"""The route classes of the API: FastAPI's own, with request bodies decoded by orjson, and the checks that
must come before a body is read.

FastAPI decodes a JSON body with the standard library before validating it; for a 1,024-user decisions
request that decode is most of the request's parsing time, and orjson does it ~5x faster. A body orjson
refuses (NaN or Infinity, numbers beyond a double, which Python's json accepts) goes to the standard
library, so such values still reach validation and get a 422 naming their field; a body that is not JSON
is a 422 too. Validation, errors and OpenAPI stay FastAPI's.

Before any byte of a body is read: the admin routes check the bearer token (`AdminRoute`), and every route
that takes a body asks for a JSON Content-Type (415 otherwise: no form post from another site's page).
The body's size is bounded by the app (`SACO_MAX_BODY_BYTES`, 413), and the decisions route counts the
users of a request before any of them is validated (`DecisionsRoute`).
"""

from __future__ import annotations

import email.message
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from service.api.deps import check_admin


def is_json(content_type: str | None) -> bool:
    """Whether a Content-Type header names JSON (application/json or application/*+json)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


def _parse_int(text: str) -> int | float:
    """A JSON integer. One longer than Python's int() reads (4,300 digits by default) is far beyond every
    bound of the API: it becomes an infinite float, which validation refuses naming its field."""
    limit = sys.get_int_max_str_digits()
    return float(text) if limit and len(text) > limit else int(text)


def parse_json(body: bytes) -> Any:
    """orjson's parse; what it refuses goes to the standard library, which reads NaN, Infinity and numbers
    beyond a double, so that they reach validation and get a 422 naming their field. A body neither reads
    (bad syntax, not UTF-8, nested deeper than the parser goes) is a JSONDecodeError: FastAPI's 422."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_int=_parse_int)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:
        raise json.JSONDecodeError(f"not a JSON document: {exc}", body.decode(errors="replace"), 0) from None


class OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def with_orjson(request: Request) -> Response:
            await self.before_body(request)
            content_type = request.headers.get("content-type")
            if takes_body and not is_json(content_type):
                raise HTTPException(
                    status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                    f"the body must be JSON (Content-Type: application/json), got {content_type!r}",
                )
            ours = OrjsonRequest(request.scope, request.receive)
            await self.before_validation(ours)
            return await handler(ours)

        return with_orjson

    async def before_body(self, request: Request) -> None:
        """Checks that run before the request's body is read."""

    async def before_validation(self, request: OrjsonRequest) -> None:
        """Checks of the decoded body that run before FastAPI validates it."""


class DecisionsRoute(OrjsonRoute):
    async def before_validation(self, request: OrjsonRequest) -> None:
        """Refuse a request naming more users than SACO_MAX_BATCH before any of them is validated."""
        try:
            data = await request.json()
        except ValueError:
            return  # not JSON: FastAPI's own parse of it names the error
        requests = data.get("requests") if isinstance(data, dict) else None
        limit: int = request.app.state.settings.max_batch
        if isinstance(requests, list) and len(requests) > limit:
            message = f"at most {limit} requests per call, got {len(requests)}"
            raise RequestValidationError([{"type": "too_long", "loc": ("body", "requests"), "msg": message}])


class AdminRoute(OrjsonRoute):
    async def before_body(self, request: Request) -> None:
        check_admin(request)
