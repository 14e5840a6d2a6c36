"""The start-up warm-up (``gpu_worker/warmup.py``) and the KV pool sized from a measured prefill
(``gpu_worker/kv_sizing.py``), on the CPU: the warm-up must leave no trace (a warmed runner gives
the same greedy and sampled tokens as a fresh one), and the sizing's arithmetic and its forward are
checked with the device's memory figures faked at the boundary. The CUDA path: the ``gpu`` test below."""

from __future__ import annotations

import gc
import tempfile

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from treadle.gpu_worker.kv_sizing import GIB, kv_tokens_from_peak, profile_kv_pool, reserve_bytes
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.warmup import prefill_step_tokens, should_warm_up, warm_up, warmup_lengths
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec
from treadle.runtime.server_args import ServerArgs

VOCAB, KV_TOKENS, CONTEXT = 500, 256, 128


@pytest.fixture(scope="module")
def model_dir():
    torch.manual_seed(5)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                      initializer_range=0.1, bos_token_id=None, eos_token_id=None, pad_token_id=0))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        yield d


def runner(path: str, device: str = "cpu", **kw) -> ModelRunner:
    kw.setdefault("kv_tokens", KV_TOKENS)
    return ModelRunner(RunnerConfig(model_dir=path, device=device, dtype="float32", max_slots=4,
                                    context_len=CONTEXT, random_seed=3, **kw))


def generate(r: ModelRunner, spec: SamplingSpec, n: int = 6) -> list[int]:
    """Two requests (slots 0 and 1, the warm-up's slot first) decoded together for ``n`` steps."""
    prompts = [[5, 17, 42, 8, 99], [3, 1, 4, 1, 5, 9, 2]]
    loc, out = iter(range(KV_TOKENS)), [[], []]
    rows = [PlanRow(s, p, 0, [next(loc) for _ in p]) for s, p in enumerate(prompts)]
    ids, _ = r.forward(ForwardPlan(step=0, new_slots=[NewSlot(s, spec) for s in (0, 1)], rows=rows))
    for step in range(1, n):
        for s in (0, 1):
            out[s].append(ids[s])
        rows = [PlanRow(s, [out[s][-1]], len(prompts[s]) + step - 1, [next(loc)]) for s in (0, 1)]
        ids, _ = r.forward(ForwardPlan(step=step, rows=rows))
    return out[0] + out[1]


def test_warmup_lengths_reach_every_extend_block_size_and_the_largest_step():
    assert warmup_lengths(True, 8192, 131072, 10**6) == [16, 32, 64, 1024, 8192]
    assert warmup_lengths(True, 512, 131072, 10**6) == [16, 32, 64, 512, 1024]
    assert warmup_lengths(True, 8192, 600, 10**6) == [16, 32, 64, 599]  # within the context (one position to decode)
    assert warmup_lengths(True, 8192, 4096, 40) == [16, 32, 39]  # within the pool
    assert warmup_lengths(False, 512, 4096, 16384) == [8]  # nothing to compile on the CPU: one short prompt
    assert warmup_lengths(True, 8192, 1, 100) == []
    assert prefill_step_tokens(ServerArgs(device="cpu").resolved()) == 512
    assert prefill_step_tokens(ServerArgs(device="cpu", chunked_prefill_size=-1, max_prefill_tokens=900)) == 900
    assert prefill_step_tokens(ServerArgs(device="cpu", chunked_prefill_size=4096, max_prefill_tokens=900)) == 900


@pytest.mark.parametrize("spec", [SamplingSpec(temperature=0.0), SamplingSpec(temperature=1.0)], ids=["greedy", "sampled"])
def test_warm_up_leaves_no_trace(model_dir, spec):
    """Same tokens after a warm-up as without one, sampled ones included (the shared generator is
    restored); the KV pool and the slot's table row are zero again."""
    fresh, warmed = runner(model_dir), runner(model_dir)
    assert should_warm_up(warmed)
    assert warm_up(warmed, [8, 16]) > 0  # the second length samples (the CUDA lengths alternate so)
    assert warmed.kv_cache.buf.abs().sum() == 0 and warmed.req_to_token.abs().sum() == 0
    assert generate(warmed, spec) == generate(fresh, spec)


