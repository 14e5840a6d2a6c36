"""PD multiplexing (``enable_pdmux``): a mixed step's decode rows and prefill rows run as two
nano-batches at the same time.

Why: a decode step of ~150 rows is bound by memory reads (its attention reads every row's K/V), a
prefill chunk by its GEMMs. Run as one forward, each layer's decode attention runs before or after
the prefill's GEMMs, never beside them. Here the decode rows replay their CUDA graph
(``DecodeGraphs``) on a high-priority side stream (or, with ``pdmux_decode_sms``, on the stream of
a CUDA green context of that many SMs) and the prefill rows run eagerly on the current stream
meanwhile; the streams join before sampling. A green context confines the decode rows only: the
prefill may still use every SM (torch's green contexts each take their SMs from the whole card,
so two of them would overlap rather than split it). On the CPU the two nano-batches run one
after the other (the decode one eagerly), so the CPU tests run the same split, table writes and
merge.

A decode row: one token, samples, no input logprobs, no images, no drafts, its slot wants no hidden
states. Every other row is a prefill row (a one-token row that wants hidden states runs with the
prefill). A step runs joint (``split`` gives ``None``) unless it has rows of both kinds and: no
LoRA (the adapters' per-token slots are one state for the whole step), no pipeline stage, no
speculative decoding (verify rows; EAGLE reads every token's hidden states), no images (the
vision embeddings are placed by the joint batch's token offsets); on CUDA, the decode rows fit a
captured graph. The server arguments refuse the combinations that could never split
(runtime/pdmux_args.py). What is fixed for a runner (LoRA pool, draft model, pipeline stage,
deterministic mode, the device) is read once, at construction (``joint_reason``); a step checks
only what varies: its rows, and the graphs, which ``release_memory_occupation`` drops and the
resume captures again. ``steps`` and ``joint_steps`` count what happened to mixed steps.

Merge: the sampler, the RowOut extras and the scheduler read a step's results in plan row order,
so the two nano-batches' logits (and sampled slots) are put back in that order, and the prefill
side's row references (input logprobs, hidden states) are mapped back to plan rows. KV writes are
disjoint (each row writes its own new locations; graph padding writes the spare one).

Streams and the caching allocator: the side stream reads index tensors made on the current stream;
``run`` holds them until the join is queued, so their memory is reused only by work queued after
the join. What the side stream allocates is used there only, and a graph's outputs live in its
private pool. The graphs' static input buffers are the joint path's too; the side stream waits for
the current stream before a replay and the current stream for it after, so replays stay in order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from treadle.gpu_worker.eager_step import forward_eager, prepare_step
from treadle.gpu_worker.host_to_device import to_device
from treadle.gpu_worker.logprobs import StepOutput, step_output
from treadle.runtime.messages import ForwardPlan, PlanRow, SamplingSpec

if TYPE_CHECKING:
    from treadle.gpu_worker.model_runner import ModelRunner

logger = logging.getLogger("treadle.worker")


def is_decode_row(row: PlanRow, spec: SamplingSpec) -> bool:
    """A row the decode nano-batch (a CUDA-graph replay) can run."""
    return (len(row.input_ids) == 1 and row.sample and not row.spec and row.logprob_from < 0 and not row.mm
            and not spec.return_hidden and not spec.embed)


@dataclass
class Split:
    """Plan row indices of the two nano-batches, each in plan order."""

    decode: list[int]
    prefill: list[int]

    def plans(self, plan: ForwardPlan) -> tuple[ForwardPlan, ForwardPlan]:
        """The nano-batches as plans of their own. The prefix writes go with the prefill one (both
        are written before either runs); new slots and LoRA loads were taken from the whole plan."""
        rows = plan.rows
        return (ForwardPlan(step=plan.step, rows=[rows[i] for i in self.decode]),
                ForwardPlan(step=plan.step, prefix_writes=plan.prefix_writes, rows=[rows[i] for i in self.prefill]))


def split_rows(plan: ForwardPlan, spec_of: Callable[[int], SamplingSpec]) -> Optional[Split]:
    """The plan's decode and prefill rows, or ``None`` when it lacks either kind."""
    split = Split([], [])
    for i, row in enumerate(plan.rows):
        (split.decode if is_decode_row(row, spec_of(row.slot)) else split.prefill).append(i)
    return split if split.decode and split.prefill else None


