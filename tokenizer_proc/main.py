"""The tokenizer process: tokenize, validate every item of a call, then dispatch all or none."""

from __future__ import annotations

import logging
from typing import Optional

import msgspec
import zmq

from treadle.runtime.hf_config import context_length, load_config, vocab_size
from treadle.runtime.messages import (
    TOKENIZER_IN, AbortReq, Call, ChildReady, GenerateBatch, GetLoad, GroupDown, Reply, ReqError,
    ReqsDone, RequestFields, Shutdown, TokenizedBatch, TokenizedReq, radix_key_ids, shared_fields,
)
from treadle.runtime.procs import ChildSpec
from treadle.runtime.tokenizer import load_tokenizer_of
from treadle.runtime.zmq_utils import Receiver, Sender
from treadle.tokenizer_proc.multimodal import check_items_fit, load_multimodal, reject_media
from treadle.tokenizer_proc.router import DpRouter
from treadle.tokenizer_proc.validate import (
    check_embed_length, check_input_ids, check_lengths, check_logprob_args, check_token_only,
)

logger = logging.getLogger("treadle.tokenizer")


class TokenizerWorker:
    def __init__(self, spec: ChildSpec) -> None:
        self.args = spec.args
        files = spec.files
        self.tokenizer = load_tokenizer_of(files, self.args)  # None with skip_tokenizer_init
        cfg = load_config(files.model_dir)
        self.context_len = context_length(cfg, self.args, files.model_dir)
        self.vocab = vocab_size(cfg, self.tokenizer)
        self.mm = load_multimodal(files.model_dir, self.tokenizer) if self.tokenizer is not None else None
        self.arch = (cfg.get("architectures") or [None])[0]

    def tokenize_batch(self, batch: GenerateBatch) -> TokenizedBatch:
        """Raises ValueError/TypeError naming the field of the first bad item; nothing is sent then."""
        if self.tokenizer is None:
            for r in batch.reqs:
                check_token_only(r)
        texts = [r.text for r in batch.reqs if r.input_ids is None]
        encoded = iter(self.tokenizer.encode_batch(texts)) if texts else iter(())
        out = []
        media = self.mm.start(batch.reqs) if self.mm is not None else [[] for _ in batch.reqs]
        for r, futures in zip(batch.reqs, media):
            ids = list(next(encoded)) if r.input_ids is None else r.input_ids
            if r.input_ids is None and not ids:
                raise ValueError("prompt cannot be empty: it tokenizes to no tokens.")
            r.sampling.verify(self.vocab)
            items = []
            if r.image_data or r.video_data:
                if self.mm is None:
                    reject_media(r, self.arch)
                ids, items = self.mm.expand(r, ids, futures)
            check_input_ids(ids, self.vocab)  # after expansion: a marker outside the vocabulary is gone
            ids = check_embed_length(ids, self.context_len, self.args) if r.embed else check_lengths(
                r, ids, self.context_len, self.args)
            check_items_fit(items, len(ids))
            check_logprob_args(r, len(ids), self.vocab)
            out.append(TokenizedReq(**shared_fields(r, RequestFields), input_ids=ids, mm_items=items))
        return TokenizedBatch(reqs=out)


def dispatch(call: GenerateBatch, batch: TokenizedBatch, groups: list[Sender], router: Optional[DpRouter],
             inbox: Sender) -> None:
    """Send a tokenized call to its scheduler group(s): with DP each request goes to the group the
    router picks, so one call may be split; a call pinned to a dead group fails as a whole."""
    if router is None:
        groups[0].send(batch)
        return
    pinned = [r.dp_rank for r in call.reqs if r.dp_rank is not None]
    bad = [g for g in pinned if g in router.dead or not 0 <= g < len(groups)]
    if bad or not router.live():
        why = router.dead.get(bad[0], f"dp_rank {bad[0]} out of range") if bad else "Every DP group is dead."
        inbox.send(ReqError(kind="dead", message=why, call_id=call.call_id))
        return
    parts: dict[int, list[TokenizedReq]] = {}
    for r, t in zip(call.reqs, batch.reqs):
        parts.setdefault(router.route(t.rid, radix_key_ids(t.input_ids, t.mm_items), r.dp_rank), []).append(t)
    for g, reqs in parts.items():
        groups[g].send(TokenizedBatch(reqs=reqs))


def main(spec: ChildSpec, ctx: zmq.Context, inbox: Sender) -> None:
    worker = TokenizerWorker(spec)
    recv = Receiver(ctx, spec.endpoints["tokenizer"], TOKENIZER_IN, bind=True)
    groups = [Sender(ctx, ep) for ep in spec.extra["scheduler_endpoints"]]  # one scheduler per DP group
    router = DpRouter(len(groups)) if len(groups) > 1 else None
    inbox.send(ChildReady(name=spec.name, info={"context_length": worker.context_len, "vocab_size": worker.vocab}))
    while True:
        try:
            msg = recv.recv()
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            logger.error("dropped a malformed message: %s", e)
            continue
        if isinstance(msg, GenerateBatch):
            try:
                batch = worker.tokenize_batch(msg)
            except (ValueError, TypeError) as e:
                kind = "type" if isinstance(e, TypeError) else "value"
                inbox.send(ReqError(kind=kind, message=str(e), call_id=msg.call_id))
                continue
            dispatch(msg, batch, groups, router, inbox)
        elif isinstance(msg, AbortReq):
            for g in router.live() if router else [0]:
                groups[g].send(msg)
        elif isinstance(msg, Call):
            if isinstance(msg, GetLoad):  # asked of the tokenizer: the router's view
                inbox.send(Reply(call_id=msg.call_id, ok=True, result=router.state() if router else []))
            elif 0 <= msg.dp_rank < len(groups):
                groups[msg.dp_rank].send(msg)
            else:
                inbox.send(Reply(call_id=msg.call_id, ok=False, error=f"no DP group {msg.dp_rank}"))
        elif isinstance(msg, ReqsDone) and router is not None:
            router.done(msg.rids)
        elif isinstance(msg, GroupDown) and router is not None:
            rids = router.group_down(msg.dp_rank, msg.message)
            if rids:
                inbox.send(ReqError(kind="dead", message=msg.message, rids=rids))
        elif isinstance(msg, Shutdown):
            for g in router.live() if router else [0]:
                groups[g].send(msg)
            return
