"""Byte quantities: IEC formatting for everything shown, and parsing of user-written sizes."""

from __future__ import annotations

import re

_IEC = ("B", "KiB", "MiB", "GiB", "TiB")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")
# "16G" and "16GiB" are binary, "16GB" is decimal: what people type and what vendors print.
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}


def format_bytes(n: int, precision: int = 1) -> str:
    """``format_bytes(1536) == '1.5 KiB'``; exact bytes below 1 KiB."""
    value = float(n)
    for unit in _IEC:
        if abs(value) < 1024 or unit == _IEC[-1]:
            if unit == "B":
                return f"{int(n)} B"
            return f"{value:.{precision}f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def parse_size(text: str | int) -> int:
    """Parse "16GiB", "16 GiB", "16G" (binary) or "16GB" (decimal) into bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative, got {text}")
        return text
    match = _SIZE_RE.match(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot read size {text!r}: write a number and a unit, e.g. '24 GiB', '24G' (both 2**30) "
            f"or '24GB' (10**9); units: B, KiB/K, MiB/M, GiB/G, TiB/T, KB, MB, GB, TB"
        )
    return int(float(match.group(1)) * _UNITS[unit])