def merge(split: Split, dec: StepOutput, pre: Optional[StepOutput]) -> StepOutput:
    """One ``StepOutput`` in plan row order from the two nano-batches' (whose row indices are their
    own plans'). ``pre`` is ``None`` when the prefill rows need nothing projected (middle chunks)."""
    rows = [split.decode[j] for j in dec.sample_rows]  # the order of the concatenated logits
    logits, slots, slots_t = dec.logits, list(dec.sample_slots), dec.sample_slots_t
    if pre is not None and pre.sample_rows:
        rows += [split.prefill[j] for j in pre.sample_rows]
        logits, slots_t = torch.cat([logits, pre.logits]), torch.cat([slots_t, pre.sample_slots_t])
        slots += pre.sample_slots
    order = sorted(range(len(rows)), key=rows.__getitem__)
    if order != list(range(len(rows))):
        at = to_device(order, torch.int64, logits.device)
        logits, slots_t, slots = logits[at], slots_t[at], [slots[i] for i in order]
    if pre is None:
        return StepOutput(hidden=dec.hidden, logits=logits, sample_rows=sorted(rows), sample_slots=slots,
                          inputs=[], hidden_rows=[], report=dec.report, sample_slots_t=slots_t)
    return StepOutput(hidden=pre.hidden, logits=logits, sample_rows=sorted(rows), sample_slots=slots,
                      inputs=[(split.prefill[r], a, n) for r, a, n in pre.inputs],
                      hidden_rows=[(split.prefill[r], a, n) for r, a, n in pre.hidden_rows], report=dec.report,
                      sample_slots_t=slots_t, input_lps=pre.input_lps)


def make_decode_stream(device: torch.device, decode_sms: int) -> tuple[Any, Any]:
    """The decode nano-batch's stream and what must outlive it: a high-priority stream, or with
    ``decode_sms > 0`` the stream of a green context of that many SMs, and the context (torch >= 2.9
    built with green-context support; the card rounds the count to its granularity)."""
    if decode_sms <= 0:
        return torch.cuda.Stream(device=device, priority=-1), None  # lower number: higher priority
    try:
        from torch.cuda import green_contexts
        gc = green_contexts.GreenContext
        supported = getattr(green_contexts, "SUPPORTED", True) and hasattr(gc, "create") and hasattr(gc, "Stream")
    except ImportError:
        supported = False
    if not supported:
        raise ValueError(f"pdmux_decode_sms={decode_sms} needs CUDA green contexts (torch >= 2.9 built with "
                         f"them; this is torch {torch.__version__}); pdmux_decode_sms=0 uses priority streams")
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if decode_sms >= total:
        raise ValueError(f"pdmux_decode_sms={decode_sms}: the card has {total} SMs")
    index = device.index if device.index is not None else torch.cuda.current_device()
    ctx = gc.create(num_sms=decode_sms, device_id=index)
    return ctx.Stream(), ctx


def joint_reason(runner: "ModelRunner") -> Optional[str]:
    """Why every mixed step of ``runner`` runs joint, from what is fixed once it is built, or ``None``.
    LoRA: the adapters' token slots (eager) and graph buffers are one state; drafts: verify rows.
    Pipeline stages, speculative decoding and deterministic mode are refused by the arguments (this
    guards a runner built directly)."""
    for reason, present in (("LoRA steps run joint", runner.lora is not None),
                            ("pipeline stages run joint", runner.pp is not None),
                            ("speculative decoding runs joint", runner.draft is not None),
                            ("deterministic inference runs joint", runner.cfg.deterministic)):
        if present:
            return reason
    return None


