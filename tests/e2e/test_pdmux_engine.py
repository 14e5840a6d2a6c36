"""``enable_pdmux=True`` end to end on the CPU: the worker runs each mixed step's decode and prefill
rows as two nano-batches (one after the other here, gpu_worker/pdmux.py); tokens and logprobs
must be the joint path's (the shared engine's)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from treadle import Engine

pytestmark = pytest.mark.e2e


def _workload() -> tuple[list[list[int]], list[dict], list[bool]]:
    """Short prompts that decode while a long prompt is prefilled in 512-token chunks (the CPU's
    chunked_prefill_size) and a prompt asking for input logprobs arrives beside them: most steps
    have decode rows and prefill rows."""
    rnd = random.Random(28)
    lengths = [9, 17, 12, 600, 120]
    ids = [[rnd.randrange(100, 40000) for _ in range(n)] for n in lengths]
    params = [{"temperature": 0, "max_new_tokens": m, "ignore_eos": True} for m in (12, 10, 12, 4, 4)]
    return ids, params, [False, False, False, False, True]


def _run(eng: Engine) -> list[dict]:
    ids, params, inputs = _workload()
    return eng.generate(input_ids=ids, sampling_params=params, return_logprob=True,
                        logprob_start_len=[-1 if not w else 0 for w in inputs], top_logprobs_num=2)


def _lps(entries: list) -> np.ndarray:
    return np.array([np.nan if lp is None else lp for lp, _, _ in entries])


def test_pdmux_equals_the_joint_path(engine):
    """Float32 noise only: the decode rows' matmuls see a smaller batch. Measured on this workload
    (a longer version): output logprobs 1.1e-5 apart (4e-6 relative), where the joint path with
    256-token chunks instead of 512 moves them by 7.6e-6; input logprobs identical."""
    want = _run(engine)
    with Engine(model_path="default", random_seed=0, enable_pdmux=True) as eng:
        got = _run(eng)
        state = eng.get_server_info()["internal_states"][0]
    assert state["max_prefill_tokens_beside_decode"] > 0  # steps with decode and prefill rows did run
    for g, w in zip(got, want):
        assert g["output_ids"] == w["output_ids"]
        gm, wm = g["meta_info"], w["meta_info"]
        np.testing.assert_allclose(_lps(gm["output_token_logprobs"]), _lps(wm["output_token_logprobs"]),
                                   atol=1e-5, rtol=1e-5)
        assert [t for _, t, _ in gm["output_token_logprobs"]] == g["output_ids"]
        assert [[t for _, t, _ in top] for top in gm["output_top_logprobs"]] == \
               [[t for _, t, _ in top] for top in wm["output_top_logprobs"]]
    gin, win = got[4]["meta_info"]["input_token_logprobs"], want[4]["meta_info"]["input_token_logprobs"]
    assert len(gin) == len(win) == 120
    np.testing.assert_allclose(_lps(gin), _lps(win), atol=1e-5, rtol=1e-5)
