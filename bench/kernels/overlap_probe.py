"""Does a decode step overlap with a prefill chunk when the two run on separate CUDA streams?

    python bench/kernels/overlap_probe.py [--rows 150] [--chunks 512,1024,2048,4096,8192] [--decode-sms 16,32]

Issue 28's throughput idea: prefill is compute-bound and decode (its attention above all) memory-
bound, so running them at the same time could hide one behind the other. Before building that into
the model runner, this measures whether the card does it at all with the engine's own kernels, at
Llama-3.1-8B's shape: a *decode step* (per layer the four projections of ``--rows`` rows and the
Triton decode attention over rows whose lengths are drawn as the SGLang CI workload makes them) and
a *prefill chunk* (per layer the four projections of ``chunk`` tokens; the chunk's own attention is
left out, which favours overlap a little less than the real step would) over 32 layers. Each pair
is timed alone, one after the other on one stream, and on two streams (decode on a high-priority
stream, optionally replayed from a CUDA graph). ``saved`` is the share of the shorter part hidden:
``(decode + prefill - together) / min(decode, prefill)``. One JSON line per chunk size.
``--decode-sms N,...`` also times the graph replayed on the stream of a CUDA green context of N SMs
beside the prefill on an ordinary stream (``green_N_ms``; what ``pdmux_decode_sms=N`` does in the
engine, gpu_worker/pdmux.py); needs torch >= 2.9 built with green contexts.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from decode_attn_bench import time_ms

from treadle.gpu_worker.attention.triton_backend import TritonBackend
from treadle.gpu_worker.attention.triton_decode import decode_attention

HIDDEN, INTER, H, HKV, D, LAYERS = 4096, 14336, 32, 8, 128, 32
KV_BUFFERS = 4  # distinct layers' K/V pools, cycled: each far larger than L2


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=150)
    p.add_argument("--chunks", default="512,1024,2048,4096,8192")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-sms", default="32,48,64", help="comma-separated SM counts for the decode green context")
    a = p.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rnd = random.Random(a.seed)
    lens = [rnd.randint(1, 4096) + rnd.randint(0, rnd.randint(1, 2048) - 1) + 1 for _ in range(a.rows)]
    total, max_len = sum(lens), max(lens)

    def weight(n: int, k: int) -> torch.Tensor:
        return torch.randn(n, k, device=dev, dtype=dt) * 0.02

    w_qkv, w_o = weight((H + 2 * HKV) * D, HIDDEN), weight(HIDDEN, HIDDEN)
    w_gate_up, w_down = weight(2 * INTER, HIDDEN), weight(HIDDEN, INTER)
    kv = [(torch.randn(total, HKV, D, device=dev, dtype=dt), torch.randn(total, HKV, D, device=dev, dtype=dt))
          for _ in range(KV_BUFFERS)]
    req_to_token = torch.zeros(a.rows, max_len, dtype=torch.int64, device=dev)
    perm, off = torch.arange(total, device=dev), 0  # each row's positions contiguous
    for r, n in enumerate(lens):
        req_to_token[r, :n] = perm[off:off + n]
        off += n
    q_idx = torch.arange(a.rows, device=dev, dtype=torch.int32)
    seq_lens = torch.tensor(lens, device=dev, dtype=torch.int32)
    x_dec = torch.randn(a.rows, HIDDEN, device=dev, dtype=dt)
    q = torch.randn(a.rows, H, D, device=dev, dtype=dt)
    out = torch.empty_like(q)
    splits, min_chunk = TritonBackend(dev, dt)._num_splits(a.rows, HKV, max_len)  # the engine's launch

    def layer_gemms(x: torch.Tensor) -> None:
        torch.matmul(x, w_qkv.t())
        torch.matmul(x, w_o.t())
        gu = torch.matmul(x, w_gate_up.t())
        torch.matmul(gu[:, :INTER], w_down.t())

    def decode_step() -> None:
        for layer in range(LAYERS):
            k_buf, v_buf = kv[layer % KV_BUFFERS]
            layer_gemms(x_dec)
            decode_attention(q, k_buf, v_buf, out, req_to_token, q_idx, q_idx, seq_lens, D ** -0.5, splits, min_chunk)

    kv_bytes = 2 * total * HKV * D * 2 * LAYERS
    hi = torch.cuda.Stream(priority=-1)  # higher priority: lower number
    lo = torch.cuda.Stream(priority=0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(hi):
        decode_step()
        hi.synchronize()
        with torch.cuda.graph(graph, stream=hi):
            decode_step()
    torch.cuda.synchronize()
    t_dec = time_ms(decode_step, iters=5)
    t_dec_graph = time_ms(graph.replay, iters=5)
    print(json.dumps({"rows": a.rows, "kv_tokens": total, "decode_ms": round(t_dec, 2),
                      "decode_graph_ms": round(t_dec_graph, 2),
                      "kv_TBps": round(kv_bytes / t_dec_graph / 1e9, 2)}), flush=True)
    green_streams, green_ctxs = {}, []  # SMs of a green context for the decode step -> its stream; the contexts
    try:  # torch >= 2.9 built with green contexts; a probe reports their absence and goes on
        from torch.cuda.green_contexts import GreenContext

        for n in (int(x) for x in a.decode_sms.split(",") if x):
            green_ctxs.append(GreenContext.create(num_sms=n, device_id=torch.cuda.current_device()))
            green_streams[n] = green_ctxs[-1].Stream()
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"green_contexts": repr(e)[:200]}), flush=True)
        green_streams = {}
    for chunk in (int(c) for c in a.chunks.split(",")):
        x_pre = torch.randn(chunk, HIDDEN, device=dev, dtype=dt)

        def prefill() -> None:
            for _ in range(LAYERS):
                layer_gemms(x_pre)

        def serial() -> None:
            graph.replay()
            prefill()

        def together(use_graph: bool) -> None:
            main = torch.cuda.current_stream()
            hi.wait_stream(main)
            lo.wait_stream(main)
            with torch.cuda.stream(hi):
                graph.replay() if use_graph else decode_step()
            with torch.cuda.stream(lo):
                prefill()
            main.wait_stream(hi)
            main.wait_stream(lo)

        def green(stream: torch.cuda.Stream) -> None:
            main = torch.cuda.current_stream()
            stream.wait_stream(main)
            lo.wait_stream(main)
            with torch.cuda.stream(stream):
                graph.replay()
            with torch.cuda.stream(lo):
                prefill()
            main.wait_stream(stream)
            main.wait_stream(lo)

        t_pre = time_ms(prefill, iters=5)
        greens = {f"green_{n}_ms": round(time_ms(lambda: green(st), iters=5), 2) for n, st in green_streams.items()}
        t_serial = time_ms(serial, iters=5)
        t_graph = time_ms(lambda: together(True), iters=5)
        t_eager = time_ms(lambda: together(False), iters=5)
        best = min(t_graph, t_eager)
        print(json.dumps({"chunk": chunk, "prefill_ms": round(t_pre, 2), "decode_ms": round(t_dec_graph, 2),
                          "serial_ms": round(t_serial, 2), "two_streams_graph_ms": round(t_graph, 2),
                          "two_streams_eager_ms": round(t_eager, 2),
                          **greens, "saved": round((t_dec_graph + t_pre - best) / min(t_dec_graph, t_pre), 3),
                          "prefill_TFLOPs": round(2 * chunk * LAYERS * HIDDEN * ((H + 2 * HKV) * D + HIDDEN
                                                  + 3 * INTER) / t_pre / 1e9, 1)}), flush=True)


if __name__ == "__main__":
    main()
