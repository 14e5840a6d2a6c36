"""LLaVA on the worker (CLIP tower, projector, Llama text model, per-chunk image embeddings)
against HF transformers on a tiny random checkpoint (``tiny_llava_dir``; CPU, float32).

Prompts come from the checkpoint's own ``LlavaProcessor`` (``<image>`` expanded to 16 placeholder
tokens) and images from its CLIP image processor, so ids and pixels are what a user would send.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file, save_file

from kernel_helpers import Alloc, free_port

from treadle.gpu_worker import distributed
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.models.clip import CLIPVisionModel
from treadle.gpu_worker.models.llava import LlavaForConditionalGeneration as Ours
from treadle.runtime.messages import ForwardPlan, MmChunk, NewSlot, PlanRow, SamplingSpec

GREEDY = SamplingSpec(temperature=0.0)
KV_TOKENS = 512
_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_CUDA)])
def device(request) -> str:
    return request.param


def tol(device: str) -> float:
    return 1e-4 if device == "cpu" else 1e-3


@pytest.fixture(scope="module")
def hf(tiny_llava_dir):
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def processor(tiny_llava_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava_dir)


def make_runner(path: str, device: str = "cpu", **kw) -> ModelRunner:
    kw.setdefault("dtype", "float32")
    return ModelRunner(RunnerConfig(model_dir=path, device=device, kv_tokens=KV_TOKENS, max_slots=4,
                                    context_len=256, **kw))


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (40 + seed, 48, 3), dtype=np.uint8))


def encode(processor, text: str, seeds: list[int]) -> tuple[list[int], torch.Tensor]:
    """(input ids with expanded placeholders, pixel values [N, 3, 32, 32])."""
    out = processor(text=text, images=[image(s) for s in seeds], return_tensors="pt")
    return out["input_ids"][0].tolist(), out["pixel_values"].float()


ONE = "USER: <image>\nWhat is in the picture? ASSISTANT:"
TWO = "USER: <image> and <image>: which is brighter? ASSISTANT:"


def image_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of placeholder tokens: one per image, in order."""
    runs: list[tuple[int, int]] = []
    for p, t in enumerate(ids):
        if t == token:
            if runs and runs[-1][0] + runs[-1][1] == p:
                runs[-1] = (runs[-1][0], runs[-1][1] + 1)
            else:
                runs.append((p, 1))
    return runs


def prefill_row(slot: int, ids: list[int], pixels: torch.Tensor, token: int, lo: int, hi: int, locs: list[int],
                sent: set, sample: bool = True) -> PlanRow:
    """The row running positions [lo, hi) of a prompt, with a chunk for each image it overlaps;
    pixels go with an image's first chunk only (``sent`` remembers)."""
    mm = []
    for item, (off, n) in enumerate(image_runs(ids, token)):
        if off < hi and lo < off + n:
            px = pixels[item].numpy().tobytes() if item not in sent else b""
            mm.append(MmChunk(item, off, n, px, list(pixels[item].shape) if px else []))
            sent.add(item)
    return PlanRow(slot, ids[lo:hi], lo, locs, sample=sample, mm=mm)


@torch.no_grad()
def hf_logits(hf, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0, -1].float()


