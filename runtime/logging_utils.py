"""One log format for every process, honouring ``log_level``."""

from __future__ import annotations

import logging
import sys

_FORMAT = "[%(asctime)s %(procname)s] %(levelname)s %(message)s"


class _ProcName(logging.Filter):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.procname = name

    def filter(self, record: logging.LogRecord) -> bool:
        record.procname = self.procname
        return True


def configure_logging(level: str, procname: str) -> None:
    """Set up the ``treadle`` logger tree (not the root logger: the user's process is theirs)."""
    logger = logging.getLogger("treadle")
    logger.setLevel(level.upper())
    for h in list(logger.handlers):
        if getattr(h, "_treadle", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._treadle = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    handler.addFilter(_ProcName(procname))
    logger.addHandler(handler)
    logger.propagate = False
