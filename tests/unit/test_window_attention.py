"""Sliding-window and soft-capped attention in every backend against a plain torch reference.

The reference is written from the definition (float64, one query at a time): a query at
position p sees keys at positions ``(p - W, p]`` (transformers' sliding-window mask) and its
scores are ``c * tanh(s / c)`` before the softmax (Gemma 2's soft-capping). Rows mix decode
(one new token), prefill and extends after a cached prefix longer than the window; the cache is
noise with shuffled locations, so a key read outside the window shows. The Triton kernels run in
Triton's CPU interpreter in a subprocess (see test_triton_attention.py), and on CUDA in bf16.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path
import pytest
import torch

from treadle.gpu_worker.attention.torch_native import TorchNativeBackend
from treadle.gpu_worker.forward_context import ForwardContext
from treadle.gpu_worker.kv_cache import KVCache
from treadle.gpu_worker.layers.attention import Attention

LAYER = 1


class Step:
    """A step of ``rows`` = [(start, n)] over a noisy 2-layer cache with permuted locations."""

    def __init__(self, rows, h, hkv, d, window, cap, seed=0, device="cpu"):
        gen, rnd = torch.Generator().manual_seed(seed), random.Random(seed)
        self.rows, self.device, self.window, self.cap = rows, device, window, cap
        self.layer = Attention(h, hkv, d, d ** -0.5, LAYER, sliding_window=window, logit_cap=cap)
        num_locs = sum(s + n for s, n in rows) + 29
        perm = torch.randperm(num_locs, generator=gen)
        self.slots = rnd.sample(range(len(rows) + 3), len(rows))
        self.r2t = torch.zeros(len(rows) + 3, max(s + n for s, n in rows) + 5, dtype=torch.int64)
        new, off = [], 0
        for slot, (s, n) in zip(self.slots, rows):
            self.r2t[slot, : s + n] = perm[off : off + s + n]
            new.append(perm[off + s : off + s + n])
            off += s + n
        t = sum(n for _, n in rows)
        self.kv = torch.randn(2, 2, num_locs, hkv, d, generator=gen)
        self.q, self.k, self.v = (torch.randn(t, x, d, generator=gen) * 2 for x in (h, hkv, hkv))
        self.out_loc = torch.cat(new)

    def run(self, backend, dtype=torch.float32) -> torch.Tensor:
        dev = self.device
        cache = KVCache(2, self.kv.shape[2], self.kv.shape[3], self.kv.shape[4], dtype, dev)
        cache.buf.copy_(self.kv.to(dtype))
        ctx = ForwardContext(
            input_ids=torch.zeros(self.k.shape[0], dtype=torch.int64, device=dev), positions=None,
            out_cache_loc=self.out_loc.to(dev), slots=self.slots, starts=[s for s, _ in self.rows],
            extend_lens=[n for _, n in self.rows], logits_indices=None, req_to_token=self.r2t.to(dev),
            kv_cache=cache, attn_backend=backend)
        ctx.attn_meta = backend.init_forward(ctx)
        q, k, v = (x.to(dev, dtype) for x in (self.q, self.k, self.v))
        return backend.forward(q, k, v, self.layer, ctx).float().cpu()

    def reference(self) -> torch.Tensor:
        """The definition, query by query, in float64 (one thread: hundreds of tiny ops, which
        thread hand-offs slow tenfold on a busy machine)."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._reference()
        finally:
            torch.set_num_threads(threads)

    def _reference(self) -> torch.Tensor:
        kc, vc = self.kv[0, LAYER].double().clone(), self.kv[1, LAYER].double().clone()
        kc[self.out_loc], vc[self.out_loc] = self.k.double(), self.v.double()
        h, hkv, d = self.q.shape[1], kc.shape[1], kc.shape[2]
        out, t = torch.empty(self.q.shape, dtype=torch.float64), 0
        for slot, (s, n) in zip(self.slots, self.rows):
            for i in range(n):
                p = s + i
                lo = 0 if self.window is None else max(p - self.window + 1, 0)
                locs = self.r2t[slot, lo : p + 1]
                k = kc[locs].repeat_interleave(h // hkv, dim=1)  # [L, H, D]
                v = vc[locs].repeat_interleave(h // hkv, dim=1)
                sc = torch.einsum("hd,lhd->hl", self.q[t].double(), k) * d ** -0.5
                if self.cap is not None:
                    sc = self.cap * torch.tanh(sc / self.cap)
                out[t] = torch.einsum("hl,lhd->hd", sc.softmax(-1), v)
                t += 1
        return out.float()


ROWS = [(0, 37), (0, 1), (21, 1), (50, 9), (13, 40), (200, 1), (90, 70)]
# name: (rows, heads, kv heads, head dim, window, cap, backend.num_sms for the Triton decode splits)
CASES = {
    "window8_gqa2": (ROWS, 4, 2, 64, 8, None, 4),
    "window33_cap": (ROWS, 4, 1, 32, 33, 5.0, 4),
    "cap_only_mha": (ROWS, 2, 2, 64, None, 3.0, 4),
    "window1": ([(0, 5), (7, 1), (30, 3)], 2, 1, 32, 1, None, 4),
    "window_longer_than_rows": (ROWS, 4, 2, 64, 4096, 2.0, 4),
    "long_decode_split_window": ([(1000, 1), (300, 1), (5, 1), (600, 40)], 4, 1, 64, 150, 4.0, 64),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_native_window_and_cap(name):
    rows, h, hkv, d, window, cap, _ = CASES[name]
    step = Step(rows, h, hkv, d, window, cap, seed=len(name))
    torch.testing.assert_close(step.run(TorchNativeBackend()), step.reference(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_deterministic_window_and_cap(name):
    """enable_deterministic_inference's CPU backend (key tiles from position 0, masked by the window)."""
    from treadle.gpu_worker.attention.torch_deterministic import TorchDeterministicBackend

    rows, h, hkv, d, window, cap, _ = CASES[name]
    step = Step(rows, h, hkv, d, window, cap, seed=len(name))
    torch.testing.assert_close(step.run(TorchDeterministicBackend()), step.reference(), atol=2e-5, rtol=0)


def test_window_and_cap_are_checked():
    with pytest.raises(ValueError, match="sliding_window"):
        Attention(2, 2, 16, 0.25, 0, sliding_window=0)
    with pytest.raises(ValueError, match="logit_cap"):
        Attention(2, 2, 16, 0.25, 0, logit_cap=-1.0)


def test_layer_windows_follow_transformers():
    """Which layers get a window: ``layer_types`` where the config has them, else every layer."""
    from transformers import Gemma2Config, MistralConfig, Qwen2Config
    from transformers.models.gemma3 import Gemma3TextConfig

    from treadle.gpu_worker.layers.attention import layer_windows

    small = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4)
    assert layer_windows(MistralConfig(**small, sliding_window=16)) == [16] * 4
    assert layer_windows(MistralConfig(**small, sliding_window=None)) == [None] * 4
    assert layer_windows(Gemma2Config(**small, sliding_window=8)) == [8, None, 8, None]
    assert layer_windows(Gemma3TextConfig(**{**small, "num_hidden_layers": 7}, sliding_window=8)) == [8] * 5 + [None, 8]
    assert layer_windows(Qwen2Config(**small, sliding_window=8)) == [None] * 4  # named, not used
    assert layer_windows(Qwen2Config(**small, sliding_window=8, use_sliding_window=True, max_window_layers=2)) == [
        None, None, 8, 8]
    cfg = Gemma2Config(**small)
    cfg.layer_types = cfg.layer_types[:3]
    with pytest.raises(ValueError, match="layer_types"):
        layer_windows(cfg)


def _interp_main() -> int:
    """Every case through the Triton backend in the interpreter; exit status = failures."""
    from treadle.gpu_worker.attention.triton_backend import TritonBackend

    fails = 0
    for name, (rows, h, hkv, d, window, cap, sms) in CASES.items():
        t0 = time.time()
        step = Step(rows, h, hkv, d, window, cap, seed=len(name))
        be = TritonBackend(device="cpu", dtype=torch.float32)
        be.num_sms = sms
        err = (step.run(be) - step.reference()).abs().max().item()
        fails += not err < 1e-4
        print(f"{'ok  ' if err < 1e-4 else 'FAIL'} {name}: max err {err:.2e} ({time.time() - t0:.1f} s)", flush=True)
    return fails


def test_triton_kernels_in_interpreter():
    pytest.importorskip("triton")
    from kernel_helpers import interpreter_runs_loops

    if not interpreter_runs_loops():
        pytest.skip("this triton's interpreter fails on numpy >= 2.4")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window,cap", [(1024, None), (4096, 50.0), (None, 50.0), (7, None)])
@pytest.mark.parametrize("h,hkv,d", [(16, 8, 256), (32, 8, 128), (8, 1, 64)])
def test_cuda_window_and_cap_bf16(window, cap, h, hkv, d):
    """Gemma-3-12B's heads (16/8, head dim 256) and others, bf16, long prefixes past the window."""
    from treadle.gpu_worker.attention.triton_backend import TritonBackend

    rows = [(0, 700), (0, 1), (4000, 1), (1500, 300), (9000, 1), (33, 1), (2047, 129), (100, 2)]
    step = Step(rows, h, hkv, d, window, cap, seed=h + d, device="cuda")
    ref = step.run(TorchNativeBackend(), torch.float32)  # the float32 torch backend, checked above
    got = step.run(TritonBackend(device="cuda", dtype=torch.bfloat16), torch.bfloat16)
    err = (got - ref).abs()
    assert err.max().item() < 4e-2 and err.mean().item() < 3e-3, (err.max(), err.mean())


if __name__ == "__main__":
    sys.exit(_interp_main())
