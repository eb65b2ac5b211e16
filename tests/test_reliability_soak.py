"""The 60-second server soak (bench/serve_soak.py's short profile): 16 clients mixing valid, hostile and
cancelled requests against ``citrus-v deploy``; no 5xx, no transport error, every hostile request answered
with a 4xx error body, and resident memory after warm-up growing by at most 48 MiB."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve_soak import run_soak  # noqa: E402

SOAK_SECONDS = 60
MAX_RSS_GROWTH_MB = 48


def test_sixty_second_soak_serves_everything_without_5xx_or_memory_growth(tiny_dir):
    report = run_soak(tiny_dir, seconds=SOAK_SECONDS, clients=16, rss_every=10, max_rss_growth_mb=MAX_RSS_GROWTH_MB)
    print(report.table())
    assert not report.problems, report.problems[:10]
    assert report.by_status.get("5xx", 0) == 0 and report.by_status.get("transport", 0) == 0
    kinds = report.by_kind
    assert kinds.get("valid", 0) > 0 and kinds.get("stream", 0) > 0 and kinds.get("cancelled", 0) > 0, kinds
    assert sum(v for k, v in kinds.items() if k not in ("valid", "stream", "cancelled")) > 0, kinds
    assert len(report.rss_mb) >= 5, report.rss_mb
    assert report.rss_growth_mb <= MAX_RSS_GROWTH_MB, report.table()
