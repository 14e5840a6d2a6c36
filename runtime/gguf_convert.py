"""Convert a Llama-family GGUF file into a plain Hugging Face model directory.

Why: the engine's model code loads HF-format checkpoints (config.json + safetensors + tokenizer
files). transformers can read GGUF directly, but it dequantizes the whole file on every load;
converting once into a cache directory makes every later start a plain safetensors load.

Supported ``general.architecture`` values: ``llama`` (Llama, Mistral, SmolLM2, ...) and ``qwen2``.
Tensors are dequantized to float32 with the ``gguf`` package's own kernels, so the result is
bit-identical to what ``AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`` produces.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm.auto import tqdm

_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _hf_name(gguf_name: str) -> str:
    """Map a GGUF tensor name (``blk.3.attn_q.weight``) to its HF name; unknown names raise,
    because silently dropping a tensor would give a model that loads but computes garbage."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ValueError(f"unsupported GGUF tensor {gguf_name!r}")


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation.

    HF's Llama rotates the two *halves* of each head (rotate_half); llama.cpp rotates adjacent
    *pairs*, so its converter reorders each head's rows from [h0..h_{d/2-1}, h_{d/2}..] to
    interleaved pairs. Reshape the rows to (head, 2-interleaved, d/2) and swap back.
    """
    d_half = w.shape[0] // n_head // 2
    return w.reshape(n_head, d_half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_scaling(freq_factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any]:
    """Recover HF's ``llama3`` rope scaling from a ``rope_freqs`` tensor.

    Llama 3.1+ GGUFs carry no rope-scaling metadata: llama.cpp bakes the scaling into per-frequency
    divisors. Assume Meta's published constants (low 1, high 4, original context 8192, factor =
    the largest divisor), and check that they reproduce the tensor; otherwise refuse, since a
    wrong guess would give a model that runs but is subtly wrong.
    """
    factor, low, high, orig = float(freq_factors.max()), 1.0, 4.0, 8192
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / freqs
    smooth = (orig / wavelen - low) / (high - low)
    expect = np.where(wavelen < orig / high, 1.0,
                      np.where(wavelen > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if expect.shape != freq_factors.shape or not np.allclose(expect, freq_factors, rtol=1e-4):
        raise NotImplementedError("rope_freqs tensor does not match Llama 3 rope scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": orig}


def _config(reader: GGUFReader, shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """Build a transformers config dict from GGUF metadata (``{arch}.*`` keys).

    Uses the legacy ``rope_theta``/``rope_scaling`` keys, which both transformers 4.x and 5.x read.
    """
    def get(key: str, default: Any = None) -> Any:
        field = reader.fields.get(key)
        return default if field is None else field.contents()

    arch = get("general.architecture")
    if arch not in _ARCHS:
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only {list(_ARCHS)})")
    hidden, n_head = get(f"{arch}.embedding_length"), get(f"{arch}.attention.head_count")
    head_dim = get(f"{arch}.attention.key_length") or get(f"{arch}.rope.dimension_count") or hidden // n_head
    cfg: dict[str, Any] = {
        "architectures": [_ARCHS[arch]], "model_type": arch, "hidden_act": "silu",
        "hidden_size": hidden, "intermediate_size": get(f"{arch}.feed_forward_length"),
        "num_hidden_layers": get(f"{arch}.block_count"),
        "num_attention_heads": n_head, "num_key_value_heads": get(f"{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        # GGUF stores float32; keep that exact value (what HF's GGUF loader uses) so logits match.
        "rms_norm_eps": get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": get(f"{arch}.context_length"),
        "vocab_size": shapes["token_embd.weight"][0],
        "bos_token_id": get("tokenizer.ggml.bos_token_id"), "eos_token_id": get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": get("tokenizer.ggml.padding_token_id"),
        "tie_word_embeddings": "output.weight" not in shapes, "torch_dtype": "float32",
    }
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in shapes
    scaling_type = get(f"{arch}.rope.scaling.type", "none")
    if scaling_type in ("linear", "yarn"):
        cfg["rope_scaling"] = {"rope_type": scaling_type, "factor": get(f"{arch}.rope.scaling.factor")}
        if scaling_type == "yarn":
            cfg["rope_scaling"]["original_max_position_embeddings"] = get(f"{arch}.rope.scaling.original_context_length")
    elif scaling_type != "none":
        raise NotImplementedError(f"rope scaling type {scaling_type!r} is not supported")
    elif get(f"{arch}.rope.scale_linear"):  # older GGUFs
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get(f"{arch}.rope.scale_linear")}
    return cfg


def _write_tokenizer(gguf_path: str, out: str) -> None:
    """Let transformers build the tokenizer from GGUF metadata (BPE/SentencePiece vocab, merges,
    special tokens, chat template) exactly as it does for ``gguf_file=``, then save it as plain files."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    tok.save_pretrained(out)


def _write_safetensors(path: str, reader: GGUFReader, cfg: dict[str, Any], progress: bool) -> None:
    """Stream every tensor, dequantized to float32, into one safetensors file.

    The header is computed from the shapes up front, so only one tensor is in memory at a time
    (a 7B model is ~28 GB in float32; ``safetensors.save_file`` would need it all at once).
    """
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]  # folded into the config
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        shape = [int(n) for n in reversed(t.shape)]  # GGUF lists dims fastest-first (ggml's ne)
        nbytes = 4 * int(np.prod(shape))
        header[_hf_name(t.name)] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    permute = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for t in tqdm(tensors, desc="Converting GGUF tensors", unit="tensor", disable=not progress):
            w = dequantize(t.data, t.tensor_type).reshape(header[_hf_name(t.name)]["shape"])
            kind = t.name.split(".")[-2]
            if cfg["model_type"] == "llama" and kind in permute:  # llama.cpp permutes only llama's Q/K
                w = _unpermute_rope(w, permute[kind])
            f.write(np.ascontiguousarray(w, dtype="<f4").tobytes())


def convert_gguf(gguf_path: str, out_dir: str, progress: bool = True) -> None:
    """Convert ``gguf_path`` into an HF model directory at ``out_dir`` (config.json,
    generation_config.json, tokenizer files, float32 model.safetensors).

    The directory is built next to ``out_dir`` and moved into place with ``os.replace``, so a
    crash never leaves a half-written cache. ``out_dir`` must not exist yet; if another process
    finishes the same conversion first, its directory is kept and ours discarded.
    """
    from transformers import GenerationConfig

    gguf_path, out_dir = os.path.abspath(gguf_path), os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        raise FileExistsError(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", suffix=".tmp", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; a model cache should be readable
        reader = GGUFReader(gguf_path)
        shapes = {t.name: tuple(int(n) for n in reversed(t.shape)) for t in reader.tensors}
        cfg = _config(reader, shapes)
        if "rope_freqs.weight" in shapes:
            freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
            cfg["rope_scaling"] = _llama3_rope_scaling(
                dequantize(freqs.data, freqs.tensor_type), cfg["rope_theta"], cfg["head_dim"])
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        ids = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
        GenerationConfig(**ids).save_pretrained(tmp)
        _write_tokenizer(gguf_path, tmp)
        _write_safetensors(os.path.join(tmp, "model.safetensors"), reader, cfg, progress)
        del reader  # release the memory map before moving files (matters on Windows)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not os.path.isdir(out_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # lost a race: the other converter's copy is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
