"""PD multiplexing's arguments (``enable_pdmux``, SGLang's name), checked at construction.

With ``enable_pdmux`` a step that has both decode rows and prefill rows runs them as two
nano-batches at the same time (``gpu_worker/pdmux.py``): decode attention is bound by memory
reads, a prefill chunk by its GEMMs, so on a GPU one can hide behind the other. The scheduler
then keeps a step's prefill beside decode rows to ``pdmux_prefill_tokens``, so the two halves
take about as long as each other. Refused where the split cannot work: pipeline stages (a stage
before the last has no logits to merge), speculative decoding (verify rows and the draft's
hidden states), deterministic inference (built and tested on the joint batch only) and tensor
parallelism (the two nano-batches' all-reduces would interleave on the ranks' shared buffers).
"""

from __future__ import annotations

from typing import Any

from treadle.runtime.arg_checks import check_int


def check_pdmux_args(a: Any) -> None:
    """``ValueError`` naming the field for a bad value or a combination the split cannot run."""
    check_int("pdmux_prefill_tokens", a.pdmux_prefill_tokens, lo=1)
    check_int("pdmux_decode_sms", a.pdmux_decode_sms, lo=0)
    if not isinstance(a.enable_pdmux, bool):
        raise ValueError(f"enable_pdmux must be a bool, got {a.enable_pdmux!r}.")
    if not a.enable_pdmux:
        if a.pdmux_decode_sms:
            raise ValueError("pdmux_decode_sms is read only with enable_pdmux=True.")
        return
    clashes = {
        "pp_size": (a.pp_size > 1, "a pipeline stage before the last has no logits to put in order"),
        "tp_size": (a.tp_size > 1, "the two nano-batches' all-reduces would interleave; not built"),
        "speculative_algorithm": (a.speculative_algorithm is not None,
                                  "verify rows and the draft's hidden states need the joint batch"),
        "enable_deterministic_inference": (a.enable_deterministic_inference,
                                           "its bit-exact results are built and tested on the joint batch only"),
    }
    for name, (bad, why) in clashes.items():
        if bad:
            raise ValueError(f"enable_pdmux=True cannot run with {name}={getattr(a, name)!r} ({why}).")
