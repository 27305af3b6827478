"""A benchmark's `key=value` options over its defaults."""

from __future__ import annotations

from typing import Any


def parse_options(bench: str, options: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults with `options` applied, each value cast to its default's type; an
    unknown key stops the benchmark and names the known ones."""
    opts = dict(defaults)
    for item in options:
        key, _, value = item.partition("=")
        if key not in opts:
            raise SystemExit(f"{bench}: unknown option {key!r}; options: {sorted(opts)}")
        opts[key] = type(defaults[key])(value)
    return opts