@torch.no_grad()
def hf_greedy(hf, ids: list[int], pixels: torch.Tensor, n: int) -> list[int]:
    out = hf.generate(input_ids=torch.tensor([ids]), pixel_values=pixels, attention_mask=torch.ones(1, len(ids)).long(),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def token_of(hf) -> int:
    return hf.config.image_token_index


# ---------------------------------------------------------------- the vision side
def test_tiny_checkpoint_is_what_a_user_has(tiny_llava_dir, processor, hf):
    from transformers import AutoImageProcessor, AutoTokenizer

    cfg = json.load(open(os.path.join(tiny_llava_dir, "config.json")))
    tok = AutoTokenizer.from_pretrained(tiny_llava_dir)
    assert cfg["architectures"] == ["LlavaForConditionalGeneration"] and cfg["image_seq_length"] == 16
    assert tok.convert_tokens_to_ids("<image>") == cfg["image_token_index"] == len(tok) - 1
    assert cfg["text_config"]["vocab_size"] == len(tok)
    pixels = AutoImageProcessor.from_pretrained(tiny_llava_dir)(image(0), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    ids, _ = encode(processor, TWO, [0, 1])
    assert [n for _, n in image_runs(ids, token_of(hf))] == [16, 16]


def test_clip_hidden_states_match_hf():
    from transformers import CLIPVisionConfig, CLIPVisionModel as HFClip

    cfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, initializer_range=0.1)
    torch.manual_seed(0)
    ref = HFClip(cfg).eval()
    ours = CLIPVisionModel(cfg)
    state = {f"vision_model.{k}": v for k, v in ref.state_dict().items() if "post_layernorm" not in k}
    ours.load_state_dict(state)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(px, output_hidden_states=True).hidden_states
        got = ours.hidden_states(px, [0, 1, -2, -1, 3])
    for g, i in zip(got, [0, 1, -2, -1, 3]):
        torch.testing.assert_close(g, want[i], atol=1e-5, rtol=0)
    short = CLIPVisionModel(cfg, num_layers=2)  # LLaVA builds only the layers it reads
    short.load_state_dict({k: v for k, v in state.items() if ".layers.2." not in k})
    with pytest.raises(ValueError, match="only 2 layers"):
        short.hidden_states(px, [-1])


@pytest.mark.parametrize("layers,select", [([-3, -1], "full"), (-2, "default"), (-4, "full")])
def test_feature_layers_and_strategies_match_hf(tiny_llava_dir, layers, select):
    """List-valued ``vision_feature_layer`` (concatenated) and ``full`` (CLS kept) against HF; the
    weights come as the HF model holds them in memory (transformers-5 names)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    cfg = LlavaConfig.from_pretrained(tiny_llava_dir)
    cfg.vision_feature_layer, cfg.vision_feature_select_strategy = layers, select
    torch.manual_seed(3)
    ref = LlavaForConditionalGeneration(cfg).eval()
    ours = Ours(cfg)
    ours.load_weights(ref.state_dict().items())
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = torch.stack(ref.get_image_features(pixel_values=px).pooler_output)
        got = ours.encode_images(px)
    assert got.shape == (2, 16 + (select == "full"), 64)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- prefill and decode against HF
@pytest.mark.parametrize("text,seeds", [(ONE, [0]), (TWO, [1, 2])])
def test_prefill_logits_match_hf(hf, processor, tiny_llava_dir, device, text, seeds):
    ids, px = encode(processor, text, seeds)
    runner = make_runner(tiny_llava_dir, device)
    row = prefill_row(0, ids, px, token_of(hf), 0, len(ids), Alloc(1, KV_TOKENS)(len(ids)), set())
    assert len(row.mm) == len(seeds)
    logits = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[row]))
    want = hf_logits(hf, ids, px)
    torch.testing.assert_close(logits[0].cpu(), want, atol=tol(device), rtol=0)
    # the image matters: other pixels, other logits
    other = hf_logits(hf, ids, torch.randn_like(px))
    assert (other - want).abs().max() > 100 * tol(device)
    assert len(runner.mm) == 0  # every image was covered: nothing kept


def test_chunked_prefill_inside_images_then_greedy_matches_hf(hf, processor, tiny_llava_dir, device):
    """Chunk boundaries inside both images; pixels travel with an image's first chunk only, later
    chunks reuse the kept embeddings, which are gone once the image's last position has run."""
    ids, px = encode(processor, TWO, [3, 4])
    runs = image_runs(ids, token_of(hf))
    (a0, n0), (a1, n1) = runs
    cuts = [0, a0 + 5, a0 + 11, a1 + 3, len(ids)]  # inside image 0 twice, then inside image 1
    runner, alloc, sent = make_runner(tiny_llava_dir, device), Alloc(2, KV_TOKENS), set()
    encodes = []
    encode_images = runner.mm.encode
    runner.mm.encode = lambda p: encodes.append(p.shape[0]) or encode_images(p)
    kept = []
    for step, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        last = hi == len(ids)
        row = prefill_row(0, ids, px, token_of(hf), lo, hi, alloc(hi - lo), sent, sample=last)
        plan = ForwardPlan(step=step, new_slots=[NewSlot(0, GREEDY)] if step == 0 else [], rows=[row])
        if last:
            logits = runner.forward_logits(plan)
        else:
            runner.forward(plan)
        kept.append(sorted(runner.mm.cache))
    assert kept == [[(0, 0)], [(0, 0)], [(0, 1)], []]
    assert encodes == [1, 1]  # each image once, on its first chunk
    torch.testing.assert_close(logits[0].cpu(), hf_logits(hf, ids, px), atol=tol(device), rtol=0)
    # greedy decoding from there (the chunked prefill's sample, then one-token rows)
    out = [int(logits[0].argmax())]
    for i in range(7):
        out += runner.forward(ForwardPlan(step=10 + i, rows=[PlanRow(0, [out[-1]], len(ids) + i, alloc(1))]))[0]
    want = hf_greedy(hf, ids, px, 8)
    assert out == want and len(set(want)) > 1


def test_batch_of_two_requests_with_different_images(hf, processor, tiny_llava_dir, device):
    (ids0, px0), (ids1, px1) = encode(processor, ONE, [5]), encode(processor, TWO, [6, 7])
    runner, alloc = make_runner(tiny_llava_dir, device), Alloc(3, KV_TOKENS)
    encodes = []
    encode_images = runner.mm.encode
    runner.mm.encode = lambda p: encodes.append(p.shape[0]) or encode_images(p)
    rows = [prefill_row(1, ids0, px0, token_of(hf), 0, len(ids0), alloc(len(ids0)), set()),
            prefill_row(3, ids1, px1, token_of(hf), 0, len(ids1), alloc(len(ids1)), set())]
    logits = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(1, GREEDY), NewSlot(3, GREEDY)], rows=rows))
    assert encodes == [3]  # one tower call for the step's three images of one shape
    torch.testing.assert_close(logits[0].cpu(), hf_logits(hf, ids0, px0), atol=tol(device), rtol=0)
    torch.testing.assert_close(logits[1].cpu(), hf_logits(hf, ids1, px1), atol=tol(device), rtol=0)