def test_reserve_and_pool_arithmetic():
    total, peak = 80 * GIB, 2 * GIB
    r = reserve_bytes(total, peak, prefill_tokens=8192, graph_bs=256, max_slots=256, vocab=128256)
    graphs, sampling, margin = peak * 256 // 8192, 256 * 128256 * 16, int(0.05 * total)
    assert r == peak + graphs + sampling + margin
    assert reserve_bytes(10 * GIB, 0, 1, 0, 1, 10) == GIB + 160  # the margin is never under 1 GiB
    free, per_token = 60 * GIB, 131072  # 60 GiB free after the weights, 128 KiB of K and V per token
    tokens, frac = kv_tokens_from_peak(free, total, per_token, r, context_len=131072)
    assert tokens == (free - r) // per_token
    assert frac == pytest.approx((total - free + tokens * per_token) / total)
    assert 0.9 < frac < 0.95  # vs the fixed 0.85: about 7 GB more KV on an 80 GB card here
    with pytest.raises(ValueError, match="context needs 131072"):
        kv_tokens_from_peak(2 * GIB, total, per_token, r, context_len=131072)


def test_profile_kv_pool_runs_the_largest_prefill_and_sizes_from_what_it_measured(model_dir):
    """The device boundary faked: ``measure`` runs the profiling forward (and checks it is the
    largest step, on a provisional pool), ``mem_info`` reports free and total memory."""
    r = runner(model_dir, prefill_tokens=100, cuda_graph_max_bs=4)
    seen = {}

    def measure(run, device):
        seen["pool"] = r.kv_cache.num_tokens
        run()
        seen["slot_len"] = int((r.req_to_token[0] != 0).sum())  # zeroed again by the warm-up
        return 10_000_000

    per_token = 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 KV heads of 16, float32
    sizing = profile_kv_pool(r, 2, 2, 16, measure=measure, mem_info=lambda d: (3 * GIB, 8 * GIB))
    assert seen == {"pool": 102, "slot_len": 0}  # 100 prompt tokens + the decode step + the spare location
    reserve = reserve_bytes(8 * GIB, 10_000_000, 100, 4, 4, VOCAB)
    assert sizing.reserve == reserve and sizing.activation_peak == 10_000_000
    assert r.cfg.kv_tokens == sizing.tokens == (3 * GIB - reserve) // per_token and r.kv_cache is None
    assert sizing.mem_fraction_static == pytest.approx((5 * GIB + sizing.tokens * per_token) / (8 * GIB))
    assert sizing.report()["kv_tokens"] == sizing.tokens


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_pool_from_measured_prefill_and_warm_first_prompt(model_dir):
    """On a GPU: without mem_fraction_static the pool is sized from a measured prefill, and after
    the warm-up a new prompt of a warmed length runs as fast as a repeated one (within 2x)."""
    import time

    r = runner(model_dir, "cuda", kv_tokens=0, mem_fraction_static=None, prefill_tokens=64, cuda_graph_max_bs=4)
    try:
        assert r.kv_sizing is not None and r.kv_sizing.activation_peak > 0 and r.cfg.kv_tokens == r.kv_sizing.tokens
        assert 0 < r.kv_sizing.mem_fraction_static < 1
        free, total = torch.cuda.mem_get_info()
        assert free >= r.kv_sizing.reserve * 0.9  # the pool left the reserve free
        warm_up(r, warmup_lengths(True, 64, CONTEXT, r.cfg.kv_tokens))
        times = []
        for k in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            r.forward(ForwardPlan(step=k, new_slots=[NewSlot(1, SamplingSpec(temperature=0.0))],
                                  rows=[PlanRow(1, list(range(1 + k, 65 + k)), 0, list(range(64)))]))
            times.append(time.perf_counter() - t)
        assert times[0] < 2 * min(times[1:]) + 0.005, times
    finally:  # the pool takes most of the card: give it back to the tests after this one
        del r
        gc.collect()
        torch.cuda.empty_cache()
