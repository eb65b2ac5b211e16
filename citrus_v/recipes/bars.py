"""Quality bars: a measured value against its bar, as the demo's report states it."""

from __future__ import annotations

from typing import Any

Rule = tuple[str, float]  # (">=", bar) or ("<=", bar)


def summary_value(tasks: dict[str, Any], task: str, key: str) -> float | None:
    """``key`` of ``task``'s overall summary in an eval run's ``tasks``, None when absent or not a number."""
    value = tasks.get(task, {}).get("overall", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def status(value: float | None, rule: Rule) -> str:
    """``met``, ``not met`` or ``n/a`` for ``value`` against ``rule``."""
    if value is None:
        return "n/a"
    met = value >= rule[1] if rule[0] == ">=" else value <= rule[1]
    return "met" if met else "not met"


def bar_rows(numbers: dict[str, float | None], rules: dict[str, Rule]) -> list[str]:
    """Markdown table rows ``| measure | value | target | status |`` of ``rules``, in their order."""
    rows = []
    for name, rule in rules.items():
        value = numbers.get(name)
        shown = "n/a" if value is None else f"{value:.3f}"
        rows.append(f"| {name} | {shown} | {rule[0]} {rule[1]} | {status(value, rule)} |")
    return rows
