"""API fuzzing from the server's own OpenAPI schema: schemathesis against ``citrus-v deploy`` on loopback.

Every operation of ``/openapi.json`` is run through schemathesis' phases (schema examples, boundary
coverage, random fuzzing, stateful links) with every check on: no 5xx, every status and body as documented
(errors as OpenAI-style ``{"error": {...}}`` bodies), no response slower than ``--max_response_time``, and
the server still healthy afterwards. The quick profile runs in ``make test``
(tests/test_reliability_api.py); the long one is this script:

    .venv/bin/python bench/fuzz_api.py [--model DIR] [--max_examples 500] [--max_time 600] [--seed 0]

Without ``--model`` the tiny preset (random weights) is built into a temporary folder.

Chat requests with a random ``model`` name stop at the 404 check; so that the generation path is fuzzed too,
a hook sends half of the schema-valid chat bodies to the served model name with ``max_tokens`` capped at
:data:`FUZZ_MAX_TOKENS` (a random-weight model rarely ends by itself; uncapped, each such request would run to
the context limit and the run would be bounded by time instead of by examples).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

FUZZ_MAX_TOKENS = 8
MODEL_ENV = "CITRUS_V_FUZZ_MODEL"  # set only in the schemathesis process: it turns this module's hooks on
# Semantic checks no JSON schema can state (the last message must be the user's, roles alternate, a data:
# URL must hold an image, the text must fit the context) answer 400 with an error body; that is documented.
POSITIVE_STATUSES = ["2xx", "400", "401", "404", "413"]

CONFIG = """\
[checks.positive_data_acceptance]
expected-statuses = [{statuses}]
"""


@dataclass
class FuzzResult:
    """What one schemathesis run found."""

    returncode: int
    output: str
    seconds: float
    server_alive: bool

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.server_alive


def _schemathesis() -> str:
    return str(Path(sys.executable).with_name("schemathesis"))


def run_fuzz(
    base_url: str,
    served_model_name: str,
    max_examples: int = 25,
    seed: int = 0,
    max_time: float | None = None,
    max_response_time: float = 60.0,
    workers: int = 1,
    report_dir: Path | None = None,
) -> FuzzResult:
    """Run schemathesis against a running server at ``base_url`` (``http://host:port``)."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="citrus-v-fuzz-") as scratch:
        config = Path(scratch) / "schemathesis.toml"
        config.write_text(CONFIG.format(statuses=", ".join(f'"{s}"' for s in POSITIVE_STATUSES)))
        command = [
            _schemathesis(),
            "--config-file",
            str(config),
            "run",
            f"{base_url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--request-timeout",
            str(max_response_time + 5),
            "--max-response-time",
            str(max_response_time),
            "--workers",
            str(workers),
            "--suppress-health-check",
            "all",
            "--no-color",
            "--generation-database",
            "none",
        ]
        if max_time:
            command += ["--max-time", str(int(max_time))]
        if report_dir is not None:
            command += ["--report", "junit", "--report-dir", str(report_dir)]
        env = {
            **os.environ,
            "SCHEMATHESIS_HOOKS": Path(__file__).stem,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
            MODEL_ENV: served_model_name,
            "HYPOTHESIS_STORAGE_DIRECTORY": str(Path(scratch) / "hypothesis"),
        }
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch)
        seconds = time.perf_counter() - start
    try:
        alive = httpx.get(f"{base_url}/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        alive = False
    return FuzzResult(done.returncode, done.stdout + done.stderr, seconds, alive)


# --- schemathesis hooks (loaded through SCHEMATHESIS_HOOKS in the schemathesis process only) -------------------
def _to_served_model(body, served: str):
    """The same body addressed to the served model, with its token limits capped (see the module docstring)."""
    body = dict(body)
    body["model"] = served
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and value > FUZZ_MAX_TOKENS:
            body[key] = FUZZ_MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = FUZZ_MAX_TOKENS
    return body


if os.environ.get(MODEL_ENV):
    import schemathesis
    from hypothesis import strategies as st

    _SERVED = os.environ[MODEL_ENV]

    @schemathesis.hook
    def flatmap_body(context, body):
        """Half of the chat bodies go to the served model, so that generation runs too."""
        operation = getattr(context, "operation", None)
        if operation is None or operation.path != "/v1/chat/completions" or not isinstance(body, dict):
            return st.just(body)
        return st.sampled_from([body, _to_served_model(body, _SERVED)])


# --- the long profile -----------------------------------------------------------------------------------------
def server_errors(log_text: str) -> list[str]:
    """uvicorn access-log lines with a 5xx status."""
    return [line for line in log_text.splitlines() if '" 5' in line and "HTTP/1.1" in line]


DEPLOY_FLAGS = ["--max_tokens", str(FUZZ_MAX_TOKENS), "--request_timeout", "30", "--max_body_mb", "4"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder (default: the tiny preset, built into a temporary folder)")
    parser.add_argument("--max_examples", type=int, default=500, help="examples per operation and phase")
    parser.add_argument("--max_time", type=float, default=600.0, help="time budget of the whole run (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_serve_support import deployed_server, free_port

    with tempfile.TemporaryDirectory(prefix="citrus-v-fuzz-model-") as scratch:
        from citrus_v.recipes.presets import build_preset

        model_dir = Path(args.model) if args.model else build_preset("tiny", Path(scratch) / "tiny")
        port = free_port()
        with deployed_server(model_dir, port, [*DEPLOY_FLAGS, "--log_level", "info"]) as (_, log):
            result = run_fuzz(
                f"http://127.0.0.1:{port}",
                model_dir.resolve().name,
                max_examples=args.max_examples,
                seed=args.seed,
                max_time=args.max_time,
                workers=args.workers,
            )
            log.seek(0)
            errors = server_errors(log.read())
    print(result.output[-6000:])
    print(f"schemathesis exit {result.returncode} in {result.seconds:.0f} s; server alive afterwards: "
          f"{result.server_alive}; 5xx in the access log: {len(errors)}")
    sys.exit(0 if result.passed and not errors else 1)


if __name__ == "__main__":
    main()
