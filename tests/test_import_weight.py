"""The light faces stay light: the command line's help, the web app and the ground-floor packages load neither
torch nor transformers (each costs seconds and hundreds of MB before anything is printed or served).

Each check runs in a fresh interpreter with ``-X importtime`` (or ``PYTHONPROFILEIMPORTTIME`` for the installed
``citrus-v`` script) and reads the modules imported from its report on stderr. The report covers ``import``
statements, which is how torch and transformers come in (the CLI's own ``importlib`` dispatch is not listed).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")


def _imported(stderr: str) -> set[str]:
    """Module names from ``-X importtime`` lines: ``import time: <self> | <cumulative> | <indent><module>``."""
    names = set()
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        name = line.rsplit("|", 1)[-1].strip()
        if name and name != "imported package":
            names.add(name)
    return names


def _heavy(names: set[str]) -> list[str]:
    return sorted(n for n in names if n.split(".")[0] in HEAVY)


def _run(command: list[str], expect: str = "") -> set[str]:
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert expect in result.stdout
    names = _imported(result.stderr)
    assert names, "no -X importtime report on stderr"
    return names


@pytest.mark.parametrize(
    "module",
    ["citrus_v", "citrus_v.app", "citrus_v.app.page", "citrus_v.infer", "citrus_v.media", "citrus_v.tokens",
     "citrus_v.checkpoint_layout"],
)
def test_import_is_light(module):
    names = _run([sys.executable, "-X", "importtime", "-c", f"import {module}"])
    assert module in names
    assert _heavy(names) == []


@pytest.mark.parametrize("args", [["--help"], ["app", "--help"]], ids=["help", "app-help"])
def test_cli_help_is_light(args):
    names = _run([sys.executable, "-X", "importtime", "-m", "citrus_v.cli", *args], expect="usage: citrus-v")
    assert _heavy(names) == []


def test_entry_point_help_is_light():
    executable = shutil.which("citrus-v") or os.path.join(os.path.dirname(sys.executable), "citrus-v")
    if not os.path.exists(executable):
        pytest.skip("the citrus-v script is not installed (pip install -e .)")
    names = _run([executable, "--help"], expect="deploy")
    assert _heavy(names) == []


def test_lazy_faces_still_export_the_model():
    """``from citrus_v import CitrusV`` still works: the face imports the model on first access."""
    code = (
        "import sys, citrus_v, citrus_v.infer\n"
        "assert 'torch' not in sys.modules\n"
        "from citrus_v import CitrusV, CitrusVProcessor\n"
        "from citrus_v.infer import CitrusVPredictor\n"
        "from citrus_v.modeling import CitrusV as Model\n"
        "assert CitrusV is Model and 'torch' in sys.modules\n"
        "assert CitrusVProcessor.__name__ == 'CitrusVProcessor' and CitrusVPredictor.__name__ == 'CitrusVPredictor'\n"
        "try:\n"
        "    citrus_v.NoSuchName\n"
        "except AttributeError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('unknown names must raise AttributeError')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
