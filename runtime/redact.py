"""Secrets among the engine's arguments, masked wherever the arguments leave the engine.

``get_server_info()`` echoes every ``ServerArgs`` field, as SGLang's does, ``treadle serve``
answers ``GET /get_server_info`` with it, and a fleet's router forwards that route to a worker.
The API keys guard those very routes (and the control routes that load weights and adapters), so
they must not travel with the answer, nor land in a log or a metrics scrape that reads it: a secret
that is set is shown as ``MASK``, so a client still sees that one is set; an unset one stays ``None``.
The engine's own ``server_args`` object keeps the real values (``treadle serve`` checks requests
against it); the child processes get the masked ones (none of them serves HTTP, and their
arguments are a file in the socket directory).
"""

from __future__ import annotations

from typing import Any

# Every ServerArgs field that holds a key, token or password (tests/unit/test_redact.py checks the
# field names against this list, so a new secret field fails a test until it is added here).
SECRET_FIELDS = ("api_key", "admin_api_key", "ssl_keyfile_password")
MASK = "***"


def redact(args: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``args`` (``ServerArgs.to_dict()`` or an answer built on it) with each secret
    that is set replaced by ``MASK``."""
    return {k: MASK if k in SECRET_FIELDS and v not in (None, "") else v for k, v in args.items()}