def test_text_only_prompt_on_llava_matches_hf(hf, tiny_llava_dir):
    ids = list(range(100, 130))
    logits = make_runner(tiny_llava_dir).forward_logits(
        ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, ids, 0, Alloc(4, KV_TOKENS)(30))]))
    with torch.no_grad():
        want = hf(input_ids=torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(logits[0], want, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- errors and the embedding cache
def test_bad_multimodal_rows_are_refused(hf, processor, tiny_llava_dir, tmp_path):
    ids, px = encode(processor, ONE, [8])
    off, n = image_runs(ids, token_of(hf))[0]
    runner, alloc = make_runner(tiny_llava_dir), Alloc(5, KV_TOKENS)
    pix = px[0].numpy().tobytes()

    def plan(chunk: MmChunk, slot: int = 0) -> ForwardPlan:
        return ForwardPlan(step=0, new_slots=[NewSlot(slot, GREEDY)],
                           rows=[PlanRow(slot, ids, 0, alloc(len(ids)), mm=[chunk])])

    with pytest.raises(ValueError, match="no pixels and no cached embeddings"):
        runner.forward(plan(MmChunk(0, off, n)))
    with pytest.raises(ValueError, match="15 placeholder tokens, but the image yields 16"):
        runner.forward(plan(MmChunk(0, off, 15, pix, [3, 32, 32])))
    with pytest.raises(ValueError, match="do not make a float32"):
        runner.forward(plan(MmChunk(0, off, n, pix[:-4], [3, 32, 32])))
    with pytest.raises(ValueError, match="does not overlap"):
        runner.forward(plan(MmChunk(0, len(ids) + 5, n, pix, [3, 32, 32])))
    with pytest.raises(ValueError, match="takes 32x32"):
        runner.forward(plan(MmChunk(0, off, n, np.zeros((3, 16, 16), np.float32).tobytes(), [3, 16, 16])))
    # a text-only model refuses image rows
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=len(processor.tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    text_only = make_runner(str(tmp_path))
    assert text_only.mm is None
    with pytest.raises(ValueError, match="takes text only"):
        text_only.forward(plan(MmChunk(0, off, n, pix, [3, 32, 32])))


def test_new_request_in_a_slot_drops_the_old_ones_images(hf, processor, tiny_llava_dir):
    ids, px = encode(processor, TWO, [9, 10])
    (a0, _), (a1, n1) = image_runs(ids, token_of(hf))
    runner, alloc, sent = make_runner(tiny_llava_dir), Alloc(6, KV_TOKENS), set()
    cut = a1 + n1 // 2  # the first chunk ends inside image 1: both encoded, image 1 kept
    runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(2, GREEDY), NewSlot(3, GREEDY)],
                               rows=[prefill_row(2, ids, px, token_of(hf), 0, cut, alloc(cut), sent, sample=False),
                                     prefill_row(3, ids, px, token_of(hf), 0, cut, alloc(cut), set(), sample=False)]))
    assert sorted(runner.mm.cache) == [(2, 1), (3, 1)]
    # slot 2's request went away (aborted) and a text-only one took the slot
    runner.forward(ForwardPlan(step=1, new_slots=[NewSlot(2, GREEDY)], rows=[PlanRow(2, [5, 6], 0, alloc(2))]))
    assert sorted(runner.mm.cache) == [(3, 1)]
    # its old item is gone: a chunk naming it without pixels is an error, not stale embeddings
    with pytest.raises(ValueError, match="no pixels"):
        runner.forward(ForwardPlan(step=2, rows=[prefill_row(2, ids, px, token_of(hf), cut, len(ids),
                                                             alloc(len(ids) - cut), sent)]))


