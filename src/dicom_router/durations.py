"""Durations as people type them (``90m``, ``24h``, ``7d``): drift windows, schedules, ``--since``."""

from __future__ import annotations

import re
from datetime import timedelta

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(text: str) -> timedelta:
    """``90m``, ``24h``, ``7d``, ``2w`` → a timedelta; ValueError names what was expected."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r}: expected a number and a unit among s, m, h, d, w (e.g. 24h)")
    return timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])
