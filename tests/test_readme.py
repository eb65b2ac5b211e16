"""The README's Python snippet runs as written, on a model built by the README's command."""

from __future__ import annotations

import re
from pathlib import Path

from citrus_v.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_snippet(tmp_path, monkeypatch):
    text = README.read_text()
    assert "make demo" in text and "make test" in text
    build = re.search(r"citrus-v build --preset tiny --out (\S+)", text)
    assert build, "README must show `citrus-v build --preset tiny --out DIR`"
    snippet = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    folder = build.group(1)
    assert main(["build", "--preset", "tiny", "--out", str(tmp_path / "m")]) == 0
    namespace: dict = {}
    exec(compile(snippet.replace(folder, str(tmp_path / "m")), "README.md", "exec"), namespace)
    out = namespace["out"]
    assert out.logits.ndim == 3 and out.pred_masks[0].shape[0] >= 1
