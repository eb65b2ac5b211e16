"""What a request gets for the sampling fields it leaves out: the command line, else the checkpoint's
``generation_config.json``, else greedy with nothing changed.

ms-swift's rule (``prepare_generation_config``) decides between greedy and sampling: a request without a
temperature samples at the checkpoint's temperature only when the file says ``do_sample: true``; otherwise
it is answered greedily. A request's own fields always win. Keys the file does not state change nothing (no
top-k cut, ``top_p`` 1, no repetition penalty) — transformers would cut at ``top_k`` 50 there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

GENERATION_CONFIG = "generation_config.json"
DEFAULT_MAX_TOKENS = 512


class GenerationConfigError(ValueError):
    """A ``generation_config.json`` that cannot give the server its defaults; the message names the fix."""


@dataclass(frozen=True)
class GenerationDefaults:
    """The values a request gets for each sampling field it leaves out, and where each value comes from."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    max_tokens: int = DEFAULT_MAX_TOKENS
    sources: dict[str, str] = field(default_factory=dict)  # field -> "generation_config.json" or "--flag"

    @classmethod
    def from_folder(cls, folder: str | Path) -> GenerationDefaults:
        """The defaults ``folder/generation_config.json`` states (read by transformers); plain ones without it."""
        path = Path(folder) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        stated = _read(path)
        values: dict[str, Any] = {}
        if stated.get("do_sample") is True:
            values["temperature"] = float(stated["temperature"]) if stated.get("temperature") is not None else 1.0
        for key in ("top_p", "top_k", "repetition_penalty"):
            if stated.get(key) is not None:
                values[key] = stated[key]
        if stated.get("max_new_tokens") is not None:
            values["max_tokens"] = stated["max_new_tokens"]
        defaults = cls(**values, sources={key: GENERATION_CONFIG for key in values})
        defaults.check(path.name)
        return defaults

    def with_flags(self, **flags: Any) -> GenerationDefaults:
        """These defaults with the command-line values that were given (``None``: not given) put over them."""
        given = {key: value for key, value in flags.items() if value is not None}
        sources = {**self.sources, **{key: f"--{key}" for key in given}}
        updated = replace(self, **given, sources=sources)
        updated.check("the command line")
        return updated

    def check(self, origin: str) -> None:
        """Raise :class:`GenerationConfigError` naming ``origin`` and the field when a value is out of range."""
        problems = {
            "temperature": self.temperature < 0,
            "top_p": not 0 < self.top_p <= 1,
            "top_k": self.top_k < -1,
            "repetition_penalty": self.repetition_penalty <= 0,
            "max_tokens": self.max_tokens < 1,
        }
        for name, bad in problems.items():
            if bad:
                raise GenerationConfigError(
                    f"{origin}: {name}={getattr(self, name)!r} is out of range (temperature >= 0, 0 < top_p <= 1, "
                    "top_k >= -1, repetition_penalty > 0, max_new_tokens >= 1); fix or remove it"
                )

    def describe(self) -> list[str]:
        """One line per default that does not come from the plain values, naming where it comes from."""
        return [f"{name} {getattr(self, name)} (from {source})" for name, source in self.sources.items()]


def _read(path: Path) -> dict[str, Any]:
    """The keys ``path`` states, through transformers' ``GenerationConfig`` (which checks their types)."""
    from transformers import GenerationConfig

    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise GenerationConfigError(f"{path} line {err.lineno}: invalid JSON ({err.msg}); fix or remove it") from err
    try:
        config = GenerationConfig.from_pretrained(path.parent, local_files_only=True)
    except (OSError, ValueError, TypeError) as err:
        raise GenerationConfigError(f"{path}: transformers cannot read it ({err}); fix or remove it") from err
    stated = config.to_diff_dict()
    for key in ("top_k", "max_new_tokens"):
        value = stated.get(key)
        if value is not None and (isinstance(value, bool) or not float(value).is_integer()):
            raise GenerationConfigError(f"{path}: {key}={value!r} must be a whole number; fix or remove it")
        if value is not None:
            stated[key] = int(value)
    for key in ("temperature", "top_p", "repetition_penalty"):
        value = stated.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise GenerationConfigError(f"{path}: {key}={value!r} must be a number; fix or remove it")
    return stated
