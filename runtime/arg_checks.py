"""The checks every argument module shares: a value of the right kind, in range or among the
choices, else a ``ValueError`` naming the field (``ServerArgs``, ``lora_args``, ``parallel_args``,
the weight-update calls)."""

from __future__ import annotations

from typing import Any, Optional


def check_choice(name: str, v: Any, choices: tuple) -> None:
    if v not in choices:
        shown = [c for c in choices if c is not None]
        raise ValueError(f"{name} must be one of {shown}, got {v!r}.")


def check_int(name: str, v: Any, lo: Optional[int] = None, hi: Optional[int] = None, optional: bool = False) -> None:
    """A ``ValueError`` naming ``name`` unless ``v`` is an int (not a bool) in ``[lo, hi]``."""
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{name} must be an int, got {v!r}.")
    if lo is not None and v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}.")
    if hi is not None and v > hi:
        raise ValueError(f"{name} must be at most {hi}, got {v}.")


def check_num(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{name} must be a number, got {v!r}.")
