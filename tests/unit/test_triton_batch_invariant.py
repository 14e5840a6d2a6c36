"""The CUDA side of enable_deterministic_inference: the fixed-config Triton matmul and row logsumexp
(``layers/triton_batch_invariant.py``) and the deterministic Triton attention backend
(``attention/triton_deterministic.py``). A row's (a query's) result must be bit-identical alone and
in any batch, its prompt whole or chunked anywhere, decode rows included; and close to torch's.

On the CPU in Triton's interpreter (a child process, small shapes: this checks the kernels' logic,
not the GPU's arithmetic); on CUDA (``gpu``) at model sizes in bfloat16 and float32.
"""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from kernel_helpers import interpret_script, interpreter_runs_loops


def check_matmul(device: str, dtype: torch.dtype, shapes, sizes) -> str:
    from treadle.gpu_worker.layers.triton_batch_invariant import matmul

    for k, n in shapes:
        g = torch.Generator().manual_seed(k * 7 + n)
        w = (torch.randn(n, k, generator=g) * 0.05).to(device, dtype)
        b = torch.randn(n, generator=g).to(device, dtype)
        row = torch.randn(k, generator=g).to(device, dtype)
        outs = []
        for m in sizes:
            x = torch.randn(m, k, generator=g).to(device, dtype)
            at = m // 2
            x[at] = row
            outs.append(matmul(x, w, b)[at])
        if not all(torch.equal(o, outs[0]) for o in outs):
            return f"matmul {k}x{n} {dtype}: a row differs between batch sizes {sizes}"
        want = F.linear(row[None].float(), w.float(), b.float())[0]
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        if not torch.allclose(outs[0].float(), want, rtol=tol, atol=tol):
            return f"matmul {k}x{n} {dtype}: max error {(outs[0].float() - want).abs().max().item()}"
    return ""


