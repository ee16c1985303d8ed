"""Schemathesis over the server's own /openapi.json: generated requests (valid by the schema and
invalid ones) never get a 5xx. A real server with RAG on, a 128-token context and at most 4 new
tokens per choice keeps each generation short."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

KEY = "fuzz-key"
EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}


@pytest.fixture(scope="module")
def fuzz_server(start_server, tmp_path_factory):
    docs = tmp_path_factory.mktemp("fuzz_docs")
    (docs / "a.txt").write_text("Lighthouses guide ships at night with rotating lamps.", encoding="utf-8")
    (docs / "b.txt").write_text("Bread dough rises because yeast produces carbon dioxide.", encoding="utf-8")
    return start_server(docs=docs, max_model_len=128, max_tokens_limit=4, api_key=KEY, max_queue=64)


@pytest.fixture(scope="module")
def schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server}/openapi.json")


def operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def test_schema_lists_the_routes(schema):
    paths = {(op.method.upper(), op.path) for op in operations(schema)}
    for route in (("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("POST", "/v1/rag")):
        assert route in paths


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_fuzz_no_server_errors(schema, fuzz_server, mode):
    seen: dict[str, list[int]] = {}
    session_headers = {"Authorization": f"Bearer {KEY}"}
    for op in operations(schema):

        @settings(max_examples=EXAMPLES[mode], deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode), served_model=st.booleans())
        def check(case, served_model: bool) -> None:
            # Half the bodies name the served model and give every message content (which only
            # an assistant message may lack: a rule the schema cannot state), so generation runs
            # instead of a quick 404 or 400.
            if served_model and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = fuzz_server.model
                for message in case.body.get("messages") or []:
                    if isinstance(message, dict) and message.get("content") is None:
                        message["content"] = "Hi"
            response = case.call_and_validate(base_url=fuzz_server, headers=session_headers, checks=[not_a_server_error], timeout=60)
            seen.setdefault(case.operation.label, []).append(response.status_code)

        try:
            check()
        except Unsatisfiable:  # nothing to make invalid (e.g. GET /health has no parameters)
            assert mode is GenerationMode.NEGATIVE, op.label
    assert len(seen) >= 4
    health = httpx.get(f"{fuzz_server}/health", timeout=30).json()
    assert health["status"] == "ok" and health["engine_error"] is None
    if mode is GenerationMode.POSITIVE:  # valid requests do get served, not only refused
        assert 200 in seen["POST /v1/chat/completions"] or 200 in seen["POST /v1/completions"], seen
