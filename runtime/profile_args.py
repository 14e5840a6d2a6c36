"""The arguments of ``start_profile`` (SGLang's ``ProfileReq`` fields) and their check.

Shared by the client, which refuses a bad call before anything is sent, and the worker
(``gpu_worker/profiler.py``), which checks again what reaches it. It lives here, not beside the
profiler, so that checking a call does not import torch into the user's process.
"""

from __future__ import annotations

from typing import Any

PROFILE_ARGS = {"output_dir", "start_step", "num_steps", "activities", "with_stack", "record_shapes",
                "profile_id", "profile_prefix", "profile_by_stage", "merge_profiles", "profile_stages",
                "profile_dir", "profile_name"}


def check_profile_args(args: dict[str, Any]) -> None:
    """Raise ``TypeError`` for an unknown argument (before anything starts), as SGLang does."""
    unknown = sorted(set(args) - PROFILE_ARGS)
    if unknown:
        raise TypeError(f"start_profile() got unexpected keyword argument(s): {', '.join(unknown)}")
    acts = args.get("activities")
    if acts is not None and (not isinstance(acts, list) or any(a not in ("CPU", "GPU", "MEM") for a in acts)):
        raise ValueError(f"activities must be a list of 'CPU', 'GPU', 'MEM'; got {acts!r}")
    for name in ("start_step", "num_steps"):
        v = args.get(name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "start_step" else 1)):
            kind = "a non-negative" if name == "start_step" else "a positive"
            raise ValueError(f"{name} must be {kind} int, got {v!r}")
