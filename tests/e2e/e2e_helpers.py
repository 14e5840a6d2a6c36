"""Helpers shared by the end-to-end tests (importable: pytest puts tests/e2e on sys.path)."""

from __future__ import annotations


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a reaped-later child counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
