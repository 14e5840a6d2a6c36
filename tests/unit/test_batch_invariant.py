"""Batch-invariant ops of enable_deterministic_inference (gpu_worker/layers/batch_invariant.py,
attention/torch_deterministic.py): a row's result is bit-identical alone and inside batches of any
size, at any place; and close to the plain ops."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from treadle.gpu_worker.attention.torch_deterministic import TorchDeterministicBackend
from treadle.gpu_worker.attention.torch_native import TorchNativeBackend
from treadle.gpu_worker.forward_context import ForwardContext
from treadle.gpu_worker.layers import batch_invariant as bi


def _in_batches(fn, row: torch.Tensor, sizes=(1, 2, 3, 7, 16, 17, 33, 64)) -> list[torch.Tensor]:
    """``fn`` of batches of ``sizes`` random rows holding ``row`` at a random place; that row's result."""
    rng = random.Random(0)
    outs = []
    for m in sizes:
        x = torch.randn(m, row.shape[0]) * row.abs().mean()
        at = rng.randrange(m)
        x[at] = row
        outs.append(fn(x)[at])
    return outs


@pytest.mark.parametrize("k,n", [(64, 96), (576, 960), (1536, 576), (576, 4096)])
def test_linear_rows_are_batch_invariant(k: int, n: int) -> None:
    torch.manual_seed(k + n)
    w, b, row = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(k)
    outs = _in_batches(lambda x: bi.linear(x, w, b), row)
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], F.linear(row[None], w, b)[0], rtol=1e-5, atol=1e-5)
    plain = _in_batches(lambda x: F.linear(x, w, b), row)  # what the mode is for: MKL's rows differ
    assert not all(torch.equal(o, plain[0]) for o in plain)


@pytest.mark.parametrize("k,n", [(576, 1), (2048, 1), (576, 3)])
def test_narrow_linear_rows_are_batch_invariant(k: int, n: int) -> None:
    """A product with one output column (a shared expert's sigmoid gate) is a GEMV to MKL, whose
    rows changed with the number of 32-row tiles before it was padded to 8 columns."""
    torch.manual_seed(k + n)
    w, b, row = torch.randn(n, k) * 0.05, torch.randn(n), torch.randn(k)
    outs = _in_batches(lambda x: bi.linear(x, w, b), row, sizes=(1, 2, 3, 7, 16, 17, 33, 64, 100, 200))
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0], F.linear(row[None], w, b)[0], rtol=1e-5, atol=1e-5)


def test_row_reductions_are_batch_invariant() -> None:
    torch.manual_seed(1)
    row = torch.randn(49152) * 4
    lse = _in_batches(lambda x: bi.logsumexp(x), row)
    assert all(torch.equal(o, lse[0]) for o in lse)
    torch.testing.assert_close(lse[0], row.logsumexp(0))
    sm = _in_batches(lambda x: bi.softmax(x), row)
    assert all(torch.equal(o, sm[0]) for o in sm)
    torch.testing.assert_close(sm[0], row.softmax(0))
    act = _in_batches(lambda x: bi.silu_and_mul(x), torch.randn(2 * 1000))
    assert all(torch.equal(o, act[0]) for o in act)
    g, u = torch.randn(2 * 1000).chunk(2)
    torch.testing.assert_close(bi.silu_and_mul(torch.cat([g, u])[None])[0], F.silu(g) * u)
    for approx in ("tanh", "none"):  # Gemma's GeGLU; F.gelu's tail, like silu's, is another code path
        act = _in_batches(lambda x: bi.gelu_and_mul(x, approx), torch.randn(2 * 1000))
        assert all(torch.equal(o, act[0]) for o in act)
        torch.testing.assert_close(bi.gelu_and_mul(torch.cat([g, u])[None], approx)[0],
                                   F.gelu(g, approximate=approx) * u)
        x = torch.randn(1000) * 3  # an element alone (the scalar tail) and inside a tensor: F.gelu differs
        alone = torch.cat([F.gelu(x[i:i + 1], approximate=approx) for i in range(200)])
        assert not torch.equal(alone, F.gelu(x, approximate=approx)[:200])
        assert torch.equal(torch.cat([bi.gelu_and_mul(torch.stack([e, e])[None], approx)[0] for e in x[:200]]),
                           bi.gelu_and_mul(torch.cat([x, x])[None], approx)[0, :200])


