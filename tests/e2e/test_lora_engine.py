"""LoRA adapters end to end on the default model: greedy tokens against peft on the same weights.

Adapters are made with peft on the converted SmolLM2 weights (random A and B, scaled so the text
changes but stays peaked), saved as PEFT directories, and served by one engine that starts with
two of them (``lora_paths``) and loads a third at run time. Batches mix adapters and the base
model, and ``max_loras_per_batch=2`` makes three adapters share two device slots.
"""

from __future__ import annotations

import pytest
import torch

from treadle import Engine

from e2e_helpers import make_peft_adapter

pytestmark = pytest.mark.e2e

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are"]
PARAMS = {"temperature": 0, "max_new_tokens": 12, "ignore_eos": True}
CONFIGS = {  # name: (rank, alpha, target modules, rsLoRA)
    "math": (8, 16, ["q_proj", "k_proj", "v_proj", "o_proj"], False),
    "code": (4, 8, ["q_proj", "gate_proj", "up_proj", "down_proj"], True),
    "chat": (6, 12, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
}


@pytest.fixture(scope="module")
def adapters(default_model_dir, hf_tokenizer, tmp_path_factory):
    """name -> (adapter dir, the peft model's greedy ids per prompt); plus None -> the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for i, (name, (r, alpha, targets, rslora)) in enumerate(CONFIGS.items()):
        make_peft_adapter(default_model_dir, str(root / name), r, alpha, targets, seed=10 + i, rslora=rslora)
        out[name] = str(root / name)
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()
    refs = {None: [_greedy(base, hf_tokenizer, p) for p in PROMPTS]}
    for name, path in out.items():
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32), path).eval()
        refs[name] = [_greedy(model, hf_tokenizer, p) for p in PROMPTS]
    return out, refs


def _greedy(model, tok, prompt: str) -> list[int]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, max_new_tokens=PARAMS["max_new_tokens"], do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=None)
    return gen[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def lora_engine(adapters):
    paths, _ = adapters
    eng = Engine(model_path="default", random_seed=0, max_loras_per_batch=2,
                 lora_paths=[f"math={paths['math']}", {"lora_name": "code", "lora_path": paths["code"]}])
    yield eng
    eng.shutdown()


def test_adapters_differ_from_the_base_model(adapters):
    _, refs = adapters
    for name in CONFIGS:
        assert refs[name] != refs[None], name


def test_mixed_batch_matches_peft(lora_engine, adapters):
    _, refs = adapters
    names = ["math", None, "code", "math"]
    out = lora_engine.generate(prompt=PROMPTS, sampling_params=PARAMS, lora_path=names)
    for i, (res, name) in enumerate(zip(out, names)):
        assert res["output_ids"] == refs[name][i], (i, name)


def test_same_prompt_never_reuses_another_adapters_kv(lora_engine, adapters):
    """The prefix cache keeps each adapter's KV apart: the base model's cached prompt must not be
    reused for an adapter's request (nor the other way round)."""
    _, refs = adapters
    for name in (None, "math", None, "code"):
        res = lora_engine.generate(prompt=PROMPTS[2], sampling_params=PARAMS, lora_path=name)
        assert res["output_ids"] == refs[name][2], name


def test_load_use_unload_at_run_time(lora_engine, adapters):
    paths, refs = adapters
    res = lora_engine.load_lora_adapter(lora_name="chat", lora_path=paths["chat"])
    assert res.success and set(res.loaded_adapters) == {"math", "code", "chat"}, res
    # three adapters, two device slots: the requests take turns; every one still matches peft
    names = ["chat", "math", "code", "chat"]
    out = lora_engine.generate(prompt=PROMPTS, sampling_params=PARAMS, lora_path=names)
    assert [r["output_ids"] for r in out] == [refs[n][i] for i, n in enumerate(names)]
    again = lora_engine.load_lora_adapter(lora_name="chat", lora_path=paths["chat"])
    assert not again.success and "already loaded" in again.error_message
    assert lora_engine.unload_lora_adapter("chat").success
    with pytest.raises(ValueError, match="never been loaded: chat"):
        lora_engine.generate(prompt=PROMPTS[0], sampling_params=PARAMS, lora_path="chat")
    missing = lora_engine.unload_lora_adapter("chat")
    assert not missing.success and "does not exist" in missing.error_message
    # the engine kept serving
    assert lora_engine.generate(prompt=PROMPTS[1], sampling_params=PARAMS, lora_path="code")["output_ids"] == \
        refs["code"][1]


def test_async_load_and_unload(lora_engine, adapters):
    import asyncio

    paths, refs = adapters

    async def run():
        res = await lora_engine.async_load_lora_adapter(lora_name="chat2", lora_path=paths["chat"])
        out = await lora_engine.async_generate(prompt=PROMPTS[3], sampling_params=PARAMS, lora_path="chat2")
        gone = await lora_engine.async_unload_lora_adapter("chat2")
        return res, out, gone

    res, out, gone = asyncio.run(run())
    assert res.success and gone.success and "chat2" not in gone.loaded_adapters
    assert out["output_ids"] == refs["chat"][3]


def test_bad_adapters_are_refused_by_name(lora_engine, tmp_path):
    res = lora_engine.load_lora_adapter(lora_name="nope", lora_path=str(tmp_path / "missing"))
    assert not res.success and "adapter_config.json" in res.error_message
    with pytest.raises(ValueError, match="lora_path has 1 entries but the batch has 2 prompts"):
        lora_engine.generate(prompt=PROMPTS[:2], sampling_params=PARAMS, lora_path=["math"])
    with pytest.raises(TypeError, match="lora_path"):
        lora_engine.generate(prompt=PROMPTS[0], sampling_params=PARAMS, lora_path=3)


def test_lora_calls_on_an_engine_without_lora(engine):
    with pytest.raises(ValueError, match="LoRA is not enabled"):
        engine.generate(prompt="Hi", sampling_params=PARAMS, lora_path="math")
    res = engine.load_lora_adapter(lora_name="math", lora_path="/nonexistent")
    assert not res.success and "not enabled" in res.error_message


@pytest.mark.parametrize("layout", [{"tp_size": 2}, {"pp_size": 2}, {"dp_size": 2}])
def test_parallel_layouts_match_peft(adapters, layout):
    """tp: each rank holds its shard of every adapter (B split like the weight's rows for
    column-parallel layers, A like its columns for row-parallel ones); pp: each stage its layers';
    dp: every group loads it. Same tokens as peft."""
    paths, refs = adapters
    with Engine(model_path="default", random_seed=0, lora_paths=[f"chat={paths['chat']}"], **layout) as eng:
        out = eng.generate(prompt=PROMPTS[:2], sampling_params=PARAMS, lora_path=["chat", None])
    assert [r["output_ids"] for r in out] == [refs["chat"][0], refs[None][1]]


def test_encode_through_an_adapter_matches_peft(adapters, default_model_dir, hf_tokenizer):
    """A decoder served as an embedding model: ``encode(lora_path=...)`` pools the adapter's last hidden state."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    paths, _ = adapters
    texts = ["The capital of France is Paris.", "short"]
    with Engine(model_path="default", is_embedding=True, lora_paths=[f"math={paths['math']}"]) as eng:
        got = eng.encode(prompt=texts, lora_path=["math", None])["embedding"]
    base = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, paths["math"]).eval()
    for text, vec, use in zip(texts, got, (True, False)):
        ids = hf_tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            if use:
                h = peft(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
            else:
                with peft.disable_adapter():
                    h = peft(**ids, output_hidden_states=True).hidden_states[-1][0, -1]
        want = torch.nn.functional.normalize(h, dim=0)
        assert float((torch.tensor(vec) - want).norm() / want.norm()) < 1e-5, text


def test_max_loaded_loras_evicts_the_least_recently_used_and_reloads_on_demand(adapters):
    """Loading past ``max_loaded_loras`` unloads the least recently used unpinned adapter (SGLang's
    rule); a request naming it loads it again from its path; a request running on an adapter that
    gets evicted finishes on it; with every other adapter pinned a load fails and nothing changes."""
    paths, refs = adapters
    with Engine(model_path="default", random_seed=0, max_loaded_loras=2, max_loras_per_batch=3,
                lora_target_modules=["all"],
                lora_paths=[{"lora_name": "math", "lora_path": paths["math"], "pinned": True}]) as eng:
        assert eng.load_lora_adapter(lora_name="code", lora_path=paths["code"]).success
        res = eng.load_lora_adapter(lora_name="chat", lora_path=paths["chat"])
        assert res.success and res.loaded_adapters == {"math": paths["math"], "chat": paths["chat"]}
        # code was evicted (math is pinned): this call loads it again, and chat goes
        names = ["code", "math", None, "code"]
        out = eng.generate(prompt=PROMPTS, sampling_params=PARAMS, lora_path=names)
        assert [r["output_ids"] for r in out] == [refs[n][i] for i, n in enumerate(names)]
        assert set(eng._lora.paths) == {"math", "code"}
        # chat comes back while a request of code runs; code is evicted under it and still serves it
        long = {**PARAMS, "max_new_tokens": 40}
        stream = eng.generate(prompt=PROMPTS[1], sampling_params=long, lora_path="code", stream=True)
        first = next(stream)
        chat = eng.generate(prompt=PROMPTS[2], sampling_params=PARAMS, lora_path="chat")
        assert chat["output_ids"] == refs["chat"][2] and set(eng._lora.paths) == {"math", "chat"}
        ids = [t for chunk in [first, *stream] for t in chunk["output_ids"]]  # incremental chunks
        assert ids[:12] == refs["code"][1] and len(ids) == 40
        assert eng.generate(prompt=PROMPTS[3], sampling_params=PARAMS, lora_path="code")["output_ids"] == \
            refs["code"][3]
        # pin the other one too: nothing can make room any more
        assert eng.unload_lora_adapter("chat").success  # evicted: forgotten
        assert eng.unload_lora_adapter("code").success
        assert eng.load_lora_adapter(lora_name="code", lora_path=paths["code"], pinned=True).success
        full = eng.load_lora_adapter(lora_name="chat", lora_path=paths["chat"])
        assert not full.success and "max_loaded_loras=2" in full.error_message
        assert full.loaded_adapters == {"math": paths["math"], "code": paths["code"]}
        with pytest.raises(ValueError, match="never been loaded: chat"):
            eng.generate(prompt=PROMPTS[0], sampling_params=PARAMS, lora_path="chat")
        assert eng._check_integrity()["num_running"] == 0
