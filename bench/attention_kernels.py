"""Throwaway benchmark of the triton attention kernels (not part of the repo)."""
import sys, torch, triton
from triton.testing import do_bench, do_bench_cudagraph
import torch.nn.functional as F
from treadle.gpu_worker.attention import triton_decode as td, triton_extend as te
from treadle.gpu_worker.attention.triton_backend import TritonBackend
sys.path.insert(0, '.tbench'); import ext_variant

dev, dt = "cuda", torch.bfloat16
H, HKV, D = 32, 8, 128
be = TritonBackend(device=dev, dtype=dt)
print(torch.cuda.get_device_name(), "sms", be.num_sms, "triton", triton.__version__, "torch", torch.__version__)

def decode_bench(bs, ctx):
    n = bs * ctx
    kb = torch.randn(n + 10, HKV, D, device=dev, dtype=dt); vb = torch.randn_like(kb)
    r2t = torch.randperm(n + 10, device=dev)[:n].view(bs, ctx).contiguous()
    q = torch.randn(bs, H, D, device=dev, dtype=dt); out = torch.empty_like(q)
    qi = torch.arange(bs, device=dev, dtype=torch.int32); sl = qi.clone(); lens = torch.full((bs,), ctx, device=dev, dtype=torch.int32)
    splits = be._num_splits(bs, HKV, ctx)
    f = lambda: td.decode_attention(q, kb, vb, out, r2t, qi, sl, lens, D ** -0.5, splits)
    torch.cuda.synchronize(); ms = do_bench_cudagraph(f)
    kk = kb[r2t].transpose(1, 2); vv = vb[r2t].transpose(1, 2)  # contiguous-ish reference
    kk, vv = kk.contiguous(), vv.contiguous()
    g = lambda: F.scaled_dot_product_attention(q[:, :, None], kk, vv, enable_gqa=True)
    torch.cuda.synchronize(); ms_ref = do_bench_cudagraph(g)
    gb = 2 * n * HKV * D * 2 / 1e9
    print(f"decode bs={bs:4d} ctx={ctx:6d} splits={splits:2d}: triton {ms*1e3:7.1f} us ({gb/ms*1e3:6.0f} GB/s)  sdpa(contig) {ms_ref*1e3:7.1f} us")

def extend_bench(rows, block_m=None, warps=None, stages=2, bn=64, mod=te):
    tot = sum(s + n for s, n in rows); T = sum(n for _, n in rows)
    kb = torch.randn(tot, HKV, D, device=dev, dtype=dt); vb = torch.randn_like(kb)
    perm = torch.randperm(tot, device=dev)
    r2t = torch.zeros(len(rows), max(s + n for s, n in rows), dtype=torch.int64, device=dev)
    off = 0; hr = [[], [], [], []]; qo = 0
    for i, (s, n) in enumerate(rows):
        r2t[i, : s + n] = perm[off: off + s + n]; off += s + n
        for l, x in zip(hr, (qo, s, n, i)): l.append(x)
        qo += n
    bm = block_m or te.extend_block_m(max(hr[2]), dt, True)
    it = [[], []]
    for r, n in enumerate(hr[2]):
        for mb in range(triton.cdiv(n, bm)): it[0].append(r); it[1].append(mb)
    rows_t = torch.tensor(sum(hr, []), dtype=torch.int32, device=dev).view(4, -1)
    items_t = torch.tensor(sum(it, []), dtype=torch.int32, device=dev).view(2, -1)
    q = torch.randn(T, H, D, device=dev, dtype=dt); out = torch.empty_like(q)
    def f():
        mod._extend_kernel[(items_t.shape[1], H)](q, kb, vb, out, r2t, rows_t, items_t, D ** -0.5, rows_t.shape[1], items_t.shape[1],
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1), r2t.stride(0),
            G=H // HKV, D=D, BLOCK_D=D, BLOCK_M=bm, BLOCK_N=bn if block_m else 64, PREC="tf32", num_warps=warps or 4, num_stages=stages if block_m else 3)
    torch.cuda.synchronize(); ms = do_bench(f)
    flops = sum(4 * n * (s + (n + 1) / 2) * H * D for s, n in rows)
    ref = ""
    if len(rows) == 1 and rows[0][0] == 0:
        qq = q.transpose(0, 1)[None]; kk = kb[:T].transpose(0, 1)[None]; vv = vb[:T].transpose(0, 1)[None]
        ms_ref = do_bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, is_causal=True, enable_gqa=True))
        ref = f" sdpa(contig causal) {ms_ref*1e3:7.1f} us ({flops/ms_ref/1e9:5.0f} TF/s)"
    print(f"extend rows={rows[:3]}{'...' if len(rows) > 3 else ''} bm={bm} bn={bn} w={warps} st={stages} {mod.__name__[-7:]}: {ms*1e3:8.1f} us ({flops/ms/1e9:5.0f} TF/s){ref}")

def decode_tune(bs, ctx, bn, w, st):
    n = bs * ctx
    kb = torch.randn(n + 10, HKV, D, device=dev, dtype=dt); vb = torch.randn_like(kb)
    r2t = torch.randperm(n + 10, device=dev)[:n].view(bs, ctx).contiguous()
    if contig: r2t = torch.arange(n, device=dev).view(bs, ctx).contiguous()
    q = torch.randn(bs, H, D, device=dev, dtype=dt); out = torch.empty_like(q)
    qi = torch.arange(bs, device=dev, dtype=torch.int32); sl = qi.clone(); lens = torch.full((bs,), ctx, device=dev, dtype=torch.int32)
    S = be._num_splits(bs, HKV, ctx)
    mid_o = torch.empty(bs, H, S, D, dtype=torch.float32, device=dev); mid_lse = torch.empty(bs, H, S, dtype=torch.float32, device=dev)
    f = lambda: td._decode_stage1[(bs, HKV, S)](q, kb, vb, r2t, qi, sl, lens, mid_o, mid_lse, 0.1,
        q.stride(0), q.stride(1), kb.stride(0), kb.stride(1), vb.stride(0), vb.stride(1), r2t.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), mid_lse.stride(0), mid_lse.stride(1),
        G=H // HKV, D=D, BLOCK_H=16, BLOCK_D=D, BLOCK_N=bn, NUM_SPLITS=S, PREC="tf32", num_warps=w, num_stages=st)
    torch.cuda.synchronize(); ms = do_bench_cudagraph(f)
    gb = 2 * n * HKV * D * 2 / 1e9
    print(f"  stage1 bs={bs:4d} ctx={ctx:6d} S={S:2d} bn={bn:3d} w={w} st={st} contig={contig}: {ms*1e3:7.1f} us ({gb/ms*1e3:6.0f} GB/s)")

contig = False
for rows in [[(1000, 8)] * 32, [(1000, 32)] * 8, [(0, 8192)], [(0, 4096)], [(0, 16384)], [(4096, 512)], [(0, 512)] * 8, [(1000, 8)] * 32]:
    extend_bench(rows)
for bs, ctx in [(1, 1024), (1, 8192), (1, 32768), (8, 4096), (64, 2048), (256, 1024)]:
    decode_bench(bs, ctx)
