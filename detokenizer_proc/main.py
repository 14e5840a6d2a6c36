"""The detokenizer process: token ids in, incremental text deltas out to the client."""

from __future__ import annotations

import gc
import logging

import msgspec
import zmq

from treadle.detokenizer_proc.incremental import IncrementalDetokenizer
from treadle.runtime.hf_config import load_tokenizer
from treadle.runtime.messages import (
    DETOKENIZER_IN, ChildReady, FreezeGC, OutputFields, Shutdown, StrOut, StrOutBatch, TokenOutBatch, shared_fields,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.zmq_utils import Receiver, Sender

logger = logging.getLogger("treadle.detokenizer")


def detokenize(detok: IncrementalDetokenizer, batch: TokenOutBatch) -> StrOutBatch:
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
    tokenizer = load_tokenizer(spec.files.tokenizer_dir, args.trust_remote_code, args.tokenizer_mode)
    detok = IncrementalDetokenizer(tokenizer)
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
