"""Run ``citrus-v demo`` and print its quality table: the numbers issue 8's bar is about, per-target Dice with
the mean-embedding control, wall time and peak memory, with the machine they ran on.

    .venv/bin/python bench/demo_quality.py [--out demo_out] [--fast] [--from-scratch] [--overwrite]

The demo runs as a child process (as ``make demo`` runs it), so its wall time and peak memory are its own.
Exit status 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from citrus_v.recipes.bars import status


def machine() -> str:
    """CPU model, cores, memory, torch version: where the numbers come from."""
    import torch

    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB, {gpu}; torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--from-scratch", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace --out when it holds an earlier run")
    args = parser.parse_args()
    command = [sys.executable, "-m", "citrus_v.cli", "demo", "--out", args.out]
    command += ["--fast"] * args.fast + ["--from-scratch"] * args.from_scratch + ["--overwrite"] * args.overwrite
    started = time.monotonic()
    result = subprocess.run(command, check=False)
    wall = time.monotonic() - started
    peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    if result.returncode != 0:
        print(f"citrus-v demo failed with exit status {result.returncode}", file=sys.stderr)
        return result.returncode
    metrics = json.loads((Path(args.out) / "metrics.json").read_text())
    print(f"\nmachine: {machine()}")
    print(f"wall time {wall / 60:.1f} min ({wall:.0f} s), peak memory {peak_gib:.2f} GiB; "
          f"inside the run: {metrics['timings_s']}")
    print("\n| measure | value | target | status |\n|---|---|---|---|")
    met_all = True
    for name, (op, bar) in metrics["targets"].items():
        value = metrics["headline"].get(name)
        met = status(value, (op, bar)) == "met"
        met_all &= met
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"| {name} | {shown} | {op} {bar} | {'met' if met else 'not met'} |")
    control = (metrics.get("control") or {}).get("per_target", {})
    print("\n| target | n | Dice | control |\n|---|---|---|---|")
    for target, row in metrics["dice_per_target"].items():
        other = control.get(target, {}).get("dice")
        print(f"| {target} | {row['n']} | {row['dice']:.3f} | {'n/a' if other is None else f'{other:.3f}'} |")
    summary = {"machine": machine(), "wall_s": round(wall, 1), "peak_gib": round(peak_gib, 2), "met_all": met_all}
    (Path(args.out) / "bench.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if met_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
