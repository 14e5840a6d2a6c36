"""The tokenizer process: tokenize, validate every item of a call, then dispatch all or none."""

from __future__ import annotations

import logging

import msgspec
import zmq

from treadle.runtime.hf_config import context_length, load_config, load_tokenizer, vocab_size
from treadle.runtime.messages import (
    TOKENIZER_IN, AbortReq, ChildReady, ControlReq, GenerateBatch, GenerateReq, ReqError, Shutdown,
    TokenizedBatch, TokenizedReq,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.zmq_utils import Receiver, Sender
from treadle.tokenizer_proc.validate import check_embed_length, check_input_ids, check_lengths, check_logprob_args

logger = logging.getLogger("treadle.tokenizer")


class TokenizerWorker:
    def __init__(self, spec: ChildSpec) -> None:
        self.args = spec.args
        files = spec.files
        self.tokenizer = load_tokenizer(files.tokenizer_dir, self.args.trust_remote_code)
        cfg = load_config(files.model_dir)
        self.context_len = context_length(cfg, self.args, files.model_dir)
        self.vocab = vocab_size(cfg, self.tokenizer)

    def tokenize_batch(self, batch: GenerateBatch) -> TokenizedBatch:
        """Raises ValueError/TypeError naming the field of the first bad item; nothing is sent then."""
        texts = [r.text for r in batch.reqs if r.input_ids is None]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        out = []
        for r in batch.reqs:
            ids = list(next(encoded)) if r.input_ids is None else r.input_ids
            if r.input_ids is None and not ids:
                raise ValueError("prompt cannot be empty: it tokenizes to no tokens.")
            check_input_ids(ids, self.vocab)
            r.sampling.verify(self.vocab)
            ids = check_embed_length(ids, self.context_len, self.args) if r.embed else check_lengths(
                r, ids, self.context_len, self.args)
            check_logprob_args(r, len(ids), self.vocab)
            out.append(self._tokenized(r, ids))
        return TokenizedBatch(reqs=out)

    @staticmethod
    def _tokenized(r: GenerateReq, ids: list[int]) -> TokenizedReq:
        return TokenizedReq(
            rid=r.rid, input_ids=ids, sampling=r.sampling, stream=r.stream, return_logprob=r.return_logprob,
            logprob_start_len=r.logprob_start_len, top_logprobs_num=r.top_logprobs_num,
            token_ids_logprob=r.token_ids_logprob, return_hidden_states=r.return_hidden_states,
            priority=r.priority, created=r.created, custom_logit_processor=r.custom_logit_processor,
            custom_state=r.custom_state, session=r.session, embed=r.embed,
        )


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    worker = TokenizerWorker(spec)
    recv = Receiver(ctx, spec.endpoints["tokenizer"], TOKENIZER_IN, bind=True)
    to_scheduler = Sender(ctx, spec.endpoints["scheduler"])
    inbox.send(ChildReady(name=spec.name, info={"context_length": worker.context_len, "vocab_size": worker.vocab}))
    while True:
        try:
            msg = recv.recv()
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.error("dropped a malformed message: %s", e)
            continue
        if isinstance(msg, GenerateBatch):
            try:
                to_scheduler.send(worker.tokenize_batch(msg))
            except (ValueError, TypeError) as e:
                kind = "type" if isinstance(e, TypeError) else "value"
                inbox.send(ReqError(kind=kind, message=str(e), call_id=msg.call_id))
        elif isinstance(msg, (AbortReq, ControlReq)):
            to_scheduler.send(msg)
        elif isinstance(msg, Shutdown):
            to_scheduler.send(msg)
            return
