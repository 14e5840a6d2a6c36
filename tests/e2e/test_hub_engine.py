"""Engines on hub ids (issue 24, acceptance 1): a tiny Llama served by a local stand-in for the hub
(HF_ENDPOINT) is downloaded by ``Engine(model_path="org/name")`` and gives HF's greedy tokens; the
second start makes no request; ``json_model_override_args`` changes the model that is built; an
embedding checkpoint serves ``encode`` without ``is_embedding=True``."""

from __future__ import annotations

import json

import pytest
import torch
from fake_hub import fake_hub

from treadle import Engine

pytestmark = pytest.mark.e2e

REPO = "org/tiny-llama"
PROMPTS = ["The capital of France is", "1, 2, 3, 4,"]
GREEDY = {"temperature": 0.0, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def hub(tmp_path_factory, default_model_dir):
    """The stand-in hub serving a tiny random Llama (SmolLM2's tokenizer), an empty hub cache."""
    import huggingface_hub.constants
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = str(tmp_path_factory.mktemp("tiny-llama"))
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      initializer_range=0.1, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(src, safe_serialization=True)
    tok.save_pretrained(src)
    with pytest.MonkeyPatch.context() as mp, fake_hub() as (url, server):
        server.add_dir(REPO, src, extra={"pytorch_model.bin": b"never fetched"})
        mp.setenv("HF_ENDPOINT", url)
        mp.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("hub-cache")))
        for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.delenv(var, raising=False)
        mp.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_TELEMETRY", True)
        yield server


def hf_reference(model_dir: str, **config_overrides) -> tuple[list[list[int]], list[list[float]]]:
    """transformers' greedy tokens and their logprobs (float32) for PROMPTS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **config_overrides).eval()
    tokens, logprobs = [], []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:].tolist()
        tokens.append(new)
        logprobs.append([torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(out.logits, new)])
    return tokens, logprobs


def greedy(engine: Engine) -> tuple[list[list[int]], list[list[float]]]:
    outs = engine.generate(PROMPTS, GREEDY, return_logprob=True)
    return ([o["output_ids"] for o in outs],
            [[lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]] for o in outs])


def test_a_hub_id_downloads_once_and_loads_with_its_config_overrides(hub):
    with Engine(model_path=REPO, json_model_override_args='{"num_hidden_layers": 1}', random_seed=0) as engine:
        snapshot = engine._files.tokenizer_dir  # the hub snapshot (the model dir is the overridden copy)
        assert hub.gets("model.safetensors") == 1 and hub.gets("pytorch_model.bin") == 0
        info = engine.get_model_info()
        assert info["model_path"] == REPO and info["is_generation"] and info["architectures"] == ["LlamaForCausalLM"]
        assert json.load(open(engine._files.model_dir + "/config.json"))["num_hidden_layers"] == 1
        tokens, logprobs = greedy(engine)
    want_tokens, want_logprobs = hf_reference(snapshot, num_hidden_layers=1)
    assert tokens == want_tokens
    assert max(abs(a - b) for g, w in zip(logprobs, want_logprobs) for a, b in zip(g, w)) < 1e-4
    _, two_layer = hf_reference(snapshot)  # the override changed the model: the checkpoint's two layers differ
    assert max(abs(a - b) for g, w in zip(logprobs, two_layer) for a, b in zip(g, w)) > 1e-3

    before = len(hub.requests)  # a second start (by revision): from the cache, no request
    with Engine(model_path=REPO, revision="main", random_seed=0) as engine:
        assert engine._files.model_dir == snapshot
        tokens, logprobs = greedy(engine)
    assert len(hub.requests) == before
    want_tokens, want_logprobs = hf_reference(snapshot)
    assert tokens == want_tokens
    assert max(abs(a - b) for g, w in zip(logprobs, want_logprobs) for a, b in zip(g, w)) < 1e-4


def test_an_embedding_checkpoint_needs_no_is_embedding():
    with Engine(model_path="all-MiniLM-L6-v2") as engine:  # BertModel with sentence-transformers files
        assert engine.get_model_info()["is_generation"] is False
        out = engine.encode(["Hello world", "SGLang is fast"])
        assert [len(e) for e in out["embedding"]] == [384, 384]
        with pytest.raises(ValueError, match="embedding model"):
            engine.generate("Hello", GREEDY)
