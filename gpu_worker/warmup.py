"""Start-up warm-up: the worker runs the prefill shapes its kernels specialise on before the first
request, so that request does not pay for compiling and loading them.

Measured on an H100 (issue 28): the first 1,024-token prompt after start-up took 716 ms against
25 ms warm. Decode kernels are already warm (CUDA-graph capture runs each captured batch size);
a prefill is the first eager forward of its shape: Triton compiles the extend-attention kernel
once per query-block size (``extend_block_m``: 16, 32 or 64 rows by the longest new run, so
three variants on bf16), cuBLAS loads the large-M GEMM kernels lazily (``CUDA_MODULE_LOADING=LAZY``),
and the sampler's filtering path (sort, softmax, the exponential race) runs for the first time
on the first non-greedy request. The warm-up runs one prefill per length in ``warmup_lengths``
through the runner's ordinary ``forward`` (the same flattening, attention metadata and sampling
as a request), greedy and sampled, then a decode step, and leaves no trace: the KV locations
and the slot's table row it wrote are zeroed again, the slot's sampling state is reset, and the
shared sampling generator is restored (sampled outputs do not depend on the warm-up). It is not
a request: the scheduler never sees it. On the CPU there is nothing to compile, so it is one
short forward there (the path stays tested, and costs milliseconds).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner
    from treadle.runtime.server_args import ServerArgs

WARM_SLOT = 0
# Query-block sizes of the extend kernel switch above 16 and 32 new tokens; 1,024 is the prompt the
# issue measures (and where cuBLAS's large-M kernels take over); the chunk size is the largest prefill.
CUDA_LENGTHS = (16, 32, 64, 1024)
CPU_LENGTH = 8


def warmup_lengths(is_cuda: bool, chunk: int, context_len: int, kv_tokens: int) -> list[int]:
    """Prompt lengths to run once each, ascending: on CUDA one per kernel variant and the largest
    prefill step (``chunk``: the scheduler's ``min(chunked_prefill_size, max_prefill_tokens)``),
    within what a request may hold (one position is left for the decode step). On the CPU one
    short prompt."""
    cap = min(context_len - 1, kv_tokens - 1)
    if cap < 1:
        return []
    wanted = (*CUDA_LENGTHS, chunk) if is_cuda else (CPU_LENGTH,)
    return sorted({min(n, cap) for n in wanted if n > 0})


def prefill_step_tokens(args: "ServerArgs") -> int:
    """The most prompt tokens one step runs: the scheduler's ``min(max_prefill_tokens,
    chunked_prefill_size)`` (``chunked_prefill_size=-1``: no chunking)."""
    chunk = args.chunked_prefill_size or -1
    return min(args.max_prefill_tokens, chunk) if chunk > 0 else args.max_prefill_tokens


def should_warm_up(runner: "ModelRunner", with_cache: bool = True) -> bool:
    """A decoder (``with_cache``: whose KV cache exists), in one pipeline stage (a stage's forward
    waits for its peers, which are not warming in step with it). Encoders and score heads never
    decode, and a bare backbone (embeddings only) has no LM head to sample from."""
    return ((not with_cache or getattr(runner, "kv_cache", None) is not None) and not runner.is_encoder
            and not runner.model.scores_head and not getattr(runner.model, "headless", False)
            and runner.cfg.pp_size == 1)


@torch.inference_mode()
def warm_up(runner: "ModelRunner", lengths: list[int]) -> float:
    """Run the warm-up prefills (and one decode step after the last) on every rank alike; returns
    the seconds it took. Leaves the KV pool, the slot's table row and sampling state, and the
    sampling generator as they were."""
    if not lengths:
        return 0.0
    t0 = time.perf_counter()
    gen_state = runner.sampler.gen.get_state()
    vocab = runner.vocab_size
    sampled = SamplingSpec(temperature=0.7, top_p=0.9, top_k=min(50, vocab), min_p=0.01)  # the filtering path
    for i, n in enumerate(lengths):
        spec = sampled if i % 2 else SamplingSpec(temperature=0.0)
        ids = [(7 + 31 * j) % vocab for j in range(n)]
        runner.forward(ForwardPlan(step=-1, new_slots=[NewSlot(WARM_SLOT, spec)],
                                   rows=[PlanRow(WARM_SLOT, ids, 0, list(range(n)))]))
    n = lengths[-1]
    runner.forward(ForwardPlan(step=-1, rows=[PlanRow(WARM_SLOT, [1], n, [n])]))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    runner.kv_cache.buf[:, :, : n + 1].zero_()
    runner.req_to_token[WARM_SLOT].zero_()
    runner.last_token[WARM_SLOT] = 0
    runner.sampler.set_slot(WARM_SLOT, SamplingSpec())
    runner.sampler.gen.set_state(gen_state)
    return time.perf_counter() - t0
