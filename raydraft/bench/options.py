"""A benchmark's `key=value` options over its defaults."""

from __future__ import annotations

from typing import Any


def parse_options(bench: str, options: list[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """The defaults with `options` applied, each value cast to its default's type; an
    unknown key or a value of the wrong type stops the benchmark and says which."""
    opts = dict(defaults)
    for item in options:
        key, _, value = item.partition("=")
        if key not in opts:
            raise SystemExit(f"{bench}: unknown option {key!r}; options: {sorted(opts)}")
        kind = type(defaults[key])
        try:
            opts[key] = kind(value)
        except ValueError:
            raise SystemExit(f"{bench}: option {key}={value!r} is not a {kind.__name__}") from None
    return opts
