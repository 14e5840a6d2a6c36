"""Compile every tile the int4 sweep tries for an H100 (sm_90a) on a machine without a GPU.

    PYTHONPATH=$PWD python bench/kernels/int4_compile_check.py [fma|dot|deq]

Triton's compiler and the ``ptxas`` bundled with its wheel run on the CPU, so what only a GPU
compile would reveal (a kernel Triton's compiler refuses though the interpreter runs it, register
spills, activations' loads that lose their vector width or go through shared memory) shows
before a GPU is lent. Per kernel of ``int4_sweep.candidates`` (and the dtype / group variants
the tests reach): registers and spilled bytes (``ptxas -v``), global loads, 8- and 16-byte loads
in the PTX, static shared memory, and which MMA the tensor-core kernels use. A failure prints
``FAIL`` and the compiler's last line.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from int4_sweep import M_BUCKETS, binary, candidates
from treadle.gpu_worker.layers import triton_int4, triton_int4_gemv

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)
PTRS = ["x_ptr", "w_ptr", "s_ptr", "z_ptr", "out_ptr", "ws_ptr", "cnt_ptr"]


def build(fn, types: dict, consts: dict, div16: list, warps: int, stages: int = 1, pdl: bool = False) -> dict:
    """Compile ``fn`` for sm_90a (arguments in ``types`` typed, ``div16`` known multiples of 16,
    the rest ``consts``) and describe the code."""
    sig = {n: types.get(n, "constexpr") for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in div16}
    opts = {"num_warps": warps, "num_stages": stages, **({"launch_pdl": True} if pdl else {})}
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs), target=TARGET, options=opts)
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    ptxas = os.path.join(BIN, "ptxas-blackwell" if os.path.exists(os.path.join(BIN, "ptxas-blackwell")) else "ptxas")
    info = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                          capture_output=True, text=True).stderr
    os.unlink(f.name)
    regs, spill = re.search(r"Used (\d+) registers", info), re.search(r"(\d+) bytes spill stores", info)
    loads = re.findall(r"ld\.global[^\n]*", ptx)
    return {"regs": regs and int(regs.group(1)), "spill": spill and int(spill.group(1)), "loads": len(loads),
            "16B": sum(".v4." in ld for ld in loads), "8B": sum(".v2.b32" in ld for ld in loads),
            "smem": k.metadata.shared, "mma": "wgmma" if "wgmma" in ptx else "mma.sync" if "mma.sync" in ptx else ""}


def fma(rows: int, bn: int, bk: int, warps: int, group: int = 128, zeros: bool = True, dt: str = "bf16") -> dict:
    sub, gt, per_elem = triton_int4_gemv.group_steps(group, 4096, bk)
    types = dict(x_ptr=f"*{dt}", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr=f"*{dt}", ws_ptr="*fp32",
                 cnt_ptr="*i32", **{a: "i32" for a in ("M", "N", "KW", "KG", "stride_xm", "stride_om", "KW_SPLIT",
                                                        "split")})
    consts = dict(G=group, HAS_ZERO=zeros, PER_ELEM=per_elem, EVEN_K=True, BLOCK_M=rows, BLOCK_N=bn,
                  BLOCK_KW=bk // 8, GT=gt, SUB=sub, PDL=True)
    return build(triton_int4_gemv._fma_kernel, types, consts,
                 PTRS + ["N", "KW", "KG", "stride_xm", "stride_om", "KW_SPLIT"], warps, 1, pdl=True)


def dot(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool, pdl: bool, per_elem: bool = False,
        dt: str = "bf16") -> dict:
    code, off, unit = {"fp32": (0, 1.0, 0.0625), "bf16": (1, 128.0, 1.0), "fp16": (2, 1024.0, 1.0)}[dt]
    types = dict(x_ptr=f"*{dt}", w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr=f"*{dt}", ws_ptr="*fp32",
                 cnt_ptr="*i32", **{a: "i32" for a in ("M", "N", "K", "KW", "KG", "stride_xm", "stride_om", "K_SPLIT",
                                                        "split")})
    consts = dict(G=48 if per_elem else 128, HAS_ZERO=True, PER_ELEM=per_elem, DT=code, OFF=off, UNIT=unit,
                  BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SWAP=swap,
                  PRECISION="ieee" if dt == "fp32" else "tf32", PDL=pdl)
    div16 = PTRS + ["N", "K", "KW", "KG", "stride_xm", "stride_om", "K_SPLIT"]
    return build(triton_int4._dot_kernel, types, consts, div16, warps, stages, pdl=pdl)


def deq() -> dict:
    types = dict(w_ptr="*i32", s_ptr="*fp16", z_ptr="*u8", out_ptr="*bf16", K="i32", KW="i32", KG="i32", n0="i32",
                 n_rows="i32")
    return build(triton_int4._dequant_kernel, types, dict(G=128, HAS_ZERO=True, BLOCK_N=32, BLOCK_KW=16),
                 ["w_ptr", "s_ptr", "z_ptr", "out_ptr", "K", "KW", "KG"], 4)


def jobs() -> list[tuple]:
    """Every distinct kernel of the sweep, then the variants only tests reach."""
    seen, out = set(), [("deq", (), {})]
    for m in M_BUCKETS:
        for t in candidates(m):
            key = binary(t, m)
            if key in seen or t.kind == "deq":
                continue
            seen.add(key)
            if t.kind == "fma":
                out.append(("fma", (key[1], t.block_n, t.block_k, t.warps), {}))
            else:
                swap = t.kind == "dot_wx"
                out.append(("dot", (t.block_m, t.block_n, t.block_k, t.warps, t.stages, swap, m <= 16), {}))
    return out + [("fma", (1, 32, 256, 4), dict(zeros=False)), ("fma", (2, 16, 256, 4), dict(group=48)),
                  ("fma", (1, 32, 256, 4), dict(group=32)), ("fma", (4, 32, 128, 4), dict(dt="fp16")),
                  ("fma", (1, 32, 256, 4), dict(dt="fp32")),
                  ("dot", (16, 64, 128, 4, 4, False, True), dict(per_elem=True)),
                  ("dot", (16, 64, 128, 4, 4, True, True), dict(per_elem=True)),
                  ("dot", (16, 64, 128, 4, 4, True, True), dict(dt="fp16")),
                  ("dot", (16, 64, 64, 4, 3, True, False), dict(dt="fp32"))]


def main() -> None:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    failed = 0
    for kind, args, kw in jobs():
        if only and kind != only:
            continue
        try:
            print(kind, args, kw or "", {"fma": fma, "dot": dot, "deq": deq}[kind](*args, **kw), flush=True)
        except Exception as e:  # the compiler's message, not a traceback: the next kernel still compiles
            failed += 1
            print("FAIL", kind, args, kw or "", type(e).__name__, str(e).strip().splitlines()[-1][:300], flush=True)
    print(f"{failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
