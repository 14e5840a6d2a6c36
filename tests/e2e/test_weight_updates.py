"""``update_weights_from_disk`` (issue 26): a trainer's new checkpoint into the running engine.

The trainer's part is played by plain torch: every weight of the default model perturbed and
saved as a new checkpoint. After the update the engine's greedy tokens must be transformers' on
the perturbed weights; a broken checkpoint must leave the old weights serving; a request running
during the update finishes, and ``meta_info.weight_version`` says which weights served it."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0, "max_new_tokens": 8}
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CONFIGS = ("config.json", "generation_config.json")


def checkpoint(src: str, dst, change) -> str:
    """A copy of ``src``'s model with its tensors passed through ``change`` (a trainer's step)."""
    os.makedirs(dst, exist_ok=True)
    for name in CONFIGS:
        os.symlink(os.path.join(src, name), os.path.join(dst, name))
    tensors = load_file(os.path.join(src, "model.safetensors"))
    save_file(change(tensors), os.path.join(dst, "model.safetensors"))
    return str(dst)


def perturbed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: (v.float() * (1 + 0.05 * torch.randn(v.shape, generator=g))).to(v.dtype).contiguous()
            for k, v in tensors.items()}


@pytest.fixture(scope="module")
def updatable(default_model_dir):
    """An engine of its own: these tests change its weights."""
    from treadle import Engine

    eng = Engine(model_path=default_model_dir, random_seed=0)
    yield eng
    eng.shutdown()


def hf_reference(model_dir: str, hf_tokenizer) -> list[tuple[list[int], list[float]]]:
    """transformers' greedy tokens of PROMPTS and their logprobs on the checkpoint in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for p in PROMPTS:
        ids = hf_tokenizer(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True)
        toks = gen.sequences[0, ids.shape[1]:].tolist()
        out.append((toks, [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(gen.scores, toks)]))
    return out


def assert_matches_hf(results: list[dict], reference: list[tuple[list[int], list[float]]]) -> None:
    """Greedy tokens equal, logprobs within 1e-4 (results generated with ``return_logprob=True``)."""
    for r, (toks, lps) in zip(results, reference):
        assert r["output_ids"] == toks
        got = [lp for lp, _, _ in r["meta_info"]["output_token_logprobs"]]
        assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4


def ids_of(engine) -> list[list[int]]:
    return [r["output_ids"] for r in engine.generate(prompt=PROMPTS, sampling_params=GREEDY)]


def test_new_weights_give_transformers_tokens_and_the_old_ones_come_back(updatable, default_model_dir,
                                                                          hf_tokenizer, tmp_path):
    before = ids_of(updatable)
    new_dir = checkpoint(default_model_dir, tmp_path / "step1", perturbed)
    ok, message, paused = updatable.update_weights_from_disk(new_dir)
    assert (ok, paused) == (True, 0), message
    after = updatable.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)
    assert_matches_hf(after, hf_reference(new_dir, hf_tokenizer))
    assert [r["output_ids"] for r in after] != before
    assert {r["meta_info"]["weight_version"] for r in after} == {"1"}
    ok, message, _ = updatable.update_weights_from_disk(default_model_dir, weight_version="base")
    assert ok, message
    res = updatable.generate(prompt=PROMPTS, sampling_params=GREEDY)
    assert [r["output_ids"] for r in res] == before  # the prefix cache held no stale KV either
    assert res[0]["meta_info"]["weight_version"] == "base"


@pytest.mark.parametrize("broken,words", [
    (lambda t: {k: v for k, v in t.items() if "layers.3.mlp.down_proj" not in k}, "lacks"),
    (lambda t: {**t, "model.layers.0.self_attn.q_proj.weight": t["model.layers.0.self_attn.q_proj.weight"][:8]},
     "shape|size"),
])
def test_a_broken_checkpoint_leaves_the_old_weights_serving(updatable, default_model_dir, tmp_path, broken, words):
    before = ids_of(updatable)
    version = updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"]
    ok, message, _ = updatable.update_weights_from_disk(checkpoint(default_model_dir, tmp_path / "bad", broken))
    assert not ok and "old weights are still served" in message
    import re
    assert re.search(words, message), message
    assert ids_of(updatable) == before
    assert updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"] == version
    with pytest.raises(ValueError, match="load_format"):
        updatable.update_weights_from_disk(default_model_dir, load_format="gguf")


def test_a_running_request_finishes_on_the_old_weights(updatable, default_model_dir, tmp_path):
    new_dir = checkpoint(default_model_dir, tmp_path / "step2", perturbed)
    old = updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"]
    results = {}
    t = threading.Thread(target=lambda: results.update(long=updatable.generate(
        prompt="Tell me a long story", sampling_params={"temperature": 0, "max_new_tokens": 48, "ignore_eos": True})))
    t.start()
    time.sleep(1.0)  # the long request is running
    ok, message, _ = updatable.update_weights_from_disk(new_dir, weight_version="step2")
    t.join(timeout=120)
    assert ok, message
    assert results["long"]["meta_info"]["completion_tokens"] == 48
    assert results["long"]["meta_info"]["weight_version"] == old
    assert updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"] == "step2"


