"""The fused all-reduce + residual + RMSNorm kernel (``layers/allreduce_norm.py``).

On the CPU it runs in Triton's interpreter (a child process, as in ``test_fused_ops.py``) as
rank 0 of 2 with the peer simulated: rank 1 has already pushed its partial rows into rank 0's
buffer and set its ready flags, so rank 0's program finds them, and the test checks what rank 0
computed and what it left for rank 1 (its rows in its region of rank 1's buffer, in the right
slot; its flags in rank 1's array; its call counts). Rows start at different call counts (one at
the wrap of the 16-bit count, one whose peer flag is already a call further), so both slots are used. The two-GPU test
runs the real thing through the model's norm against NCCL + the unfused norm, in and out of a
CUDA graph.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import interpret_script, run_two_ranks
from treadle.gpu_worker.layers.norm import RMSNorm

N, ROWS, MAX_ROWS = 64, 3, 8
SLOT = MAX_ROWS * N


def simulate_rank0() -> dict:
    from treadle.gpu_worker.layers.allreduce_norm import allreduce_rms_norm

    g = torch.Generator().manual_seed(0)
    x0, x1, res = (torch.randn(ROWS, N, generator=g) for _ in range(3))
    norm = RMSNorm(N, eps=1e-5)
    norm.weight.data = torch.rand(N, generator=g) + 0.5
    bufs = [torch.zeros(2 * 2 * SLOT), torch.zeros(2 * 2 * SLOT)]  # [slot, source rank, rows * N]
    region = lambda c, src, row: ((c % 2) * 2 + src) * SLOT + row * N  # noqa: E731
    flags = [torch.zeros(2 * MAX_ROWS, dtype=torch.int32), torch.zeros(2 * MAX_ROWS, dtype=torch.int32)]
    counters = torch.tensor([4, 0xFFFF, 0] + [0] * (MAX_ROWS - ROWS), dtype=torch.int32)
    for row in range(ROWS):  # rank 1 is one step ahead: its rows are stored and flagged
        c = (int(counters[row]) + 1) & 0xFFFF  # row 1 wraps to 0
        bufs[0][region(c, 1, row):][:N] = x1[row]
        flags[0][1 * MAX_ROWS + row] = (c + 1) & 0xFFFF if row == 2 else c  # row 2: rank 1 already a call further
    ptrs = lambda ts: torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64)  # noqa: E731
    out, res_out = allreduce_rms_norm(x0, res, norm.weight.data, norm.eps, ptrs(bufs), ptrs(flags), counters,
                                      SLOT, rank=0, world=2)
    ref_out, ref_res = norm.forward_torch(x0 + x1, res)
    own_rows_ok = all(torch.equal(bufs[1][region(int(counters[r]), 0, r):][:N], x0[r]) for r in range(ROWS))
    return {
        "out_err": (out - ref_out).abs().max().item(),
        "res_err": (res_out - ref_res).abs().max().item(),
        "counters": counters[:ROWS].tolist(),
        "flags_for_rank1": flags[1][:ROWS].tolist(),
        "own_rows_in_slot": own_rows_ok,
    }


def _words(x: torch.Tensor, c: int) -> torch.Tensor:
    """float32 values as tagged 64-bit words: the bits low, the call count high."""
    return x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF | (c << 32)


def simulate_gemv_push_and_pull() -> dict:
    """Batch 1 with the row pushed by the GEMV, rank 0 of 2: its GEMV stores its outputs as words
    of the next call into rank 1's buffer; its norm finds rank 1's words (and stale ones of the
    call before in the other slot) in its own. The word count starts at the wrap of 2**16."""
    from treadle.gpu_worker.fused_reduce import PushTarget
    from treadle.gpu_worker.layers.allreduce_norm import pulled_rms_norm
    from treadle.gpu_worker.layers.triton_gemv import GemvConfig, gemv

    g = torch.Generator().manual_seed(1)
    k, n, slot = 96, 40, 48
    x, w = torch.randn(1, k, generator=g), torch.randn(n, k, generator=g)
    x1, res = torch.randn(1, n, generator=g), torch.randn(1, n, generator=g)
    norm = RMSNorm(n, eps=1e-5)
    norm.weight.data = torch.rand(n, generator=g) + 0.5
    bufs = [torch.zeros(2 * 2 * slot, dtype=torch.int64), torch.zeros(2 * 2 * slot, dtype=torch.int64)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    count = torch.tensor([0xFFFF], dtype=torch.int32)  # the next call is 0
    y = gemv(x, w, GemvConfig(4, 32, 4, False), push=PushTarget(ptrs, count, slot, 0, 2))
    pushed_ok = torch.equal(bufs[1][:n], _words(y[0], 0)) and int(count) == 0xFFFF  # slot 0, region of rank 0
    bufs[0][slot:][:n] = _words(x1[0], 0)  # rank 1's row of call 0: slot 0, region of rank 1
    bufs[0][3 * slot:][:n] = _words(torch.randn(n, generator=g), 0xFFFF)  # its call before, slot 1
    out, res_out = pulled_rms_norm(y, res, norm.weight.data, norm.eps, ptrs, count, slot, 0, 2)
    ref_out, ref_res = norm.forward_torch(y + x1, res)
    return {"gemv_err": (y - x @ w.T).abs().max().item(), "pushed_ok": pushed_ok, "count": int(count),
            "out_err": (out - ref_out).abs().max().item(), "res_err": (res_out - ref_res).abs().max().item()}


def simulate_embedding_and_logits() -> dict:
    """Batch 1's other two trips, rank 0 of 2 (vocab 9, shards of 5): the embedding's kernel pushes
    its row (zeros for a token of rank 1's) and the all-reduce pulls rank 1's words; the LM head's
    GEMV pushes its logits shard into rank 1's gather buffer and ``gathered_logits`` writes the
    whole float32 row from its own shard and rank 1's words (padding column cut off)."""
    from treadle.gpu_worker.fused_reduce import PushTarget
    from treadle.gpu_worker.layers.allreduce_norm import gathered_logits, pulled_sum
    from treadle.gpu_worker.layers.embedding import shard_embedding
    from treadle.gpu_worker.layers.triton_gemv import GemvConfig, gemv

    g = torch.Generator().manual_seed(2)
    vocab, shard, hidden, slot = 9, 5, 24, 32
    table = torch.randn(2 * shard, hidden, generator=g)
    table[vocab:] = 0
    bufs = [torch.zeros(2 * 2 * slot, dtype=torch.int64), torch.zeros(2 * 2 * slot, dtype=torch.int64)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    count = torch.tensor([6], dtype=torch.int32)
    result = {}
    for tok in (3, 7):  # rank 0's token, then rank 1's
        c = int(count) + 1
        y = shard_embedding(torch.tensor([tok]), table[:shard], 0, shard, PushTarget(ptrs, count, slot, 0, 2))
        pushed = torch.equal(bufs[1][(c % 2) * 2 * slot:][:hidden], _words(y[0], c))
        other = table[tok] if tok >= shard else torch.zeros(hidden)  # rank 1's part
        bufs[0][((c % 2) * 2 + 1) * slot:][:hidden] = _words(other, c)
        got = pulled_sum(y, ptrs, count, slot, 0, 2)
        result[f"embedding_{tok}"] = pushed and torch.equal(got[0], table[tok]) and int(count) == c

    head = torch.randn(2 * shard, hidden, generator=g)
    x = torch.randn(1, hidden, generator=g)
    gbufs = [torch.zeros(2 * 2 * slot, dtype=torch.int64), torch.zeros(2 * 2 * slot, dtype=torch.int64)]
    gptrs = torch.tensor([b.data_ptr() for b in gbufs], dtype=torch.int64)
    gcount = torch.tensor([0xFFFF, 0], dtype=torch.int32)  # the next call is 0; no program finished
    y = gemv(x, head[:shard], GemvConfig(4, 8, 4, False), push=PushTarget(gptrs, gcount[:1], slot, 0, 2))
    pushed = torch.equal(gbufs[1][:shard], _words(y[0], 0))
    gbufs[0][slot:][:shard] = _words(x[0] @ head[shard:].T, 0)  # rank 1's shard of call 0
    gbufs[0][3 * slot:][:shard] = _words(torch.randn(shard, generator=g), 0xFFFF)  # stale, the other slot
    logits = gathered_logits(y, vocab, gptrs, gcount[:1], gcount[1:], slot, 0, 2)
    result["logits_err"] = (logits[0] - (x[0] @ head.T)[:vocab]).abs().max().item()
    result["logits_ok"] = pushed and logits.shape == (1, vocab) and logits.dtype == torch.float32
    result["gather_count"] = gcount.tolist()
    return result


@pytest.fixture(scope="module")
def interpreted() -> dict:
    return interpret_script(__file__)


def test_interpreted_embedding_and_logits(interpreted):
    got = interpreted["embedding_and_logits"]
    assert got["embedding_3"] and got["embedding_7"]
    assert got["logits_ok"] and got["logits_err"] < 1e-5
    assert got["gather_count"] == [0, 0]  # the count moved on to call 0, the finished-programs count reset


def test_interpreted_gemv_push_and_pull(interpreted):
    got = interpreted["push"]
    assert got["gemv_err"] < 1e-4 and got["pushed_ok"]
    assert got["out_err"] < 1e-5 and got["res_err"] < 1e-6 and got["count"] == 0


def test_interpreted_rank0_of_2(interpreted):
    interpreted = interpreted["rank0"]
    assert interpreted["out_err"] < 1e-5 and interpreted["res_err"] < 1e-6
    assert interpreted["counters"] == [5, 0, 1]  # each row counted one call on, modulo 2**16
    assert interpreted["flags_for_rank1"] == [5, 0, 1]  # and told rank 1 so
    assert interpreted["own_rows_in_slot"]


def test_fused_state_follows_the_rank_and_world_it_is_given(monkeypatch):
    """``fused_reduce.FusedNormState`` built on the CPU over a stand-in for symmetric memory: each
    buffer sized by the world it is given, each rank's address of it at the same offset from that
    rank's base; the push targets carry the rank and world, and a push waits for its pull."""
    from types import SimpleNamespace

    from treadle.gpu_worker import fused_reduce as fr

    bases = [1 << 30, None, 3 << 30, 5 << 30]  # rank 1's base: 64 bytes below each buffer

    class Symm:
        def empty(self, numel, dtype, device):
            return torch.empty(numel, dtype=dtype, device=device)

        def rendezvous(self, t, group_name):
            return SimpleNamespace(buffer_ptrs=[t.data_ptr() - 64 if b is None else b for b in bases])

    monkeypatch.delenv("TREADLE_DISABLE_GEMV_PUSH", raising=False)
    st = fr.FusedNormState(Symm(), "tp", torch.device("cpu"), torch.bfloat16, rank=1, world=4, slot_elems=100)
    assert st.buf.numel() == 2 * 4 * 100 and st.flags.numel() == 4 * fr.FUSED_MAX_ROWS
    assert st.words.numel() == 2 * 4 * fr.WORD_ROW_MAX and st.gather.numel() == 2 * 4 * fr.GATHER_WORDS_MAX
    assert st.buf_ptrs.tolist() == [(1 << 30) + 64, st.buf.data_ptr(), (3 << 30) + 64, (5 << 30) + 64]
    assert fr.state() is None and not fr.push_pending()
    fr.set_state(st)
    try:
        target = fr.gemv_push_target(4096, torch.bfloat16)
        assert (target.rank, target.world, target.slot_elems) == (1, 4, fr.WORD_ROW_MAX)
        assert fr.logits_push_target(1000, torch.bfloat16).slot_elems == fr.GATHER_WORDS_MAX
        assert fr.gemv_push_target(4096, torch.float16) is None  # another dtype than the buffers'
        y = torch.zeros(1, 8, dtype=torch.bfloat16)
        fr.note_pushed(y)
        assert fr.push_pending()
        with pytest.raises(RuntimeError, match="never reduced"):
            fr.note_pushed(y)
    finally:
        fr.set_state(None)


# ---------------------------------------------------------------- two GPUs
def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from treadle.gpu_worker import distributed as par, fused_reduce as fr

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dev = torch.device("cuda", rank)
    torch.cuda.set_device(dev)
    os.environ.pop("TREADLE_DISABLE_GEMV_PUSH", None)  # the batch-1 push buffers too (_gemv_push_checks)
    par.init_parallel(rank, 2, dev, dtype=torch.bfloat16, custom_all_reduce=True, allreduce_fusion=True)
    failures = [] if fr.state() is not None else ["fused state not set up"]
    norm = RMSNorm(4096, eps=1e-5).to(dev, torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(rank)
    norm.weight.data = (torch.rand(4096, generator=torch.Generator(device=dev).manual_seed(9), device=dev) + 0.5
                        ).to(torch.bfloat16)

    def reference(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x.clone()
        dist.all_reduce(y)
        return norm(y, res)

    # The last one falls back to all_reduce (in place) + norm: every call gets its own copies.
    for rows in (1, 7, 64, fr.FUSED_MAX_ROWS, fr.FUSED_MAX_ROWS + 1):
        for _ in range(3):  # the same rows again: both slots, counters moving on
            x = torch.randn(rows, 4096, generator=g, device=dev).to(torch.bfloat16)
            res = torch.randn(rows, 4096, generator=torch.Generator(device=dev).manual_seed(rows), device=dev
                              ).to(torch.bfloat16)
            got, want = norm(x.clone(), res.clone(), reduce=True), reference(x.clone(), res.clone())
            if not (torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])):
                failures.append(f"{rows} rows: differs from NCCL + norm")

    x_in = torch.zeros(8, 4096, dtype=torch.bfloat16, device=dev)
    r_in = torch.zeros(8, 4096, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        norm(x_in, r_in, reduce=True)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, r = x_in, r_in
        for _ in range(4):  # a chain, as the layers make one
            y, r = norm(y, r, reduce=True)
    for trial in range(3):
        x_in.copy_(torch.randn(8, 4096, generator=g, device=dev).to(torch.bfloat16))
        r_in.copy_(torch.randn(8, 4096, generator=torch.Generator(device=dev).manual_seed(trial), device=dev
                               ).to(torch.bfloat16))
        graph.replay()
        wy, wr = x_in, r_in
        for _ in range(4):
            wy, wr = reference(wy, wr)
        if not (torch.equal(y, wy) and torch.equal(r, wr)):
            failures.append(f"graph replay {trial}: differs from NCCL + norm")
    failures += _gemv_push_checks(par, fr, norm, reference, dev, g)
    failures += _embedding_and_head_checks(par, dev, g)
    torch.cuda.synchronize()
    if rank == 0:
        torch.save(failures, out)
    dist.destroy_process_group()


def _gemv_push_checks(par, fr, norm, reference, dev, g) -> list[str]:
    """Batch 1 with the GEMV pushing its row (the default path): the same bits as NCCL +
    the norm, eagerly (both slots, flag-protocol calls in between) and replayed in a CUDA graph."""
    from treadle.gpu_worker.layers.pdl import pdl_supported
    from treadle.gpu_worker.layers.triton_gemv import gemv, gemv_config

    if not fr.state().gemv_push:
        return ["the batch-1 GEMV push is not on by default"]
    failures = []
    w = (torch.randn(4096, 2048, generator=torch.Generator(device=dev).manual_seed(par.tp_rank() + 5), device=dev)
         / 40).to(torch.bfloat16)
    cfg = gemv_config(4096, 2048, pdl_supported(dev))

    def pushed(x: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = gemv(x, w, cfg, push=fr.gemv_push_target(4096, torch.bfloat16))
        fr.note_pushed(y)
        return y, *norm(y, res, reduce=True)

    for i in range(3):
        x = torch.randn(1, 2048, generator=g, device=dev).to(torch.bfloat16)
        res = torch.randn(1, 4096, generator=g, device=dev).to(torch.bfloat16)
        y, got_out, got_res = pushed(x, res)
        want = reference(y.clone(), res.clone())
        if not (torch.equal(got_out, want[0]) and torch.equal(got_res, want[1])):
            failures.append(f"GEMV push, eager call {i}: differs from NCCL + norm")
        norm(torch.randn(3, 4096, generator=g, device=dev).to(torch.bfloat16), res.expand(3, 4096).contiguous(),
             reduce=True)  # a flag-protocol call in between
    x_in = torch.zeros(1, 2048, dtype=torch.bfloat16, device=dev)
    r_in = torch.zeros(1, 4096, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        pushed(x_in, r_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y1, o1, r1 = pushed(x_in, r_in)
        y2, o2, r2 = pushed(o1[:, :2048], r1)
    for trial in range(3):
        x_in.copy_(torch.randn(1, 2048, generator=g, device=dev).to(torch.bfloat16))
        r_in.copy_(torch.randn(1, 4096, generator=g, device=dev).to(torch.bfloat16))
        graph.replay()
        w1 = reference(y1.clone(), r_in.clone())
        w2 = reference(y2.clone(), w1[1])
        if not all(torch.equal(a, b) for a, b in ((o1, w1[0]), (r1, w1[1]), (o2, w2[0]), (r2, w2[1]))):
            failures.append(f"GEMV push, graph replay {trial}: differs from NCCL + norm")
    return failures


def _embedding_and_head_checks(par, dev, g) -> list[str]:
    """The vocab-parallel embedding (one token: pushed and pulled; three: the all-reduce) against
    the whole table, and the LM head's one-token logits gathered as words against NCCL's
    all-gather of the same GEMV's shards; eagerly and replayed in a CUDA graph."""
    import torch.distributed as dist

    from treadle.gpu_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
    from treadle.gpu_worker.layers.pdl import pdl_supported
    from treadle.gpu_worker.layers.triton_gemv import gemv, gemv_config

    failures, vocab, hidden = [], 50001, 4096  # an odd vocab: rank 1's shard has a padding row
    table = torch.randn(vocab, hidden, generator=torch.Generator(device=dev).manual_seed(3), device=dev
                        ).to(torch.bfloat16)
    emb, head = VocabParallelEmbedding(vocab, hidden).to(dev), ParallelLMHead(vocab, hidden).to(dev)
    for m in (emb, head):
        m.weight.data = m.weight.data.to(torch.bfloat16)
        m.weight_loader(m.weight, table)
    head.gemv_config = gemv_config(*head.weight.shape, pdl_supported(dev))

    def want_logits(x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty(1, head.per_rank, dtype=torch.bfloat16, device=dev) for _ in range(2)]
        dist.all_gather(parts, gemv(x, head.weight, head.gemv_config))
        return torch.cat(parts, dim=-1)[:, :vocab].float()

    for i, ids in enumerate(([5], [vocab - 1], [3, 40000, 25000], [30000])):
        ids_t = torch.tensor(ids, device=dev)
        if not torch.equal(emb(ids_t), table[ids_t]):
            failures.append(f"embedding of {ids}: differs from the table")
        x = torch.randn(1, hidden, generator=g, device=dev).to(torch.bfloat16)
        if not torch.equal(head(x), want_logits(x)):
            failures.append(f"LM head call {i}: differs from NCCL's all-gather")
    ids_in = torch.zeros(1, dtype=torch.int64, device=dev)
    x_in = torch.zeros(1, hidden, dtype=torch.bfloat16, device=dev)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        emb(ids_in), head(x_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, logits = emb(ids_in), head(x_in)
        logits2 = head(y)  # two gathers in one replay
    for trial, tok in enumerate((7, 26000, vocab - 1)):
        ids_in.fill_(tok)
        x_in.copy_(torch.randn(1, hidden, generator=g, device=dev).to(torch.bfloat16))
        graph.replay()
        if not (torch.equal(y, table[tok:tok + 1]) and torch.equal(logits, want_logits(x_in))
                and torch.equal(logits2, want_logits(y))):
            failures.append(f"embedding + LM head, graph replay {trial}: differs")
    return failures


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpus_match_nccl_and_unfused_norm(tmp_path):
    assert run_two_ranks(_worker, tmp_path) == []


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (set before triton loads)"
    print(json.dumps({"rank0": simulate_rank0(), "push": simulate_gemv_push_and_pull(),
                      "embedding_and_logits": simulate_embedding_and_logits()}))