# ---------------------------------------------------------------- loading
def test_dummy_load_format(hf, processor, tiny_llava_dir, tmp_path):
    shutil.copy(os.path.join(tiny_llava_dir, "config.json"), tmp_path)  # config only, no weights
    ids, px = encode(processor, ONE, [11])

    def run() -> torch.Tensor:
        runner = make_runner(str(tmp_path), load_format="dummy")
        row = prefill_row(0, ids, px, token_of(hf), 0, len(ids), Alloc(7, KV_TOKENS)(len(ids)), set())
        return runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[row]))

    a, b = run(), run()
    assert torch.equal(a, b) and torch.isfinite(a).all() and a.std() > 0


def _relayout(state: dict[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """The saved checkpoint's tensors under the hub's names or transformers 5's in-memory ones."""
    out = {}
    for name, t in state.items():
        if layout == "hub":
            name = name.replace("vision_tower.", "vision_tower.vision_model.", 1)
        elif name.startswith("language_model.lm_head."):
            name = name[len("language_model."):]
        elif name.startswith("language_model.model."):
            name = "model.language_model." + name[len("language_model.model."):]
        else:
            name = "model." + name
        out[name] = t
    if layout == "hub":  # old checkpoints also hold the position ids buffer
        out["vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    return out


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_both_checkpoint_layouts_load(hf, processor, tiny_llava_dir, tmp_path, layout):
    state = load_file(os.path.join(tiny_llava_dir, "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in state)  # what save_pretrained (5.24) writes
    assert any(k.startswith("vision_tower.embeddings.") for k in state)
    for name in os.listdir(tiny_llava_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_llava_dir, name), tmp_path)
    save_file(_relayout(state, layout), str(tmp_path / "model.safetensors"))
    ids, px = encode(processor, ONE, [12])
    runner = make_runner(str(tmp_path))
    assert runner.model.vision_tower.num_built_layers == 2  # feature layer -2 of 3: the last one is never read
    row = prefill_row(0, ids, px, token_of(hf), 0, len(ids), Alloc(8, KV_TOKENS)(len(ids)), set())
    logits = runner.forward_logits(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[row]))
    torch.testing.assert_close(logits[0], hf_logits(hf, ids, px), atol=1e-4, rtol=0)


def test_later_pipeline_stages_hold_no_vision_weights(monkeypatch, tiny_llava_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llava_dir)
    monkeypatch.setattr(distributed, "_PP_RANK", 1)
    monkeypatch.setattr(distributed, "_PP_SIZE", 2)
    last = Ours(cfg)
    assert last.vision_tower is None and last.multi_modal_projector is None
    names = load_file(os.path.join(tiny_llava_dir, "model.safetensors")).keys()
    read = [n for n in names if last.wants_tensor(n)]
    assert read and not any(n.startswith(("vision_tower.", "multi_modal_projector.")) for n in read)
    assert not any(".layers.0." in n for n in read) and "language_model.lm_head.weight" in read


# ---------------------------------------------------------------- tensor and pipeline parallelism (gloo)
def _parallel_worker(rank: int, path: str, port: int, out: str, kind: str, ids: list[int], pixels: bytes,
                     token: int, want: list[int]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    runner = make_runner(path, **({"tp_rank": rank, "tp_size": 2} if kind == "tp" else {"pp_rank": rank, "pp_size": 2}))
    px = torch.from_numpy(np.frombuffer(pixels, np.float32).reshape(-1, 3, 32, 32).copy())
    alloc, sent, cut = Alloc(9, KV_TOKENS), set(), image_runs(ids, token)[0][0] + 7
    runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)],
                               rows=[prefill_row(0, ids, px, token, 0, cut, alloc(cut), sent, sample=False)]))
    row = prefill_row(0, ids, px, token, cut, len(ids), alloc(len(ids) - cut), sent)
    logits = runner.forward_logits(ForwardPlan(step=1, rows=[row]))
    toks = []
    for i, prev in enumerate(want[:-1]):  # decode HF's tokens (the scheduler sends every rank the sampled ones)
        toks += runner.forward(ForwardPlan(step=2 + i, rows=[PlanRow(0, [prev], len(ids) + i, alloc(1))]))[0]
    if runner.reports:
        torch.save({"logits": logits, "toks": toks, "vision": runner.model.vision_tower is not None}, out)
    elif kind == "pp":
        assert runner.model.vision_tower is not None and runner.mm is not None  # the first stage encodes
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["tp", "pp"])
def test_parallel_2_matches_hf(hf, processor, tiny_llava_dir, tmp_path, kind):
    ids, px = encode(processor, TWO, [13, 14])
    want = hf_greedy(hf, ids, px, 4)
    out = str(tmp_path / "out.pt")
    mp.start_processes(_parallel_worker, nprocs=2, start_method="spawn",
                       args=(tiny_llava_dir, free_port(), out, kind, ids, px.numpy().tobytes(), token_of(hf), want))
    got = torch.load(out)
    torch.testing.assert_close(got["logits"][0], hf_logits(hf, ids, px), atol=1e-4, rtol=0)
    assert int(got["logits"][0].argmax()) == want[0] and got["toks"] == want[1:]
    assert got["vision"] == (kind == "tp")  # pp: the reporting rank is the last stage, which has no tower