class PdMux:
    """The split path of one ``ModelRunner`` (``enable_pdmux``)."""

    def __init__(self, runner: "ModelRunner", decode_sms: int = 0) -> None:
        self.runner = runner
        self.steps = 0  # mixed steps run as two nano-batches
        self.joint_steps = 0  # mixed steps run joint (a feature the split does not take, or no graph fits)
        self.joint_reason = joint_reason(runner)  # fixed for the runner's life: not read again per step
        self.spec_of = runner.sampler.spec
        self.needs_graph = runner.device.type == "cuda"  # the decode rows replay a captured graph
        self.decode_stream, self._green = None, None  # (the green context lives as long as its stream)
        if self.needs_graph:
            self.decode_stream, self._green = make_decode_stream(runner.device, decode_sms)
        how = "one after the other (CPU)"
        if self.decode_stream is not None:
            how = f"decode on {decode_sms} SMs" if decode_sms > 0 else "decode on a high-priority stream"
        logger.info("enable_pdmux: mixed steps run their decode and prefill rows as two nano-batches (%s)", how)
        if self.joint_reason is not None or (self.needs_graph and runner.graphs is None):
            logger.warning("enable_pdmux has no effect here: %s", self.joint_reason
                           or "no decode CUDA graphs (disable_cuda_graph, or a backend without graphs)")

    def split(self, plan: ForwardPlan) -> Optional[Split]:
        """The step's nano-batches, or ``None``: run it joint. Per step: the rows (images are placed
        by the joint batch's token offsets; verify rows) and the graphs (dropped while memory is
        released, and a decode batch must fit one)."""
        split = split_rows(plan, self.spec_of)
        if split is None:
            return None
        graphs = self.runner.graphs
        if (self.joint_reason is not None or any(row.mm or row.spec for row in plan.rows)
                or (self.needs_graph and (graphs is None or not graphs.fits(len(split.decode))))):
            self.joint_steps += 1
            return None
        return split

    def run(self, plan: ForwardPlan, split: Split, extras: bool, report: bool) -> Optional[StepOutput]:
        """Both nano-batches (tables written and placeholders filled first, on the current stream),
        merged into the step's output in plan row order."""
        r = self.runner
        dec_plan, pre_plan = split.plans(plan)
        dec, pre = prepare_step(r, dec_plan, extras, report), prepare_step(r, pre_plan, extras, report)
        assert dec is not None and pre is not None, "each nano-batch has rows, so tokens"
        if self.decode_stream is None:  # the CPU: one after the other
            dec_out = forward_eager(r, dec_plan, *dec, None, report)
            pre_out = forward_eager(r, pre_plan, *pre, None, report)
        else:
            dec_out, pre_out = self._overlapped(dec, pre_plan, pre, report)
        self.steps += 1
        return merge(split, dec_out, pre_out)

    def _overlapped(self, dec: tuple, pre_plan: ForwardPlan, pre: tuple,
                    report: bool) -> tuple[StepOutput, Optional[StepOutput]]:
        """The decode graph replayed on the decode stream while the prefill runs eagerly on the
        current stream, which then waits for the decode stream."""
        r, (s_d, dev_d) = self.runner, dec
        main = torch.cuda.current_stream(r.device)
        self.decode_stream.wait_stream(main)  # the table writes and placeholder fills are queued on main
        with torch.cuda.stream(self.decode_stream):  # queued first: it starts while the prefill is launched
            hidden, logits = r.graphs.replay(dev_d.input_ids, dev_d.positions, dev_d.locs, dev_d.write_slots)
        pre_out = forward_eager(r, pre_plan, *pre, None, report)
        main.wait_stream(self.decode_stream)
        return step_output(s_d, dev_d, hidden, logits, report), pre_out
