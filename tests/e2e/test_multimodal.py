"""Multimodal input (LLaVA) end to end: ``image_data`` / ``video_data`` against HF transformers.

One engine (``mm_engine``) serves the tiny random LLaVA checkpoint (``tiny_llava_dir``: 32x32
images, 16 placeholder tokens each, float32 on CPU) with ``chunked_prefill_size=12``, so every
image of these prompts is cut by a chunk boundary. The reference is HF's
``LlavaForConditionalGeneration`` on the same checkpoint, greedy, with the placeholder expansion
the engine promises: each ``<image>`` becomes 16 copies of ``image_token_index``; a prompt without
placeholders gets one per image at its start, then the tokenizer's "\\n"; a video is 4 sampled
frames, each an image whose placeholders follow the images'.

The prefix cache is shared by the whole module, so every test starts its prompts with text of its
own (or asserts only on what a repeat of its own request must hit).
"""

from __future__ import annotations

import asyncio
import base64
import io
import pathlib

import numpy as np
import pytest
import torch

from local_http import PROXY_VARS, closed_port, local_http_server
from media_files import write_video
from treadle import Engine

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from treadle.runtime.messages import MediaRef  # noqa: E402
from treadle.tokenizer_proc.media import load_video_frames  # noqa: E402
from treadle.tokenizer_proc.multimodal import VIDEO_FRAMES  # noqa: E402

pytestmark = pytest.mark.e2e

N = 8
GREEDY = {"temperature": 0, "max_new_tokens": N, "ignore_eos": True}
CHUNK = 12
PER_IMAGE = 16


