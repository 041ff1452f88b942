"""The service fuzzed against its own OpenAPI document (schemathesis, over real HTTP to a real service
process on a standalone Redis): no input gets a 5xx, every answer's status, content type, headers and
body conform to the document; then the same with extreme numbers (1e21, 1e300, 10^400, 5,000 digits...)
in the numeric fields of every body. CI runs a few hundred cases; docs/reliability.md has the full run."""

from __future__ import annotations

import copy
import os
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store import ModelStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/service: the real-process helpers
from svc_served import ADMIN, serve

# Valid input also depends on the served model (a features list has the model's feature_dim values, a
# coupon's action is one of its actions), which the document cannot say: a 422 for a schema-valid body
# is right there. Every other default check runs.
MODEL_DEPENDENT = [schemathesis.checks.positive_data_acceptance]
# cases per operation (9 operations): SACO_FUZZ_EXAMPLES raises it for the full run
EXAMPLES = int(os.environ.get("SACO_FUZZ_EXAMPLES", "40"))
# Numbers at and beyond every bound: the feature range (10^6), 32-bit floats, 64-bit integers, doubles
# (10^400 is infinite as a double), Python's int() (5,000 digits). Sent as JSON numbers: this process
# writes integers of any length (`unlimited_int_digits`), the service reads them with Python's defaults.
EXTREMES: list[int | float] = [
    1e21,
    -1e21,
    1e300,
    -1e300,
    -1000000.5,
    3.5e38,
    1.7976931348623157e308,
    2**63,
    -(2**63) - 1,
    2**64,
    10**400,
    -(10**400),
    10**5000 - 1,
    -(10**5000 - 1),
]
# and just inside: the feature range's ends, the smallest double, negative zero (half the draws)
BOUNDARY: list[int | float] = [1e6, -1e6, 5e-324, -0.0]
NUMBERS = st.one_of(st.sampled_from(EXTREMES), st.sampled_from(BOUNDARY))


@pytest.fixture(scope="module")
def served(trained_store: Path, redis_url: str) -> Iterator[str]:
    prefix = f"saco-fuzz-{uuid.uuid4().hex[:8]}:"
    try:
        with serve(trained_store, redis_url, prefix=prefix, extra_env={"SACO_MAX_BODY_BYTES": "262144"}) as (base,):
            body = {"budget": 100.0, "coupons": [{"action": 1, "cost": 2.0}, {"action": 2, "cost": 5.0}]}
            assert httpx.put(base + "/v1/admin/campaigns/c1", json=body, headers=ADMIN).status_code == 200
            yield base
    finally:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=prefix + "*"):
            client.delete(key)
        client.close()


def test_api_conforms_to_its_document(served: str) -> None:
    """Every operation of the document, EXAMPLES cases each (valid and invalid inputs), every default
    check of schemathesis (no 5xx, status codes, content types, headers and bodies as documented)."""
    api = schemathesis.openapi.from_url(served + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 8
    cases: dict[str, int] = {}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            cases[operation.label] = cases.get(operation.label, 0) + 1  # noqa: B023
            case.call_and_validate(base_url=served, headers=ADMIN, timeout=30, excluded_checks=MODEL_DEPENDENT)

        check()
    print(f"schemathesis: {sum(cases.values())} cases over {len(operations)} operations, no failure: {cases}")


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = spec
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


def numeric_slots(spec: dict[str, Any], schema: dict[str, Any], value: Any, path: list[Any]) -> Iterator[list[Any]]:
    """The paths of `value` where `schema` takes a number: present or not (an optional field), inside the
    objects and arrays that `value` has."""
    schema = resolve(spec, schema)
    branches = [resolve(spec, b) for b in schema.get("anyOf", schema.get("oneOf", [schema]))]
    if any(b.get("type") in ("number", "integer") for b in branches):
        yield path
    for branch in branches:
        if branch.get("type") == "object" and isinstance(value, dict):
            for name, sub in branch.get("properties", {}).items():
                yield from numeric_slots(spec, sub, value.get(name), [*path, name])
        elif branch.get("type") == "array" and isinstance(value, list) and "items" in branch:
            for i, item in enumerate(value[:3]):
                yield from numeric_slots(spec, branch["items"], item, [*path, i])


def with_numbers(body: Any, numbers: dict[tuple[Any, ...], int | float]) -> Any:
    """A copy of `body` with `numbers` at their paths."""
    body = copy.deepcopy(body)
    for path, number in numbers.items():
        node = body
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = number
    return body


@pytest.fixture
def unlimited_int_digits() -> Iterator[None]:
    """Python writes integers of more than 4,300 digits only when asked to (here, not in the service)."""
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)
    yield
    sys.set_int_max_str_digits(limit)


@pytest.mark.usefixtures("unlimited_int_digits")
def test_extreme_numbers_in_every_numeric_field(served: str, trained_store: Path) -> None:
    """Every operation with a JSON body: schema-valid bodies (half of them aimed at the served campaign,
    decisions with the model's feature_dim of ordinary features, so that they reach the model), then 1 to 3
    of their numeric
    fields (every number of the schema the body has room for) set to extreme JSON numbers. Every default
    check: no 5xx, every status declared, bodies as documented."""
    spec = httpx.get(served + "/openapi.json").json()
    dim = ModelStore(trained_store).load().manifest.feature_dim
    api = schemathesis.openapi.from_dict(spec)
    operations = [result.ok() for result in api.get_all_operations()]
    with_body = [op for op in operations if op.body]
    assert {op.label for op in with_body} >= {
        "PUT /v1/admin/campaigns/{campaign_id}",
        "PATCH /v1/admin/campaigns/{campaign_id}",
        "POST /v1/campaigns/{campaign_id}/decisions",
        "POST /v1/campaigns/{campaign_id}/outcomes",
    }
    assert httpx.get(served + "/readyz").json()["ready"]
    statuses: Counter[int] = Counter()
    cases: Counter[str] = Counter()
    for operation in with_body:
        body_schema = spec["paths"][operation.path][operation.method.lower()]["requestBody"]["content"][
            "application/json"
        ]["schema"]

        @given(case=operation.as_strategy(), data=st.data())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case, data: st.DataObject) -> None:
            body = case.body
            if isinstance(body, dict):
                if data.draw(st.booleans(), label="served campaign"):
                    case.path_parameters = {**(case.path_parameters or {}), "campaign_id": "c1"}
                    for request in body.get("requests", []) if isinstance(body.get("requests"), list) else []:
                        if isinstance(request, dict) and "features" in request:
                            request["features"] = [0.5] * dim
                slots = [tuple(p) for p in numeric_slots(spec, body_schema, body, [])]  # noqa: B023
                if slots:
                    chosen = data.draw(st.lists(st.sampled_from(slots), min_size=1, max_size=3, unique=True))
                    numbers = {path: data.draw(NUMBERS, label=str(path)) for path in chosen}
                    case.body = with_numbers(body, numbers)
            response = case.call_and_validate(
                base_url=served,
                headers={**ADMIN, "Content-Type": "application/json"},
                timeout=30,
                excluded_checks=MODEL_DEPENDENT,
            )
            statuses[response.status_code] += 1
            cases[operation.label] += 1  # noqa: B023

        check()
    assert not [code for code in statuses if code >= 500]
    print(
        f"schemathesis, extreme numbers: {sum(cases.values())} cases over {len(with_body)} operations, "
        f"no failure; statuses {dict(sorted(statuses.items()))}: {dict(cases)}"
    )
