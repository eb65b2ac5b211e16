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


def _readme_command_lines() -> list[str]:
    """Every ``citrus-v ...`` line of the README's bash blocks, continuations joined, comments and env cut."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip().removesuffix("&").strip()
            words = line.split()
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
                words = words[1:]
            if words[:1] == ["citrus-v"]:
                lines.append(" ".join(words))
    return lines


def test_readme_command_lines_parse():
    """Each command the README shows is one the parser takes as written, in the one spelling (underscores)."""
    import shlex

    from citrus_v.cli import make_parser

    lines = _readme_command_lines()
    assert len(lines) >= 10
    refused = []
    for line in lines:
        if re.search(r"(^|\s)--[a-z0-9]+-[a-z0-9-]+", line):
            refused.append(line)  # a hyphenated flag: understood, but not the spelling the README teaches
            continue
        try:
            make_parser().parse_args(shlex.split(line)[1:])
        except SystemExit:
            refused.append(line)
    assert refused == [], f"the README shows command lines the parser refuses: {refused}"