# ------------------------------------------------------------------ media
def picture(seed: int, w: int = 48, h: int = 40) -> "Image.Image":
    """Random RGB noise (not square: the processor resizes and crops it to 32x32)."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def video_frames(path) -> list:
    """The frames the engine samples from a video (the same function, so the same pixels)."""
    return load_video_frames(MediaRef(source=str(path)), "video_data[0]", VIDEO_FRAMES)


@pytest.fixture
def http_server():
    with local_http_server() as served:
        yield served


# ------------------------------------------------------------------ engine and reference
@pytest.fixture(scope="module")
def mm_engine(tiny_llava_dir):
    # The tokenizer process fetches URLs with the environment it started with: no proxy for localhost.
    with pytest.MonkeyPatch.context() as mp:
        for var in PROXY_VARS:
            mp.delenv(var, raising=False)
        eng = Engine(model_path=tiny_llava_dir, random_seed=0, chunked_prefill_size=CHUNK)
    yield eng
    eng.shutdown()


class HFRef:
    """HF's LLaVA on the same checkpoint, and the engine's placeholder expansion rule."""

    def __init__(self, model_dir: str) -> None:
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        self.model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.proc = AutoProcessor.from_pretrained(model_dir)
        self.tok = self.proc.tokenizer
        self.image_id = self.model.config.image_token_index
        self.newline = self.tok.encode("\n", add_special_tokens=False)

    def ids(self, text: str, n_images: int = 0) -> list[int]:
        """Prompt ids as the engine builds them: ``n_images`` placeholders and "\\n" in front when the
        text has none, then each placeholder expanded to 16 copies."""
        ids = self.tok.encode(text)
        if n_images and self.image_id not in ids:
            ids = [self.image_id] * n_images + self.newline + ids
        out: list[int] = []
        for t in ids:
            out += [t] * PER_IMAGE if t == self.image_id else [t]
        return out

    def spans(self, ids: list[int]) -> list[tuple[int, int]]:
        """``(offset, end)`` of each image's run of placeholders."""
        marks = [i for i, t in enumerate(ids) if t == self.image_id]
        assert len(marks) % PER_IMAGE == 0
        return [(marks[k], marks[k] + PER_IMAGE) for k in range(0, len(marks), PER_IMAGE)]

    def pixels(self, images: list) -> torch.Tensor:
        return self.proc.image_processor(images, return_tensors="pt")["pixel_values"].float()

    @torch.no_grad()
    def greedy(self, ids: list[int], images: list, n: int = N) -> tuple[list[int], list[float]]:
        """HF's greedy continuation and the log-softmax of each chosen token."""
        kw = {"pixel_values": self.pixels(images)} if images else {}
        out = self.model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                                  output_logits=True, return_dict_in_generate=True, **kw)
        toks = out.sequences[0, len(ids):].tolist()
        lps = [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, toks)]
        return toks, lps

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], images: list) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1."""
        logits = self.model(input_ids=torch.tensor([ids]), pixel_values=self.pixels(images)).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def ref(tiny_llava_dir) -> HFRef:
    return HFRef(tiny_llava_dir)


def assert_matches_hf(res: dict, ref: HFRef, ids: list[int], images: list) -> list[int]:
    """The engine's greedy tokens are HF's on the same ids and images; returns them."""
    want, _ = ref.greedy(ids, images)
    assert res["meta_info"]["prompt_tokens"] == len(ids)
    assert res["output_ids"] == want
    assert len(set(want)) > 1  # not a degenerate repetition that any input would give
    return want


# ------------------------------------------------------------------ 1. one image
def test_one_image_without_placeholder_matches_hf(mm_engine, ref):
    prompt = "Describe this image in detail"
    im = picture(1)
    ids = ref.ids(prompt, 1)
    # no placeholder: one at the start, then the tokenizer's "\n", i.e. HF's processor on "<image>\n" + prompt
    assert ids[:PER_IMAGE] == [ref.image_id] * PER_IMAGE and ids[PER_IMAGE:PER_IMAGE + len(ref.newline)] == ref.newline
    assert ref.proc(text="<image>\n" + prompt, images=[im])["input_ids"][0] == ids
    assert len(ids) == len(ref.tok.encode(prompt)) + PER_IMAGE + len(ref.newline)

    res = mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY, return_logprob=True)
    meta = res["meta_info"]
    assert meta["image_tokens"] == PER_IMAGE and "video_tokens" not in meta
    assert meta["prompt_tokens"] == len(ids) and meta["completion_tokens"] == N
    want, lps = ref.greedy(ids, [im])
    assert res["output_ids"] == want and len(set(want)) > 1
    got = meta["output_token_logprobs"]
    assert [t for _, t, _ in got] == want
    assert max(abs(g - w) for (g, _, _), w in zip(got, lps)) < 1e-4, (got, lps)

    # input logprobs over the whole prompt, placeholder positions included (a whole, unchunked prefill)
    res = mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY, return_logprob=True,
                             logprob_start_len=0)
    inp = res["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in inp] == ids and inp[0][0] is None
    assert max(abs(g - w) for (g, _, _), w in zip(inp[1:], ref.prompt_logprobs(ids, [im]))) < 1e-4
    assert res["output_ids"] == want

    # the picture matters: another one gives HF's other answer
    other = mm_engine.generate(prompt=prompt, image_data=picture(2), sampling_params=GREEDY)
    assert other["output_ids"] == ref.greedy(ids, [picture(2)])[0] != want


# ------------------------------------------------------------------ 2. several images, placeholders
def test_two_images_with_placeholders_and_mismatch(mm_engine, ref):
    text = "USER: <image> and <image>: which is brighter? ASSISTANT:"
    a, b = picture(3), picture(4)
    ids = ref.ids(text)
    assert ids == ref.proc(text=text, images=[a, b])["input_ids"][0]
    res = mm_engine.generate(prompt=text, image_data=[a, b], sampling_params=GREEDY)
    assert res["meta_info"]["image_tokens"] == 2 * PER_IMAGE
    want = assert_matches_hf(res, ref, ids, [a, b])
    # order matters: the first image goes to the first placeholder
    swapped = mm_engine.generate(prompt=text, image_data=[b, a], sampling_params=GREEDY)
    assert swapped["output_ids"] == ref.greedy(ids, [b, a])[0] != want
    # the same picture twice in one prompt
    twice = mm_engine.generate(prompt=text, image_data=[a, a], sampling_params=GREEDY)
    assert_matches_hf(twice, ref, ids, [a, a])
    # input_ids with one placeholder per image are expanded the same way
    by_ids = mm_engine.generate(input_ids=ref.tok.encode(text), image_data=[a, b], sampling_params=GREEDY)
    assert by_ids["output_ids"] == want and by_ids["meta_info"]["prompt_tokens"] == len(ids)

    with pytest.raises(ValueError, match=r"^image_data: the prompt has 2 image placeholder\(s\) but 1 image"):
        mm_engine.generate(prompt=text, image_data=a, sampling_params=GREEDY)
    with pytest.raises(ValueError, match=r"^image_data: the prompt has 2 image placeholder\(s\) but 3 image"):
        mm_engine.generate(prompt=text, image_data=[a, b, a], sampling_params=GREEDY)
    with pytest.raises(ValueError, match=r"^image_data: the prompt has 1 image placeholder\(s\) but 2 image"):
        mm_engine.generate(prompt="One <image> only", image_data=[a, b], sampling_params=GREEDY)
    # still serving
    assert mm_engine.generate(prompt=text, image_data=[a, b], sampling_params=GREEDY)["output_ids"] == want


# ------------------------------------------------------------------ 3. sources
def test_every_source_kind_gives_the_same_output(mm_engine, ref, tmp_path, monkeypatch, http_server):
    url, routes = http_server
    im = picture(5)
    data = png_bytes(im)
    path = tmp_path / "my picture.png"  # a space: file:// URLs percent-encode it
    path.write_bytes(data)
    routes["/pic.png"] = (data, 0)
    b64 = base64.b64encode(data).decode()
    monkeypatch.chdir(tmp_path)
    prompt = "Sources: what is shown?"
    ids = ref.ids(prompt, 1)
    want, _ = ref.greedy(ids, [im])
    sources = {
        "str path": str(path), "Path": path, "relative str": "my picture.png",
        "relative Path": pathlib.Path("my picture.png"), "file URL": path.as_uri(),
        "data URL": f"data:image/png;base64,{b64}", "bare base64": b64,
        "wrapped base64": base64.encodebytes(data).decode(), "bytes": data, "bytearray": bytearray(data),
        "PIL": im, "http URL": f"{url}/pic.png",
    }
    for i, (kind, src) in enumerate(sources.items()):
        res = mm_engine.generate(prompt=prompt, image_data=src, sampling_params=GREEDY)
        assert res["output_ids"] == want, kind
        assert res["meta_info"]["image_tokens"] == PER_IMAGE and res["meta_info"]["prompt_tokens"] == len(ids), kind
        if i:  # the cache keys on the pixels, not on where they came from
            assert res["meta_info"]["cached_tokens"] == len(ids) - 1, kind
    assert len(set(want)) > 1


def test_source_errors_name_the_field_and_the_engine_keeps_serving(mm_engine, ref, tmp_path, http_server):
    url, routes = http_server
    text_file = tmp_path / "notes.txt"
    text_file.write_text("these are notes, not a picture\n" * 20)
    prompt = "Errors: what is shown?"
    im = picture(6)
    want, _ = ref.greedy(ref.ids(prompt, 1), [im])
    cases = [
        (str(tmp_path / "missing.png"), r"^image_data\b.*file not found"),
        (tmp_path / "missing.png", r"^image_data\b.*file not found"),
        (str(text_file), r"^image_data\b.*not an image"),
        (text_file.read_bytes(), r"^image_data\b.*not an image"),
        (f"http://127.0.0.1:{closed_port()}/pic.png", r"^image_data\b.*unreachable URL"),
        (f"{url}/nothing-here.png", r"^image_data\b.*HTTP error 404"),
        ("ftp://example.com/pic.png", r"^image_data\b.*unsupported URL scheme"),
        ("data:image/png;base64,@@@@", r"^image_data\b.*base64"),
    ]
    for src, msg in cases:
        with pytest.raises(ValueError, match=msg):
            mm_engine.generate(prompt=prompt, image_data=src, sampling_params=GREEDY)
        # the engine keeps serving, with the right answer
        assert mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY)["output_ids"] == want, src
    # one bad image of a batch fails the whole call (nothing runs), and serving goes on
    with pytest.raises(ValueError, match=r"file not found"):
        mm_engine.generate(prompt=[prompt, prompt], image_data=[im, str(tmp_path / "missing.png")],
                           sampling_params=GREEDY)
    with pytest.raises(ValueError, match=r"^video_data\b.*not a video"):
        mm_engine.generate(prompt=prompt, video_data=str(text_file), sampling_params=GREEDY)
    with pytest.raises(TypeError, match=r"^image_data: expected a path"):
        mm_engine.generate(prompt=prompt, image_data=42, sampling_params=GREEDY)
    assert mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY)["output_ids"] == want


# ------------------------------------------------------------------ 4. batches
def test_batch_with_per_prompt_images(mm_engine, ref):
    a, b, c = picture(7), picture(8), picture(9)
    prompts = ["Batch one: describe it", "Batch two: no picture here", "Batch three: compare <image> with <image>."]
    res = mm_engine.generate(prompt=prompts, image_data=[a, None, [b, c]], sampling_params=GREEDY)
    assert len(res) == 3
    assert_matches_hf(res[0], ref, ref.ids(prompts[0], 1), [a])
    assert_matches_hf(res[1], ref, ref.ids(prompts[1]), [])
    assert_matches_hf(res[2], ref, ref.ids(prompts[2]), [b, c])
    assert [r["meta_info"].get("image_tokens") for r in res] == [PER_IMAGE, None, 2 * PER_IMAGE]

    with pytest.raises(ValueError, match=r"^image_data has 2 entries but the batch has 3 prompts"):
        mm_engine.generate(prompt=prompts, image_data=[a, b], sampling_params=GREEDY)
    with pytest.raises(TypeError, match=r"^image_data: a batch of 3 prompts needs a list"):
        mm_engine.generate(prompt=prompts, image_data=a, sampling_params=GREEDY)

    # n = 2 with an image: both samples get it (greedy: both are HF's answer)
    pair = mm_engine.generate(prompt="Parallel: <image> what?", image_data=a, sampling_params={**GREEDY, "n": 2})
    assert len(pair) == 2
    want, _ = ref.greedy(ref.ids("Parallel: <image> what?"), [a])
    assert [r["output_ids"] for r in pair] == [want, want]
    assert [r["meta_info"]["image_tokens"] for r in pair] == [PER_IMAGE, PER_IMAGE]
    # n = 2 sampled, over a batch with images: each prompt's samples carry that prompt's images
    sampled = mm_engine.generate(prompt=["Sampled <image>", "Sampled text"], image_data=[b, None],
                                 sampling_params={"temperature": 1.0, "max_new_tokens": 4, "n": 2})
    assert len(sampled) == 4
    assert [r["meta_info"].get("image_tokens") for r in sampled] == [PER_IMAGE, PER_IMAGE, None, None]
    assert [r["meta_info"]["prompt_tokens"] for r in sampled] == \
        [len(ref.ids("Sampled <image>"))] * 2 + [len(ref.ids("Sampled text"))] * 2


# ------------------------------------------------------------------ 5. video
@pytest.fixture(scope="module")
def video_path(tmp_path_factory) -> pathlib.Path:
    p = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(p, 12)
    return p


def test_video_is_four_frames(mm_engine, ref, video_path):
    frames = video_frames(video_path)
    assert len(frames) == VIDEO_FRAMES == 4
    assert len({f.tobytes() for f in frames}) == 4  # distinct frames
    prompt = "Describe what happens in this video"
    ids = ref.ids(prompt, VIDEO_FRAMES)
    res = mm_engine.generate(prompt=prompt, video_data=str(video_path), sampling_params=GREEDY)
    meta = res["meta_info"]
    assert meta["video_tokens"] == VIDEO_FRAMES * PER_IMAGE == 64 and "image_tokens" not in meta
    want = assert_matches_hf(res, ref, ids, frames)
    # the same from bytes
    again = mm_engine.generate(prompt=prompt, video_data=video_path.read_bytes(), sampling_params=GREEDY)
    assert again["output_ids"] == want and again["meta_info"]["cached_tokens"] == len(ids) - 1

    # an image and a video: the image's placeholder first, then the frames'
    im = picture(10)
    both = mm_engine.generate(prompt="Video and image: compare", image_data=im, video_data=video_path,
                              sampling_params=GREEDY)
    assert both["meta_info"]["image_tokens"] == PER_IMAGE and both["meta_info"]["video_tokens"] == 64
    assert_matches_hf(both, ref, ref.ids("Video and image: compare", 1 + VIDEO_FRAMES), [im] + frames)
    # explicit placeholders: one for the image, four for the video
    text = "Here <image> is a still, and <image><image><image><image> the clip."
    expl = mm_engine.generate(prompt=text, image_data=im, video_data=video_path, sampling_params=GREEDY)
    assert_matches_hf(expl, ref, ref.ids(text), [im] + frames)
    with pytest.raises(ValueError, match=r"^video_data: the prompt has 1 image placeholder\(s\) but 4"):
        mm_engine.generate(prompt="Clip <image>", video_data=video_path, sampling_params=GREEDY)


# ------------------------------------------------------------------ 6. prefix cache
def test_prefix_cache_keys_on_the_image(mm_engine, ref):
    text = "Cache test: <image>\nWhat do you see? ASSISTANT:"
    a, b = picture(11), picture(12)
    ids = ref.ids(text)
    (start, end), = ref.spans(ids)
    assert start > 0
    first = mm_engine.generate(prompt=text, image_data=a, sampling_params=GREEDY)
    want_a = assert_matches_hf(first, ref, ids, [a])
    again = mm_engine.generate(prompt=text, image_data=a, sampling_params=GREEDY)
    assert again["output_ids"] == want_a
    assert again["meta_info"]["cached_tokens"] == len(ids) - 1  # all but the one that must run to sample
    other = mm_engine.generate(prompt=text, image_data=b, sampling_params=GREEDY)
    assert other["meta_info"]["cached_tokens"] < end  # never into another picture's KV
    assert other["meta_info"]["cached_tokens"] == start  # the shared text before it is reused
    want_b = assert_matches_hf(other, ref, ids, [b])
    assert want_b != want_a

    # a prompt that ends with its image: the repeat reuses all but the image's last position,
    # which runs again from the image's (re-encoded) embeddings
    tail = "Cache tail: look at this <image>"
    tail_ids = ref.ids(tail)
    assert tail_ids[-1] == ref.image_id
    r1 = mm_engine.generate(prompt=tail, image_data=a, sampling_params=GREEDY)
    want_t = assert_matches_hf(r1, ref, tail_ids, [a])
    r2 = mm_engine.generate(prompt=tail, image_data=a, sampling_params=GREEDY)
    assert r2["meta_info"]["cached_tokens"] == len(tail_ids) - 1 and r2["output_ids"] == want_t
    r3 = mm_engine.generate(prompt=tail, image_data=b, sampling_params=GREEDY)
    assert r3["meta_info"]["cached_tokens"] == ref.spans(tail_ids)[0][0]
    assert_matches_hf(r3, ref, tail_ids, [b])


# ------------------------------------------------------------------ 7. chunked prefill
def test_chunk_boundaries_inside_images(mm_engine, ref):
    assert mm_engine.server_args.chunked_prefill_size == CHUNK
    text = "Chunked seven: <image>, then <image>, and last <image>. Which?"
    ims = [picture(13), picture(14), picture(15)]
    ids = ref.ids(text)
    spans = ref.spans(ids)
    assert len(spans) == 3 and len(ids) > 4 * CHUNK
    for s, e in spans:  # with nothing cached, every image is cut by a chunk boundary
        assert any(s < k < e for k in range(0, len(ids), CHUNK))
    res = mm_engine.generate(prompt=text, image_data=ims, sampling_params=GREEDY)
    assert res["meta_info"]["cached_tokens"] == 0 and res["meta_info"]["image_tokens"] == 48
    assert_matches_hf(res, ref, ids, ims)
    # two such prompts at once: one chunked request at a time, each image's embeddings kept per request
    text2 = "Chunked seven bis: <image> <image> <image>?"
    ims2 = [picture(16), picture(17), picture(18)]
    both = mm_engine.generate(prompt=[text, text2], image_data=[ims[::-1], ims2], sampling_params=GREEDY)
    assert_matches_hf(both[0], ref, ids, ims[::-1])
    assert_matches_hf(both[1], ref, ref.ids(text2), ims2)

    # aborted while prefilling: its computed KV (which may stop inside an image) goes into the
    # cache; the repeat reuses it and recomputes the rest of that image from its pixels
    text3 = "Chunked seven ter: <image> and <image> and <image> and <image> end"
    ims3 = [picture(60 + i) for i in range(4)]
    ids3 = ref.ids(text3)

    async def aborted():
        task = asyncio.ensure_future(mm_engine.async_generate(prompt=text3, image_data=ims3, sampling_params=GREEDY,
                                                              rid="chunked-abort"))
        await asyncio.sleep(0)
        mm_engine.abort_request("chunked-abort")
        return await task

    first = asyncio.run(aborted())
    assert first["meta_info"]["finish_reason"]["type"] in ("abort", "length")
    again = mm_engine.generate(prompt=text3, image_data=ims3, sampling_params=GREEDY)
    assert again["meta_info"]["cached_tokens"] <= len(ids3) - 1
    assert_matches_hf(again, ref, ids3, ims3)


# ------------------------------------------------------------------ 8. sessions
def test_session_turns_carry_the_image(mm_engine, ref):
    sid = mm_engine.open_session(capacity_of_str_len=4096)
    im, im2 = picture(19), picture(20)
    turn1 = "USER: Session <image>\nWhat is it? ASSISTANT:"
    t1 = mm_engine.generate(prompt=turn1, image_data=im, sampling_params=GREEDY, session_params={"id": sid})
    ids1 = ref.ids(turn1)
    assert_matches_hf(t1, ref, ids1, [im])

    turn2 = " USER: Tell me more. ASSISTANT:"
    t2 = mm_engine.generate(prompt=turn2, sampling_params=GREEDY, session_params={"id": sid})
    full2 = ids1 + t1["output_ids"] + ref.tok.encode(turn2)
    assert_matches_hf(t2, ref, full2, [im])  # the turn-1 image still in the context
    assert t2["meta_info"]["image_tokens"] == PER_IMAGE
    assert t2["meta_info"]["cached_tokens"] >= len(ids1) + N - 1

    turn3 = " USER: And this one: <image>? ASSISTANT:"
    t3 = mm_engine.generate(prompt=turn3, image_data=im2, sampling_params=GREEDY, session_params={"id": sid})
    full3 = full2 + t2["output_ids"] + ref.ids(turn3)
    assert_matches_hf(t3, ref, full3, [im, im2])
    assert t3["meta_info"]["image_tokens"] == 2 * PER_IMAGE

    # branching from turn 1 at an offset that cuts its image is refused
    s, _ = ref.spans(ids1)[0]
    with pytest.raises(ValueError, match="cuts an image"):
        mm_engine.generate(prompt=turn2, sampling_params=GREEDY,
                           session_params={"id": sid, "rid": t1["meta_info"]["id"], "offset": s + 3})
    mm_engine.close_session(sid)
    assert mm_engine._check_integrity()["locked_pages"] == 0


# ------------------------------------------------------------------ 9. async and streaming
def test_async_and_streaming_with_an_image(mm_engine, ref):
    prompt = "Async: <image> what now?"
    im = picture(21)
    want, _ = ref.greedy(ref.ids(prompt), [im])
    full = mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY)
    assert full["output_ids"] == want

    async def run():
        res = await mm_engine.async_generate(prompt=prompt, image_data=im, sampling_params=GREEDY)
        gen = await mm_engine.async_generate(prompt=prompt, image_data=im, sampling_params=GREEDY, stream=True)
        chunks = [c async for c in gen]
        return res, chunks

    res, achunks = asyncio.run(run())
    assert res["output_ids"] == want and res["text"] == full["text"]
    chunks = list(mm_engine.generate(prompt=prompt, image_data=im, sampling_params=GREEDY, stream=True))
    for cs in (chunks, achunks):
        assert "".join(c["text"] for c in cs) == full["text"]
        assert [t for c in cs for t in c["output_ids"]] == want
        assert all(c["meta_info"]["image_tokens"] == PER_IMAGE for c in cs)
        assert cs[-1]["meta_info"]["finish_reason"]["type"] == "length"


# ------------------------------------------------------------------ 10. refused inputs
def test_audio_is_refused(mm_engine):
    with pytest.raises(ValueError, match="^audio_data"):
        mm_engine.generate(prompt="Hear this", audio_data="clip.wav", sampling_params=GREEDY)


def test_text_only_model_refuses_media(engine, video_path):
    with pytest.raises(ValueError, match=r"^image_data: this model .*takes no images"):
        engine.generate(prompt="What is this?", image_data=picture(0), sampling_params={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"^video_data: this model"):
        engine.generate(prompt="What is this?", video_data=str(video_path), sampling_params={"max_new_tokens": 2})
    with pytest.raises(ValueError, match=r"^image_data"):
        engine.generate(prompt=["a", "b"], image_data=[None, picture(0)], sampling_params={"max_new_tokens": 2})
    assert engine.generate(prompt="Hello", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


# ------------------------------------------------------------------ 11. the usage guide
def test_usage_guide_multimodal_examples(tiny_llava_dir, tmp_path, monkeypatch, video_path):
    """USAGE_GUIDE.md "Multimodal Inputs", as written; only model_path changed, and the first
    example uses a local path (as its comment allows) in a directory holding the files."""
    picture(30, 64, 64).save(tmp_path / "image.jpg")
    picture(31, 50, 40).save(tmp_path / "image1.jpg")
    picture(32, 40, 50).save(tmp_path / "image2.jpg")
    (tmp_path / "video.mp4").write_bytes(video_path.read_bytes())
    monkeypatch.chdir(tmp_path)

    engine = Engine(model_path=tiny_llava_dir)
    try:
        response = engine.generate(
            prompt="Describe this image in detail",
            image_data="image.jpg",  # or local path
            sampling_params={"max_new_tokens": 200}
        )

        print(response["text"])
        assert isinstance(response["text"], str) and response["meta_info"]["image_tokens"] == PER_IMAGE
        assert 1 <= response["meta_info"]["completion_tokens"] <= 200

        response = engine.generate(
            prompt="Compare these two images",
            image_data=[
                "image1.jpg",
                "image2.jpg"
            ],
            sampling_params={"max_new_tokens": 300}
        )
        assert isinstance(response["text"], str) and response["meta_info"]["image_tokens"] == 2 * PER_IMAGE
        assert 1 <= response["meta_info"]["completion_tokens"] <= 300

        response = engine.generate(
            prompt="Describe what happens in this video",
            video_data="video.mp4",
            sampling_params={"max_new_tokens": 300}
        )
        assert isinstance(response["text"], str) and response["meta_info"]["video_tokens"] == 64
        assert 1 <= response["meta_info"]["completion_tokens"] <= 300
    finally:
        engine.shutdown()


# ------------------------------------------------------------------ error messages of a batch
def test_batch_load_error_names_the_batch_entry(mm_engine, tmp_path):
    """A picture that cannot be loaded is named by its place in the call's ``image_data``, as the
    client's own checks name it (``image_data[1]`` for the second prompt's single item,
    ``image_data[1][0]`` for the first of its list), not by its place in its prompt's list."""
    ok = tmp_path / "ok.png"
    ok.write_bytes(png_bytes(picture(40)))
    missing = str(tmp_path / "missing.png")
    # the client's type check names the batch entry
    with pytest.raises(TypeError, match=r"^image_data\[1\]: expected"):
        mm_engine.generate(prompt=["Batch err A", "Batch err B"], image_data=[str(ok), 7], sampling_params=GREEDY)
    # ...and so should the loading error of the same entry
    with pytest.raises(ValueError) as err:
        mm_engine.generate(prompt=["Batch err A", "Batch err B"], image_data=[str(ok), missing], sampling_params=GREEDY)
    assert "file not found" in str(err.value)
    assert str(err.value).startswith("image_data[1]"), str(err.value)


