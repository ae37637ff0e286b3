"""The one reader of /proc/cpuinfo: the CPU's model name and feature flags."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def cpuinfo(field: str) -> str:
    """The value of a /proc/cpuinfo field for the first CPU ("" where there is none)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == field), "")


def flags() -> set[str]:
    return set(cpuinfo("flags").split())


def has_native_bf16() -> bool:
    """The CPU computes bf16 itself (avx512_bf16 or AMX) rather than emulating it."""
    return bool({"avx512_bf16", "amx_bf16"} & flags())
