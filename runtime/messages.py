"""The wire schema: every message that crosses a ZeroMQ socket, as typed msgspec Structs.

Each socket carries one tagged union (see the ``*_MSG`` aliases at the bottom) decoded with a
typed ``msgspec.msgpack.Decoder``, so a malformed or foreign frame is rejected, never executed.
Nothing here is pickled. Sampling parameters live in ``runtime/sampling_params.py``.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import msgspec

from treadle.runtime.sampling_params import SamplingParams


class _Msg(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True):
    """Base of every tagged message (the tag is the class name)."""


class SessionParams(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """A turn of a session (API.md part A): continue from ``rid`` (default: the latest turn)."""

    id: str
    rid: Optional[str] = None
    offset: Optional[int] = None
    replace: Optional[bool] = None
    drop_previous_output: Optional[bool] = None


# ---------------------------------------------------------------- client -> tokenizer
class MediaRef(msgspec.Struct, array_like=True, omit_defaults=True):
    """One image or video as the client hands it on: ``source`` (a local path, ``file://`` or
    ``http(s)://`` URL, or a ``data:`` URL), ``raw`` (encoded file bytes) or, for a PIL image,
    ``rgb`` (its RGB pixels, row-major, ``size`` = [width, height]: no encoding on the user's
    thread). The tokenizer process loads and decodes it (tokenizer_proc/media.py)."""

    source: str = ""
    raw: bytes = b""
    label: str = ""  # the user's field and index (``image_data[1][0]``), for error messages
    rgb: bytes = b""
    size: list[int] = []


class MmItem(msgspec.Struct, array_like=True, omit_defaults=True):
    """One processed image (or video frame) of a request: its pixels, ready for the vision tower,
    and where its placeholder tokens sit in the request's ``input_ids``."""

    modality: str  # "image" or "video"
    offset: int  # position of the item's first placeholder token
    num_tokens: int  # placeholder tokens it fills (one vision embedding each)
    digest: int  # 63-bit hash of the pixels: the radix-cache key of its positions
    pixels: bytes  # float32 pixel values, C-contiguous
    shape: list[int]  # of ``pixels``: [3, H, W]


def radix_key_ids(ids: list[int], items: list[MmItem]) -> list[int]:
    """``ids`` with each item's placeholder positions set to ``-1 - digest``: the prefix-cache (and
    DP-routing) key, under which only the same image with the same text before it matches."""
    if not items:
        return ids
    ids = list(ids)
    for it in items:
        ids[it.offset:it.offset + it.num_tokens] = [-1 - it.digest] * it.num_tokens
    return ids


class RequestFields(_Msg):
    """What a request carries from the client to the scheduler unchanged: the fields
    ``GenerateReq`` and ``TokenizedReq`` share (the tokenizer copies them with ``shared_fields``)."""

    rid: str
    sampling: SamplingParams = msgspec.field(default_factory=SamplingParams)
    stream: bool = False
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    token_ids_logprob: Optional[list[int]] = None
    return_hidden_states: bool = False
    priority: Optional[int] = None
    created: float = 0.0
    custom_logit_processor: Optional[str] = None  # import path, resolved by the client
    custom_state: Optional[dict[str, Any]] = None
    session: Optional[SessionParams] = None
    embed: bool = False  # encode(): a prefill-only request whose result is an embedding
    dimensions: Optional[int] = None  # encode(): the embedding's first N values (Matryoshka; the client checks it)
    lora_name: Optional[str] = None  # a loaded LoRA adapter (validated by the client); None: the base model
    cache_salt: Optional[str] = None  # prefixes are shared only between requests with the same salt


def shared_fields(msg: msgspec.Struct, base: type) -> dict[str, Any]:
    """The values of ``base``'s fields in ``msg`` (an instance of a subclass of ``base``), as
    keywords for another subclass: how a message is handed on with its common part unchanged."""
    return {f: getattr(msg, f) for f in base.__struct_fields__}


class GenerateReq(RequestFields, kw_only=True):
    """One generation request as the user gave it (text or ids), already shape-normalized."""

    text: Optional[str] = None
    input_ids: Optional[list[int]] = None
    max_new_tokens_set: bool = False  # the user named max_new_tokens (else it is clamped silently)
    dp_rank: Optional[int] = None  # run on this DP group (a session's group); None: the tokenizer picks
    image_data: list[MediaRef] = []
    video_data: list[MediaRef] = []


class GenerateBatch(_Msg):
    """All items of one user call: validated together, dispatched only if all are valid."""

    call_id: int
    reqs: list[GenerateReq]


class AbortReq(_Msg):
    rid: str = ""
    abort_all: bool = False


class ReqsDone(_Msg):
    """Requests that finished or failed, reported by the client so the tokenizer's DP router
    knows each group's load (sent only with ``dp_size > 1``)."""

    rids: list[str]


class GroupDown(_Msg):
    """A process of DP group ``dp_rank`` died: route nothing more there, fail its requests."""

    dp_rank: int
    message: str


# ---------------------------------------------------------------- tokenizer -> scheduler
class TokenizedReq(RequestFields, kw_only=True):
    """A request with its prompt as token ids (and its images processed), ready to schedule."""

    input_ids: list[int]
    mm_items: list[MmItem] = []  # images and video frames, in prompt order


class TokenizedBatch(_Msg):
    reqs: list[TokenizedReq]


# ---------------------------------------------------------------- scheduler <-> gpu worker
class SamplingSpec(msgspec.Struct, array_like=True, omit_defaults=True):
    """What the worker needs to sample one request's tokens (set once per request slot).

    Penalties count the request's output tokens only (as SGLang does); ``stop_ids`` (EOS and
    ``stop_token_ids``) are masked until ``min_new_tokens`` outputs exist. A custom logit
    processor is named by import path (``"module:Name"``); an instance's attributes travel as
    JSON in ``custom_state``. Nothing here is ever unpickled.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    stop_ids: list[int] = []
    logit_bias: Optional[dict[int, float]] = None
    custom_processor: Optional[str] = None
    custom_state: Optional[dict[str, Any]] = None
    custom_params: Optional[dict[str, Any]] = None
    logprobs: bool = False  # report the sampled token's logprob (and the lists below)
    top_logprobs_num: int = 0
    token_ids_logprob: Optional[list[int]] = None
    return_hidden: bool = False
    embed: bool = False  # an embedding request: report the last position's hidden state, sample nothing


class NewSlot(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request takes a slot: its sampling spec is stored there until the slot is reused.

    ``prior_output`` holds the tokens a re-admitted request generated before (they count for
    penalties, ``min_new_tokens`` and the position of a seeded sample stream).
    """

    slot: int
    sampling: SamplingSpec
    prior_output: list[int] = []


PLACEHOLDER = -1  # a decode row's input id still being sampled by the step in flight (overlap scheduling)


class PlanRow(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's work in one forward step.

    The worker writes ``new_locs`` (KV-cache token locations of the new tokens) into row
    ``slot`` of its req-to-token table at positions ``start_pos ..``, runs ``input_ids`` at those
    positions attending to every earlier position of the slot, and samples one token if
    ``sample`` (a non-final prefill chunk does not sample). A grammar-constrained row carries its
    ``token_bitmask``: int32 words as raw bytes, bit ``i % 32`` of word ``i // 32`` allows token
    ``i`` (xgrammar's layout); tokens past its end are disallowed. Empty: no constraint.
    A one-token row whose input id is ``PLACEHOLDER`` takes the token the worker sampled for this
    slot in the previous step, which the scheduler has not seen yet.
    """

    slot: int
    input_ids: list[int]
    start_pos: int
    new_locs: list[int]
    sample: bool = True
    logprob_from: int = -1  # >= 0: input logprobs for row positions logprob_from .. n-2 (see RowOut)
    token_bitmask: bytes = b""
    lora_slot: int = -1  # the device LoRA slot of the row's adapter; -1: the base model
    mm: list[MmChunk] = []  # the multimodal items whose placeholder positions this row runs
    # speculative decoding: the last ``spec`` input ids are drafts to verify (NGRAM) or, with
    # ``draft_steps``, placeholders the worker's draft model fills (STANDALONE); the row's RowOut
    # then carries the tokens it produced in ``spec_ids`` (docs/speculative.md)
    spec: int = 0
    draft_steps: int = 0  # STANDALONE / EAGLE: the draft model (head) proposes first, this many steps deep
    prev_id: int = -1  # STANDALONE: the token before input_ids[0] (the draft model's first step re-reads it)
    # a tree of drafts (the row is the last token and ``spec`` nodes): each draft's parent node (0: the
    # last token, i: draft i); empty: a chain. EAGLE's worker fills it with the drafts.
    tree: list[int] = []


class MmChunk(msgspec.Struct, array_like=True, omit_defaults=True):
    """A multimodal item that overlaps a prefill row. The worker runs the vision tower on the
    first row that needs the item (``pixels`` sent then, empty afterwards), keeps the embeddings
    per (slot, item) while later chunks of the prompt need them, and puts embedding
    ``p - offset`` in place of the token at each position ``p`` of the row that the item covers."""

    item: int  # the item's index within its request
    offset: int  # position of its first placeholder token in the request
    num_tokens: int
    pixels: bytes = b""  # float32, as MmItem.pixels
    shape: list[int] = []


class LoraLoad(msgspec.Struct, array_like=True):
    """Before this step runs, copy the loaded adapter ``name`` into device LoRA slot ``slot``."""

    slot: int
    name: str


class PrefixWrite(msgspec.Struct, array_like=True):
    """Cached prefix pages for a request that starts with a prefix-cache hit."""

    slot: int
    locs: list[int]


class ForwardPlan(_Msg):
    step: int
    new_slots: list[NewSlot] = []
    prefix_writes: list[PrefixWrite] = []
    rows: list[PlanRow] = []
    lora_loads: list[LoraLoad] = []


class RowOut(msgspec.Struct, array_like=True, omit_defaults=True):
    """Extras of one plan row, for slots that asked for logprobs or hidden states.

    Logprobs are ``log_softmax`` of the model's raw logits (before temperature, penalties and
    masks). Output fields describe the token sampled from the row's last position. Input field
    entry ``i`` is for row position ``p = logprob_from + i``: the logprob of ``input_ids[p + 1]``
    given everything up to ``p``. ``hidden`` holds float32 final hidden states of every row
    position, ``[len(input_ids), hidden_size]``, as raw bytes. ``error``: the row's request failed
    in the worker (its custom logit processor raised); the scheduler fails that request only.
    """

    logprob: Optional[float] = None
    top_ids: list[int] = []
    top_logprobs: list[float] = []
    ids_logprobs: list[float] = []
    input_logprobs: list[float] = []
    input_top_ids: list[list[int]] = []
    input_top_logprobs: list[list[float]] = []
    input_ids_logprobs: list[list[float]] = []
    hidden: bytes = b""
    error: str = ""
    spec_ids: list[int] = []  # a verify row: its accepted drafts, then the target's own token
    spec_outs: list["RowOut"] = []  # their output logprobs, one RowOut each (the slot asked for logprobs)


class StepResult(_Msg):
    """One sampled token per row with ``sample=True``, in row order; ``extras`` by row index."""

    step: int
    next_token_ids: list[int] = []
    extras: dict[int, RowOut] = {}


class SyncStep(_Msg):
    """The scheduler needs the result of the step the worker still holds (overlap scheduling: a
    worker on CUDA answers a step only when the next plan or this message arrives)."""


# ---------------------------------------------------------------- scheduler -> detokenizer
class FinishReason(msgspec.Struct, omit_defaults=True):
    """SGLang's finish_reason JSON: ``{"type": "stop"|"length"|"abort", ...}``."""

    type: str
    matched: Union[int, str, None] = None
    length: Optional[int] = None
    message: Optional[str] = None
    status_code: Optional[int] = None

    def to_json(self) -> dict[str, Any]:
        if self.type == "stop":
            return {"type": "stop", "matched": self.matched}
        if self.type == "length":
            return {"type": "length", "length": self.length}
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.status_code is not None:
            out["status_code"] = self.status_code
        return out


class OutputFields(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a request's output carries from the scheduler to the client unchanged: the fields
    ``TokenOut`` and ``StrOut`` share (the detokenizer adds the text)."""

    rid: str
    new_ids: list[int]
    finish: Optional[FinishReason] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    meta: Optional["MetaDelta"] = None
    embedding: bytes = b""  # float32 vector of an embedding request
    mm_tokens: dict[str, int] = {}  # prompt tokens per modality ("image", "video") of a multimodal request
    num_retractions: int = 0
    time_stats: dict[str, float] = {}  # enable_metrics: queue / prefill timings, sent once after the prefill
    spec_stats: dict[str, Union[int, float]] = {}  # speculative decoding: spec_verify_ct, spec_accept_length, ... (totals)


class TokenOut(OutputFields):
    """New output ids of one request since its last emission, and how to detokenize them.

    ``context_ids`` (sent with the first emission only) are the last few prompt tokens, so
    the first output token is decoded with the spaces it would have inside the sequence.
    """

    context_ids: list[int] = []
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    trim_stop_str: Optional[str] = None
    trim_last_token: bool = False


class MetaDelta(msgspec.Struct, array_like=True, omit_defaults=True):
    """New logprob / hidden-state entries since the last emission (input ones come once).

    Token entries are ``[logprob, token_id]`` pairs (``logprob`` None where nothing predicts the
    position); top and token-id lists are lists of such pairs per position.
    """

    input_token_logprobs: list[Any] = []
    input_top_logprobs: list[Any] = []
    input_token_ids_logprobs: list[Any] = []
    output_token_logprobs: list[Any] = []
    output_top_logprobs: list[Any] = []
    output_token_ids_logprobs: list[Any] = []
    hidden_states: list[Any] = []


class TokenOutBatch(_Msg):
    outs: list[TokenOut]


# ---------------------------------------------------------------- control calls
class Call(_Msg):
    """A request/reply control call beside generation, answered by a ``Reply`` with its
    ``call_id``. The client sends one per DP group it asks (``dp_rank``; -1: the tokenizer's
    router); the scheduler forwards the worker's calls to every rank of its group."""

    call_id: int = 0
    dp_rank: int = 0


class GetInternalState(Call):
    """The scheduler's state: pool sizes, queue lengths, cache and counters (get_server_info)."""


class CheckIntegrity(Call):
    """GetInternalState, after asserting that an idle scheduler holds no leaked page, slot or lock."""


class FlushCache(Call):
    pass


class OpenSession(Call, kw_only=True):
    session_id: str
    timeout: Optional[float] = None
    streaming: bool = False


class ListSessions(Call):
    """The ids of the sessions open in the group (the client forgets the ones closed on timeout)."""


class CloseSession(Call, kw_only=True):
    session_id: str


class FreezeGC(Call):
    """``gc.freeze()`` after warm-up (the scheduler does it and hands it on to the detokenizer)."""


class LoadLoraAdapter(Call, kw_only=True):
    lora_name: str
    lora_path: str
    pinned: bool = False


class UnloadLoraAdapter(Call, kw_only=True):
    lora_name: str


class StartProfile(Call):
    options: dict[str, Any] = {}  # start_profile's keyword arguments (runtime/profile_args.py checks them)


class StopProfile(Call):
    pass


# An update's ``phase``: "both" checks the new weights and loads them (one DP group); "check" only
# checks them (a distributed update keeps the received tensors) and the group waits, paused, for the
# client's ``FinishWeightUpdate``: with several DP groups nothing loads until every group has passed.
# The scheduler sends the workers the held update again with "apply" (load what was checked) or
# "drop" (forget it).
WEIGHT_PHASES = ("both", "check", "apply", "drop")


class UpdateWeightsFromDisk(Call, kw_only=True):
    """Client -> scheduler -> every worker rank: copy a checkpoint of the same model (an HF-format
    directory the client resolved) into the running weights. The scheduler waits until nothing
    runs; the workers check the whole checkpoint against the model first, so a bad one changes
    nothing."""

    model_dir: str
    load_format: Optional[str] = None
    phase: str = "both"  # WEIGHT_PHASES


class TensorRef(msgspec.Struct, array_like=True):
    """Where one named tensor's bytes lie in a shared-memory segment (C order)."""

    name: str
    dtype: str  # torch's name: "float32", "bfloat16", ...
    shape: list[int]
    offset: int


class UpdateWeightsFromTensor(Call, kw_only=True):
    """Client -> scheduler -> workers: named tensors (all or part of the model's) into the running
    weights. The bytes travel in the POSIX shared-memory segment ``shm_name`` that the client
    owns and removes after the answer; only this description crosses the socket."""

    shm_name: str
    tensors: list[TensorRef]
    flush_cache: bool = True
    phase: str = "both"  # WEIGHT_PHASES


class GetWeightsByName(Call, kw_only=True):
    """Client -> scheduler -> workers: a weight by its checkpoint name, its first rows as lists."""

    name: str
    truncate_size: int = 100


class InitWeightsUpdateGroup(Call, kw_only=True):
    """Client -> scheduler -> every worker: join the process group a trainer opens at
    ``master_address:master_port`` (its rank 0 broadcasts weights); worker rank ``r`` of the engine
    joins as ``rank_offset + r``. Answered once every member has joined."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributed(Call, kw_only=True):
    """Client -> scheduler -> workers: receive tensors broadcast by the group's rank 0 (the
    trainer), in this order, and load them like a checkpoint's (checked first)."""

    names: list[str]
    dtypes: list[str]  # torch's names: "bfloat16", ...
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    phase: str = "both"  # WEIGHT_PHASES


class FinishWeightUpdate(Call, kw_only=True):
    """Client -> scheduler, after an update with ``phase="check"``: ``action="apply"`` (sent once
    every DP group passed the check) loads the checked weights, and the group stays paused, so no
    request runs on them before the engine's ``weight_version`` names them; ``action="end"`` ends
    the update (after an apply, or instead of one: the checked weights are dropped) and requests
    run again."""

    action: str  # "apply" | "end"


class DestroyWeightsUpdateGroup(Call, kw_only=True):
    group_name: str = "weight_update_group"


class ReleaseMemoryOccupation(Call, kw_only=True):
    """Client -> scheduler -> workers: give the device memory of ``tags`` back (weights go to host
    memory first; the KV cache's contents are dropped). Requests are refused until resumed."""

    tags: list[str]


class ResumeMemoryOccupation(Call, kw_only=True):
    tags: list[str]


class GetLoad(Call):
    """The tokenizer's view of the DP groups (alive, requests in flight); sent with ``dp_rank=-1``."""


class GetWorkerInfo(Call):
    """Scheduler -> workers at start-up: the reporting rank answers with a ``WorkerInfo``."""


class ReadLoraAdapter(Call, kw_only=True):
    """Scheduler -> workers: read a PEFT adapter into host memory (every rank, or none)."""

    name: str
    path: str


class DropLoraAdapter(Call, kw_only=True):
    name: str


class Reply(_Msg):
    """The answer to a ``Call``: ``result`` when ``ok``, else ``error``."""

    call_id: int
    ok: bool
    result: Any = None
    error: str = ""


class WorkerInfo(msgspec.Struct):
    """What the reporting worker tells the scheduler (and get_server_info) once it has loaded: the
    first four size the scheduler's pools; the rest describe the model and the rank."""

    context_len: int
    kv_tokens: int  # KV pool capacity in tokens
    max_slots: int  # request slots (rows of the req-to-token table)
    vocab_size: int
    is_encoder: bool = False  # bidirectional (BERT): whole sequences, no prefix reuse
    normalize: bool = False  # embeddings are L2-normalized (the checkpoint's sentence-transformers files say)
    pooling_mode: str = ""
    architecture: str = ""
    dtype: str = ""
    device: str = ""
    num_params: int = 0  # this rank's shard
    weight_bytes: int = 0
    kv_bytes: int = 0
    kv_cache_dtype: str = ""
    attention_backend: str = ""
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    kv_layers: int = 0  # this stage's layers
    cuda_graph_bs: list[int] = []
    cuda_graph_capture_time: float = 0.0
    startup_phases: dict[str, float] = {}
    kv_sizing: dict[str, float] = {}  # a pool sized from a measured prefill (gpu_worker/kv_sizing.py): what sized it
    load_time: float = 0.0
    pid: int = 0


CLIENT_CALLS = (GetInternalState, CheckIntegrity, FlushCache, OpenSession, ListSessions, CloseSession, FreezeGC,
                LoadLoraAdapter, UnloadLoraAdapter, StartProfile, StopProfile, GetLoad, UpdateWeightsFromDisk,
                UpdateWeightsFromTensor, GetWeightsByName, InitWeightsUpdateGroup, UpdateWeightsFromDistributed,
                DestroyWeightsUpdateGroup, ReleaseMemoryOccupation, ResumeMemoryOccupation, FinishWeightUpdate)
WORKER_CALLS = (GetWorkerInfo, StartProfile, StopProfile, ReadLoraAdapter, DropLoraAdapter, UpdateWeightsFromDisk,
                UpdateWeightsFromTensor, GetWeightsByName, InitWeightsUpdateGroup, UpdateWeightsFromDistributed,
                DestroyWeightsUpdateGroup, ReleaseMemoryOccupation, ResumeMemoryOccupation)


# ---------------------------------------------------------------- * -> client inbox
class StrOut(OutputFields):
    """A ``TokenOut`` with its new ids turned into text."""

    text: str = ""


class StrOutBatch(_Msg):
    outs: list[StrOut]


class ReqError(_Msg):
    """Validation failure of a whole call (``call_id``) or of single requests (``rids``)."""

    kind: str  # "value" | "type" | "overloaded" | "runtime" | "dead" (their DP group died)
    message: str
    call_id: int = -1
    rids: list[str] = []


class ChildReady(_Msg):
    """Sent once by each child when it is ready to serve; ``info`` feeds get_server_info()."""

    name: str
    info: dict[str, Any] = {}


class ChildFailed(_Msg):
    """Sent by a child that hit an exception, just before it exits."""

    name: str
    error: str


class Heartbeat(_Msg):
    """Sent by every child about once a second from a thread of its own: the client's I/O thread
    declares a child that falls silent frozen (SIGSTOP, a deadlock that holds the interpreter)."""

    name: str


class Shutdown(_Msg):
    """Asks a child to leave its loop (sent by the parent on shutdown)."""


TOKENIZER_IN = Union[(GenerateBatch, AbortReq, Shutdown, ReqsDone, GroupDown, *CLIENT_CALLS)]
SCHEDULER_IN = Union[(TokenizedBatch, AbortReq, Shutdown, StepResult, Reply, *CLIENT_CALLS)]
WORKER_IN = Union[(ForwardPlan, SyncStep, Shutdown, *WORKER_CALLS)]
DETOKENIZER_IN = Union[TokenOutBatch, FreezeGC, Shutdown]
CLIENT_IN = Union[StrOutBatch, ReqError, Reply, ChildReady, ChildFailed, Heartbeat]