def check_lse(device: str, vocab: int, sizes) -> str:
    from treadle.gpu_worker.layers.triton_batch_invariant import row_logsumexp

    g = torch.Generator().manual_seed(vocab)
    row = (torch.randn(vocab, generator=g) * 4).to(device)
    outs = []
    for m in sizes:
        x = (torch.randn(m, vocab, generator=g) * 4).to(device)
        x[m // 2] = row
        outs.append(row_logsumexp(x)[m // 2])
    if not all(torch.equal(o, outs[0]) for o in outs):
        return "logsumexp: a row differs between batch sizes"
    if not torch.allclose(outs[0], row.logsumexp(0), rtol=1e-5, atol=1e-5):
        return "logsumexp: far from torch's"
    return ""


class _Cache:
    def __init__(self, tokens: int, hkv: int, d: int, device: str, dtype: torch.dtype, g: torch.Generator):
        self.kb = torch.randn(tokens, hkv, d, generator=g).to(device, dtype)
        self.vb = torch.randn(tokens, hkv, d, generator=g).to(device, dtype)

    def k(self, layer: int) -> torch.Tensor:
        return self.kb

    def v(self, layer: int) -> torch.Tensor:
        return self.vb


def _attend(backend, cache, r2t, rows, qs, window=None) -> list[torch.Tensor]:
    from treadle.gpu_worker.forward_context import ForwardContext

    q = torch.cat([qs[s][a:a + n] for s, a, n in rows])
    z = torch.zeros(0)
    ctx = ForwardContext(input_ids=torch.zeros(q.shape[0], dtype=torch.int64), positions=z, out_cache_loc=z,
                         slots=[r[0] for r in rows], starts=[r[1] for r in rows], extend_lens=[r[2] for r in rows],
                         logits_indices=z, req_to_token=r2t, kv_cache=cache, attn_backend=backend)
    ctx.attn_meta = backend.init_forward(ctx)
    layer = SimpleNamespace(layer_id=0, scaling=0.125, sliding_window=window, logit_cap=None)
    return list(backend.attend(q, layer, ctx).split([r[2] for r in rows]))


def check_attention(device: str, dtype: torch.dtype, h: int, hkv: int, d: int, length: int, trials: int,
                    window: int | None = None) -> str:
    """One request's ``length`` positions whole, then in random chunks (one trial: one token at a
    time, i.e. decode rows) beside random other rows: every query's output equal to the whole run's.
    ``window``: a sliding-window layer (for every row), whose result must differ from the full one's."""
    from treadle.gpu_worker.attention.torch_native import TorchNativeBackend
    from treadle.gpu_worker.attention.triton_deterministic import TritonDeterministicBackend

    g = torch.Generator().manual_seed(5)
    slots, ctx_len = 6, length + 64
    cache = _Cache(slots * ctx_len, hkv, d, device, dtype, g)
    r2t = torch.randperm(slots * ctx_len, generator=g).view(slots, ctx_len).to(device)
    qs = [torch.randn(ctx_len, h, d, generator=g).to(device, dtype) for _ in range(slots)]
    det = TritonDeterministicBackend(device=device, dtype=dtype)
    whole = _attend(det, cache, r2t, [(0, 0, length)], qs, window)[0]
    ref = _attend(TorchNativeBackend(), cache, r2t, [(0, 0, length)], qs, window)[0]
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    if not torch.allclose(whole.float(), ref.float(), rtol=tol, atol=tol):
        return f"attention {dtype} window {window}: far from SDPA ({(whole.float() - ref.float()).abs().max().item()})"
    if window is not None and torch.allclose(whole, _attend(det, cache, r2t, [(0, 0, length)], qs)[0]):
        return f"attention window {window}: the same as without the window"
    rng = random.Random(6)
    for trial in range(trials):
        cuts = sorted(rng.sample(range(1, length), length - 1 if trial == 0 else 4))
        parts, prev = [], 0
        for c in cuts + [length]:
            rows = [(s, rng.randrange(0, 40), rng.randrange(1, 30)) for s in range(1, 1 + rng.randrange(0, 5))]
            mine = (0, prev, c - prev)
            rows.insert(rng.randrange(len(rows) + 1), mine)
            parts.append(_attend(det, cache, r2t, rows, qs, window)[rows.index(mine)])
            prev = c
        if not torch.equal(torch.cat(parts), whole):
            return f"attention {dtype} window {window}: trial {trial} differs from the whole prompt's"
    return ""


def run_all(device: str) -> list[str]:
    if device == "cpu":  # the interpreter: small shapes
        return [check_matmul("cpu", torch.float32, [(72, 150)], [1, 3, 65]), check_lse("cpu", 3000, [1, 4]),
                check_attention("cpu", torch.float32, 4, 2, 32, 40, 2),
                check_attention("cpu", torch.float32, 4, 2, 32, 40, 2, window=7)]  # key block 0 wholly left behind
    shapes, sizes = [(576, 960), (4096, 14336 * 2), (14336, 4096), (4096, 128256)], [1, 2, 7, 64, 65, 300]
    out = []
    for dtype in (torch.bfloat16, torch.float32):
        out.append(check_matmul(device, dtype, shapes[:3] if dtype == torch.float32 else shapes, sizes))
        out.append(check_attention(device, dtype, 32, 8, 128, 700, 4))
        out.append(check_attention(device, dtype, 32, 8, 128, 700, 2, window=200))
    out.append(check_lse(device, 128256, [1, 3, 64]))
    return out


@pytest.mark.skipif(not interpreter_runs_loops(), reason="triton's interpreter cannot run loops with this numpy")
def test_kernels_in_interpreter() -> None:
    assert interpret_script(__file__) == ["", "", "", ""]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_kernels_on_cuda() -> None:
    assert [p for p in run_all("cuda") if p] == []


if __name__ == "__main__":
    print(json.dumps(run_all("cpu")))
