"""The argument parser every ``citrus-v`` subcommand is built with: one spelling, defaults in every help.

Flags are spelled with underscores, as ms-swift spells them (``--max_image_pixels``). A user who types the
hyphenated spelling (``--max-image-pixels``) is understood and told the canonical one in a note, so command
lines written either way keep working. Every ``--help`` shows each flag's default.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

_ALIAS_NOTE = "note: {alias} is spelled {canonical}; both work"
# the help of every --model flag that loads a model
MODEL_HELP = "model folder (ours or the released weights' layout), or tiny-base: the shipped checkpoint"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Append ``(default: X)`` to a flag's help when it has a default worth showing and does not name it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or "(default" in text or "default:" in text or "%(default)" in text:
            return text
        default = action.default
        if default is None or default is argparse.SUPPRESS or default is False or default == []:
            return text
        shown = " ".join(str(v) for v in default) if isinstance(default, list | tuple) else "%(default)s"
        return f"{text} (default: {shown})".strip()


class RawDescriptionDefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultsHelpFormatter):
    """:class:`DefaultsHelpFormatter` that keeps a description's own line breaks."""


class CitrusArgumentParser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` that shows defaults and accepts hyphen-for-underscore spellings.

    Subparsers made from it are of the same class, so the whole ``citrus-v`` tree behaves alike.
    """

    def __init__(self, *args: Any, notes: TextIO | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)
        self._notes = notes

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._canonical(words), namespace)

    def _canonical(self, words: list[str]) -> list[str]:
        """``words`` with each flag this parser knows only in the other spelling rewritten, and a note said."""
        known = self._option_string_actions
        out = []
        for position, word in enumerate(words):
            if word == "--":
                return out + words[position:]
            flag, sep, value = word.partition("=")
            if flag.startswith("--") and flag not in known:
                for candidate in (flag[:2] + flag[2:].replace("-", "_"), flag[:2] + flag[2:].replace("_", "-")):
                    if candidate in known:
                        print(_ALIAS_NOTE.format(alias=flag, canonical=candidate), file=self._notes or sys.stderr)
                        word = candidate + sep + value
                        break
            out.append(word)
        return out
