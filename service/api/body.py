"""Request bodies parsed by pydantic's JSON parser in one pass (the decisions and outcomes routes).

FastAPI's default path decodes a body with the `json` module, then validates the Python objects; for a
1,024-user decisions request that is twice the work of `model_validate_json`, which parses and validates
together. A route taking its body this way declares it with `json_body(Model)` (so OpenAPI still shows it)
and errors keep FastAPI's shape: a 422 whose `loc` starts with "body".
"""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)

# models whose schemas the app adds to OpenAPI's components (a raw-body route does not register them)
RAW_BODY_MODELS: list[type[BaseModel]] = []


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads `model` with `parse_json_body`."""
    RAW_BODY_MODELS.append(model)
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def parse_json_body(request: Request, model: type[Model]) -> Model:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in errors]) from None


def add_raw_body_schemas(openapi: dict[str, Any]) -> dict[str, Any]:
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    for model in RAW_BODY_MODELS:
        definition = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(definition.pop("$defs", {}))
        schemas[model.__name__] = definition
    return openapi
