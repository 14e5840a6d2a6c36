"""Custom logit processors for the unit tests, importable by path (pytest puts tests/unit on sys.path).

The worker imports processors by ``"module:Name"``; these record their calls so the tests can
check grouping, instance caching and the per-row params.
"""

from __future__ import annotations

from typing import Any

from treadle.runtime.logit_processor import CustomLogitProcessor


class ForceToken(CustomLogitProcessor):
    """Makes ``custom_params["token"] + self.offset`` the only possible token of each row."""

    offset = 0
    instances = 0
    calls: list[tuple[int, int, list[dict[str, Any]]]] = []  # (instance id, rows, params) per call

    def __init__(self) -> None:
        type(self).instances += 1

    def __call__(self, logits: Any, custom_param_list: list[dict[str, Any]]) -> Any:
        type(self).calls.append((id(self), logits.shape[0], custom_param_list))
        for i, params in enumerate(custom_param_list):
            tok = params["token"] + self.offset
            logits[i] = float("-inf")
            logits[i, tok] = 0.0
        return logits


class NotAProcessor:
    def __call__(self, logits: Any, params: Any) -> Any:
        return logits