def test_the_http_route_and_remote_engine(updatable, default_model_dir, tmp_path):
    from serve_helpers import serve_in_thread
    from treadle import RemoteEngine

    broken = checkpoint(default_model_dir, tmp_path / "bad",
                        lambda t: {k: v for k, v in t.items() if "layers.0.input_layernorm" not in k})
    with serve_in_thread(updatable) as url, RemoteEngine(url) as remote:
        ok, message, paused = remote.update_weights_from_disk(default_model_dir, weight_version="http")
        assert (ok, paused) == (True, 0), message
        assert remote.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"] == "http"
        before = ids_of(updatable)
        ok, message, _ = remote.update_weights_from_disk(broken)
        assert not ok and "lacks" in message
        with pytest.raises(ValueError, match="model_path"):
            remote.update_weights_from_disk(str(tmp_path / "no-such-dir"))
    assert ids_of(updatable) == before


def test_get_weights_by_name_reads_the_checkpoint_back(updatable, default_model_dir, tmp_path):
    new_dir = checkpoint(default_model_dir, tmp_path / "step3", perturbed)
    ok, message, _ = updatable.update_weights_from_disk(new_dir)
    assert ok, message
    saved = load_file(os.path.join(new_dir, "model.safetensors"))
    for name in ("model.layers.2.self_attn.k_proj.weight", "model.layers.2.self_attn.q_proj.weight",
                 "model.layers.5.mlp.up_proj.weight", "model.layers.5.mlp.gate_proj.weight",
                 "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        got = torch.tensor(updatable.get_weights_by_name(name, truncate_size=7))
        ref = saved.get(name, saved["model.embed_tokens.weight"])[:7].float()  # a tied head is the embedding
        assert torch.equal(got, ref), name
    assert len(updatable.get_weights_by_name("model.norm.weight")) == 100  # truncate_size defaults to 100
    with pytest.raises(ValueError, match="no weight named"):
        updatable.get_weights_by_name("model.layers.99.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="truncate_size"):
        updatable.get_weights_by_name("model.norm.weight", truncate_size=0)
    ok, message, _ = updatable.update_weights_from_disk(default_model_dir)
    assert ok, message


def test_update_from_tensors_whole_and_in_parts(updatable, default_model_dir, hf_tokenizer, tmp_path):
    """As a trainer process would push them: the whole state dict, then one bucket at a time."""
    new_dir = checkpoint(default_model_dir, tmp_path / "step4", perturbed)
    new = load_file(os.path.join(new_dir, "model.safetensors"))
    old = load_file(os.path.join(default_model_dir, "model.safetensors"))
    reference = hf_reference(new_dir, hf_tokenizer)
    expected = [toks for toks, _ in reference]
    ok, message = updatable.update_weights_from_tensor(list(new.items()))
    assert ok, message
    assert_matches_hf(updatable.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True), reference)
    ok, message = updatable.update_weights_from_tensor(list(old.items()))  # back to the old weights
    assert ok, message
    names = sorted(new)
    for i in range(0, len(names), 50):  # buckets of 50 tensors, as verl sends them
        ok, message = updatable.update_weights_from_tensor([(n, new[n]) for n in names[i:i + 50]])
        assert ok, message
    assert ids_of(updatable) == expected
    got = torch.tensor(updatable.get_weights_by_name("model.layers.4.self_attn.v_proj.weight", truncate_size=3))
    assert torch.equal(got, new["model.layers.4.self_attn.v_proj.weight"][:3].float())
    w = new["model.layers.1.mlp.down_proj.weight"]
    ok, message = updatable.update_weights_from_tensor([("model.layers.1.mlp.down_proj.weight", w.t().contiguous().t())])
    assert ok, message  # a non-contiguous view arrives with its values
    got = torch.tensor(updatable.get_weights_by_name("model.layers.1.mlp.down_proj.weight", truncate_size=3))
    assert torch.equal(got, w[:3].float())
    version = updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"]
    ok, message = updatable.update_weights_from_tensor([("model.layers.0.mlp.up_proj.weight", torch.zeros(3, 3))])
    assert not ok and "old weights are still served" in message, message
    assert "shape" in message.lower() or "size" in message, message
    ok, message = updatable.update_weights_from_tensor([("model.layers.0.mlp.nonsense.weight", torch.zeros(3))])
    assert not ok and "nonsense" in message, message
    assert not [f for f in os.listdir("/dev/shm") if f.startswith("psm_")], "a shared-memory segment was left"
    assert ids_of(updatable) == expected
    with pytest.raises(TypeError, match=r"named_tensors\[0\]"):
        updatable.update_weights_from_tensor([("x", [1, 2])])
    ok, message, _ = updatable.update_weights_from_disk(default_model_dir)
    assert ok, message  # the refused updates above took no version: this one is the next number
    assert updatable.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["weight_version"] \
        == str(int(version) + 1)