# ------------------------------------------------------------------ chunked images under memory pressure
def test_chunked_images_under_memory_pressure(tiny_llava_dir, ref):
    """Six 21-token image prompts making 40 tokens each, four at a time, in a 160-token KV pool
    with 12-token chunks: running requests must be retracted (and later recomputed, images and
    all) to make room, and every answer is still HF's. Without chunking (``chunked_prefill_size=-1``)
    this passes; with it, the scheduler dies: a continuing chunk asks the pool for pages it does not
    have (``MemoryError: asked for 12 KV pages, 8 free``) and every request gets ``EngineDeadError``."""
    texts = [f"Pressure {i}: <image> go" for i in range(6)]
    ims = [picture(50 + i) for i in range(6)]
    params = {"temperature": 0, "max_new_tokens": 40, "ignore_eos": True}
    with Engine(model_path=tiny_llava_dir, random_seed=0, chunked_prefill_size=CHUNK, max_total_tokens=160,
                max_running_requests=4) as eng:
        async def run():
            return await asyncio.gather(*[eng.async_generate(prompt=t, image_data=im, sampling_params=params)
                                          for t, im in zip(texts, ims)], return_exceptions=True)

        results = asyncio.run(run())
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, f"{type(errors[0]).__name__}: {errors[0]}"
        for res, text, im in zip(results, texts, ims):
            assert res["output_ids"] == ref.greedy(ref.ids(text), [im], n=40)[0], text
        state = eng._check_integrity()
        assert state["retractions"] > 0 and state["num_running"] == 0
