"""API fuzzing from the server's own OpenAPI schema (bench/fuzz_api.py's quick profile) against
``citrus-v deploy`` on the tiny preset, plus one regression test per case the fuzzing found."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from citrus_v.serve.protocol import N_MAX

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from fuzz_api import DEPLOY_FLAGS, run_fuzz  # noqa: E402

from tests.test_serve_support import deploy_process  # noqa: E402

pytest.importorskip("schemathesis")

QUICK_EXAMPLES = 40


@pytest.fixture(scope="module")
def server(tiny_dir):
    with deploy_process(tiny_dir, *DEPLOY_FLAGS) as base:
        yield base.removesuffix("/v1"), Path(tiny_dir).resolve().name


def test_schemathesis_finds_no_5xx_and_no_undocumented_answer(server):
    base, model = server
    result = run_fuzz(base, model, max_examples=QUICK_EXAMPLES, seed=0, max_response_time=60)
    tail = result.output[-6000:]
    assert result.returncode == 0, tail
    assert "No issues found" in result.output, tail
    assert result.server_alive


def _chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **fields}


def test_integer_bounds_are_stated_in_the_schema(server):
    """Found: bounds on the whole-number fields came out as unknown ``ge``/``le`` keys, so the schema allowed
    ``max_tokens: 0`` that the server then refused."""
    base, _ = server
    schema = httpx.get(f"{base}/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]
    for name in ("max_tokens", "max_completion_tokens"):
        integer = next(s for s in schema["properties"][name]["anyOf"] if s.get("type") == "integer")
        assert integer.get("minimum") == 1 and "ge" not in integer, integer
    assert schema["properties"]["n"]["minimum"] == 1 and schema["properties"]["n"]["maximum"] == N_MAX


@pytest.mark.parametrize("seed", [2**64 + 383, -(2**70), 0, 2**64 - 1])
def test_any_integer_seed_is_served(server, seed):
    """Found: a seed just past 2**64 - 1 was refused while the schema (read as floats) allowed it; any
    integer is now taken modulo 2**64, which is all a seed needs."""
    base, model = server
    response = httpx.post(f"{base}/v1/chat/completions", json=_chat(model, seed=seed, max_tokens=2), timeout=60)
    assert response.status_code == 200, response.text


def test_zero_max_tokens_is_a_422_with_an_error_body(server):
    base, model = server
    response = httpx.post(f"{base}/v1/chat/completions", json=_chat(model, max_tokens=0), timeout=60)
    assert response.status_code == 422 and response.json()["error"]["param"] == "max_tokens"
