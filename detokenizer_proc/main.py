"""The detokenizer process: token ids in, incremental text deltas out to the client."""

from __future__ import annotations

import gc
import logging
from typing import Optional

import msgspec
import zmq

from treadle.detokenizer_proc.incremental import IncrementalDetokenizer
from treadle.runtime.messages import (
    DETOKENIZER_IN, ChildReady, FreezeGC, OutputFields, Shutdown, StrOut, StrOutBatch, TokenOutBatch, shared_fields,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.tokenizer import load_tokenizer_of
from treadle.runtime.zmq_utils import Receiver, Sender

logger = logging.getLogger("treadle.detokenizer")


def detokenize(detok: Optional[IncrementalDetokenizer], batch: TokenOutBatch) -> StrOutBatch:
    """Each output's new text; with no tokenizer (``skip_tokenizer_init``) the ids pass through as
    they are and the client leaves ``text`` out of its results."""
    if detok is None:
        return StrOutBatch(outs=[StrOut(**shared_fields(o, OutputFields)) for o in batch.outs])
    outs = []
    for o in batch.outs:
        text = detok.add(
            o.rid, o.new_ids, context_ids=o.context_ids, finished=o.finish is not None,
            skip_special_tokens=o.skip_special_tokens,
            spaces_between_special_tokens=o.spaces_between_special_tokens,
            trim_stop_str=o.trim_stop_str, trim_last_token=o.trim_last_token,
        )
        outs.append(StrOut(**shared_fields(o, OutputFields), text=text))
    return StrOutBatch(outs=outs)


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    args = spec.args
    tokenizer = load_tokenizer_of(spec.files, args)
    detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
    recv = Receiver(ctx, spec.endpoints["detokenizer"], DETOKENIZER_IN, bind=True)
    inbox.send(ChildReady(name=spec.name))
    while True:
        try:
            msg = recv.recv()
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.error("dropped a malformed message: %s", e)
            continue
        if isinstance(msg, Shutdown):
            return
        if isinstance(msg, FreezeGC):
            gc.freeze()
            continue
        inbox.send(detokenize(detok, msg))
