"""Turn a ``generate(...)`` call into validated ``GenerateReq`` items (API.md section 3.3).

Everything checkable without the tokenizer is checked here, in the caller's thread, so a bad
call raises before any work starts: shapes, rid rules, unknown sampling keys (``TypeError``)
and sampling ranges (``ValueError`` naming the field).
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Any, Optional, Sequence, Union

from treadle.runtime.messages import GenerateReq
from treadle.runtime.sampling_params import SamplingParams, check_text

Prompt = Union[str, list[str], None]
InputIds = Union[list[int], list[list[int]], None]


def make_sampling(d: Optional[dict[str, Any]], preferred: Optional[dict[str, Any]]) -> SamplingParams:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise TypeError(f"sampling_params must be a dict (or a list of dicts), got {type(d).__name__}.")
    sp = SamplingParams(**{**(preferred or {}), **d})  # unknown key: TypeError naming it
    sp.verify()
    for name in ("stop_regex", "structural_tag"):  # accepted by SGLang; refused here rather than ignored
        if getattr(sp, name) is not None:
            raise NotImplementedError(f"sampling_params[{name!r}] is not supported yet by Treadle.")
    return sp


def _per_item(name: str, value: Any, n_items: int) -> list[Any]:
    if isinstance(value, list):
        if len(value) != n_items:
            raise ValueError(f"{name} has {len(value)} entries but the batch has {n_items} prompts.")
        return value
    return [value] * n_items


def normalize_generate(
    prompt: Prompt,
    input_ids: InputIds,
    sampling_params: Union[dict, list[dict], None],
    rid: Union[str, list[str], None],
    stream: bool,
    options: dict[str, Any],
    preferred: Optional[dict[str, Any]] = None,
) -> tuple[list[GenerateReq], bool]:
    """Returns the expanded request items (prompt-major for ``n > 1``) and whether it is a batch."""
    if prompt is not None and input_ids is not None:
        raise ValueError("Give either prompt or input_ids, not both.")
    if prompt is None and input_ids is None:
        raise ValueError("Either prompt or input_ids should be provided.")
    if prompt is not None:
        if isinstance(prompt, str):
            texts, is_batch = [prompt], False
        elif isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt):
            texts, is_batch = list(prompt), True
        else:
            raise TypeError("prompt must be a str or a list of str.")
        if not texts:
            raise ValueError("prompt is an empty list.")
        for t in texts:
            if not t:
                raise ValueError("prompt cannot be empty.")
            check_text("prompt", t)
        items: list[tuple[Optional[str], Optional[list[int]]]] = [(t, None) for t in texts]
    else:
        ids_list, is_batch = _split_ids(input_ids)
        items = [(None, ids) for ids in ids_list]
    n_prompts = len(items)

    sps = sampling_params if isinstance(sampling_params, list) else [sampling_params] * n_prompts
    if len(sps) != n_prompts:
        raise ValueError(f"sampling_params has {len(sps)} entries but the batch has {n_prompts} prompts.")
    params = [make_sampling(d, preferred) for d in sps]
    set_max = [isinstance(d, dict) and "max_new_tokens" in d for d in sps]
    ns = {p.n for p in params}
    if len(ns) > 1:
        raise ValueError("The parallel_sample_num should be the same for all samples in sample params.")
    n = ns.pop()
    rids = _rids(rid, n_prompts, is_batch)
    if n > 1:
        is_batch = True  # n > 1 always returns a list, also for a single prompt
        for key in ("return_logprob", "logprob_start_len", "top_logprobs_num", "token_ids_logprob"):
            if isinstance(options.get(key), list) and key != "token_ids_logprob":
                raise ValueError(f"Cannot use a list of {key} with parallel_sample_num > 1.")

    shown = {"lora_name": "lora_path"}  # the user's argument, for the length error
    per = {k: _per_item(shown.get(k, k), v, n_prompts) for k, v in options.items() if k != "token_ids_logprob"}
    tids = options.get("token_ids_logprob")
    tids_per = tids if (isinstance(tids, list) and tids and isinstance(tids[0], list)) else [tids] * n_prompts
    if len(tids_per) != n_prompts:
        raise ValueError(f"token_ids_logprob has {len(tids_per)} lists but the batch has {n_prompts} prompts.")
    now = time.time()
    reqs = []
    for i, (text, ids) in enumerate(items):
        for j in range(n):
            sp = params[i] if n == 1 else _copy_sampling(params[i])
            reqs.append(GenerateReq(
                rid=rids[i] if n == 1 else f"{rids[i]}_{j}", text=text, input_ids=ids, sampling=sp, stream=stream,
                token_ids_logprob=tids_per[i] or None, created=now, max_new_tokens_set=set_max[i],
                **{k: v[i] for k, v in per.items() if v[i] is not None},
            ))
    return reqs, is_batch


def _copy_sampling(sp: SamplingParams) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(sp)


def _split_ids(input_ids: Any) -> tuple[list[list[int]], bool]:
    if not isinstance(input_ids, (list, tuple)):
        raise TypeError("input_ids must be a list of ints or a list of lists of ints.")
    if not input_ids:
        raise ValueError("input_ids cannot be empty.")
    if all(_is_int(t) for t in input_ids):
        return [list(input_ids)], False
    out = []
    for ids in input_ids:
        if not isinstance(ids, (list, tuple)) or not all(_is_int(t) for t in ids):
            raise TypeError("input_ids must be a list of ints or a list of lists of ints.")
        if not ids:
            raise ValueError("input_ids cannot be empty.")
        out.append(list(ids))
    return out, True


def _is_int(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _rids(rid: Union[str, Sequence[str], None], n: int, is_batch: bool) -> list[str]:
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rid, str) or (isinstance(rid, (list, tuple)) and all(isinstance(r, str) for r in rid)):
        for r in [rid] if isinstance(rid, str) else rid:
            if not r:  # an empty rid could never be aborted (abort_request's "" means no rid)
                raise ValueError("rid cannot be an empty string.")
            check_text("rid", r)
    if isinstance(rid, str):
        return [rid] if not is_batch else [f"{rid}_{i}" for i in range(n)]
    if isinstance(rid, (list, tuple)) and all(isinstance(r, str) for r in rid):
        if len(rid) != n:
            raise ValueError("The specified rids length mismatch with the batch_size for batch processing.")
        if len(set(rid)) != len(rid):
            raise ValueError(f"Duplicate request IDs detected within the request: {list(rid)}")
        return list(rid)
    raise ValueError("rid must be a str or a list of str.")


# SGLang generate() arguments for features Treadle does not build: refused when set, naming them.
_UNBUILT = {
    "mm_hashes": "caller-given multimodal hashes (Treadle hashes the pixels itself)",
    "mm_content_hashes": "caller-given multimodal hashes (Treadle hashes the pixels itself)",
    "return_routed_experts": "MoE expert routing capture (not built yet)",
    "routed_experts_start_len": "MoE expert routing capture (not built yet)",
    "require_reasoning": "hybrid reasoning models",
    "bootstrap_host": "prefill/decode disaggregation", "bootstrap_port": "prefill/decode disaggregation",
    "bootstrap_room": "prefill/decode disaggregation", "disagg_prefill_dp_rank": "prefill/decode disaggregation",
    "external_trace_header": "request tracing",
    "session_id": "radix-native sessions (use session_params)",
}


def refuse_unbuilt(kwargs: dict[str, Any]) -> None:
    """Raise NotImplementedError for an SGLang argument of an unbuilt feature given a non-default
    value; drop it from ``kwargs`` when it only carries its default."""
    for name in [k for k in kwargs if k in _UNBUILT]:
        value = kwargs.pop(name)
        if value not in (None, False, 0):
            raise NotImplementedError(f"{name}: {_UNBUILT[name]} is not supported by Treadle.")


def routed_dp_rank(rank: Any, alias: Any, dp_size: int) -> Optional[int]:
    """``routed_dp_rank`` (``data_parallel_rank`` is its deprecated alias): the DP group to run on;
    None lets the tokenizer pick (also for 0 without data parallelism)."""
    if alias is not None:
        warnings.warn("data_parallel_rank is deprecated; use routed_dp_rank", DeprecationWarning, stacklevel=4)
        rank = alias if rank is None else rank
    if rank is None:
        return None
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"routed_dp_rank must be an int, got {type(rank).__name__}.")
    if dp_size <= 1 and rank == 0:
        return None
    if not 0 <= rank < dp_size:
        raise ValueError(f"routed_dp_rank={rank} out of range [0, {dp_size})")
    return rank
