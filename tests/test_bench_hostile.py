"""``bench/hostile_input.py`` runs end to end on three cheap cases against a real ``citrus-v deploy``.

Its real figures come from the full run (every class of hostile input); here the script runs as a user runs it,
in a subprocess, on inputs the server refuses from their first bytes, and its table and JSON must say so: each
case a 4xx with an error code, a time, the server's memory against the budget, and a valid request served after.
"""

from __future__ import annotations

import json
import math

from .test_bench_scripts import run_script, table

CASES = ("invalid_json", "nifti_5d", "nifti_nan_affine")
COLUMNS = [
    "input", "status", "code", "time (s)", "peak − before (MiB)", "kept (MiB)", "budget (MiB)",
    "valid request after", "verdict",
]  # fmt: skip


def test_hostile_bench_reports_each_case_refused_with_memory_against_the_budget(tmp_path):
    report = tmp_path / "hostile.json"
    stdout = run_script(
        "hostile_input.py", "--cases", ",".join(CASES), "--budget_mb", "512", "--json", str(report), timeout=240
    )
    rows = table(stdout)
    assert rows["case"] == COLUMNS, stdout
    for case in CASES:
        cells = dict(zip(COLUMNS, rows[case], strict=True))
        assert cells["status"].startswith("4") and len(cells["status"]) == 3, (case, cells)
        assert cells["code"] not in ("", "—", "None"), (case, cells)
        assert math.isfinite(float(cells["time (s)"])), (case, cells)
        assert float(cells["peak − before (MiB)"]) <= 512, (case, cells)
        assert cells["budget (MiB)"] == "512"
        assert cells["valid request after"] == "200", (case, cells)
        assert cells["verdict"] == "PASS", (case, cells, stdout)
    saved = json.loads(report.read_text())
    assert [r["case"] for r in saved["results"]] == list(CASES)
    assert all(r["peak_mb"] is not None and r["peak_mb"] >= 0 for r in saved["results"])
    assert saved["server_starts"] == 1  # nothing here kills the server or leaves it holding memory