class _Cache:
    def __init__(self, tokens: int, hkv: int, d: int):
        self.kb, self.vb = torch.randn(tokens, hkv, d), torch.randn(tokens, hkv, d)

    def k(self, layer: int) -> torch.Tensor:
        return self.kb

    def v(self, layer: int) -> torch.Tensor:
        return self.vb


def _attend(backend, cache, r2t, rows, q_of, window=None, cap=None) -> list[torch.Tensor]:
    """Attention of ``rows`` = [(slot, start, n)] with queries ``q_of(slot)[start:start+n]``; per row.
    ``window`` / ``cap``: the layer's sliding window and logit cap."""
    q = torch.cat([q_of(s)[a:a + n] for s, a, n in rows])
    ctx = ForwardContext(input_ids=torch.zeros(q.shape[0], dtype=torch.int64), positions=torch.zeros(0),
                         out_cache_loc=torch.zeros(0), slots=[r[0] for r in rows], starts=[r[1] for r in rows],
                         extend_lens=[r[2] for r in rows], logits_indices=torch.zeros(0), req_to_token=r2t,
                         kv_cache=cache, attn_backend=backend)
    ctx.attn_meta = backend.init_forward(ctx)
    layer = SimpleNamespace(layer_id=0, scaling=0.125, sliding_window=window, logit_cap=cap)
    out = backend.attend(q, layer, ctx)
    return list(out.split([r[2] for r in rows]))


@pytest.mark.parametrize("window,cap", [(None, None), (5, None), (100, None), (40, 3.0)])
def test_attention_is_batch_and_chunk_invariant(window, cap) -> None:
    """One request's 150 positions: whole, in uneven chunks, one query at a time (decode), and each
    of those beside other rows: every query's output bit-identical, and close to SDPA's. With a
    sliding window smaller than the prompt (within one key tile, across tiles; with Gemma 2's soft
    cap), other rows attend under the same window, as the layers of a model do."""
    torch.manual_seed(2)
    h, hkv, d, slots, ctx_len = 6, 2, 64, 8, 256
    cache = _Cache(slots * ctx_len, hkv, d)
    r2t = torch.randperm(slots * ctx_len).view(slots, ctx_len)
    qs = {s: torch.randn(ctx_len, h, d) for s in range(slots)}
    det = TorchDeterministicBackend()
    whole = _attend(det, cache, r2t, [(0, 0, 150)], qs.__getitem__, window, cap)[0]
    ref = _attend(TorchNativeBackend(), cache, r2t, [(0, 0, 150)], qs.__getitem__, window, cap)[0]
    torch.testing.assert_close(whole, ref, rtol=1e-5, atol=1e-5)
    if window is not None:  # the window changes the result (it is applied, not ignored)
        assert not torch.allclose(whole, _attend(det, cache, r2t, [(0, 0, 150)], qs.__getitem__, None, cap)[0])
    rng = random.Random(3)
    for trial in range(4):
        cuts = sorted(rng.sample(range(1, 150), 5 if trial < 3 else 148))
        parts, prev = [], 0
        for c in cuts + [150]:
            others = [(s, rng.randrange(0, 60), rng.randrange(1, 40)) for s in range(1, 1 + rng.randrange(0, 7))]
            rows = others + [(0, prev, c - prev)]
            rng.shuffle(rows)
            outs = _attend(det, cache, r2t, rows, qs.__getitem__, window, cap)
            parts.append(outs[rows.index((0, prev, c - prev))])
            prev = c
        assert torch.equal(torch.cat(parts), whole), trial
