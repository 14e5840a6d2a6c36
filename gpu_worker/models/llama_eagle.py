"""EAGLE and EAGLE3 draft heads: one Llama decoder layer that reads the target's hidden states.

The checkpoints' layouts (as SGLang's and vLLM's ``llama_eagle.py`` / ``llama_eagle3.py`` read them):

- **EAGLE** (``LlamaForCausalLMEagle``): ``fc`` (``2H -> H``, with bias) over
  ``concat(embedding(token), target hidden)``, then ``layers.0`` (a Llama layer without its input
  norm); its output plus residual is both the next step's hidden state and, through the LM head,
  the logits (no final norm). Its LM head is the target's; its embedding is its own when the
  checkpoint carries ``embed_tokens`` (``EagleDraft`` shares the target's when that is a copy).
- **EAGLE3** (``LlamaForCausalLMEagle3``): the target's hidden states of three layers (low, mid,
  high) concatenated, ``fc`` (``3H -> H``, no bias); the layer (``midlayer``) attends over
  ``concat(input_layernorm(embedding), hidden_norm(hidden))`` (its q/k/v read ``2H``); ``norm``
  gives the logits' input, the pre-norm sum the next step's hidden. Its ``lm_head`` covers a
  reduced draft vocabulary; draft id ``i`` is target id ``i + d2t[i]``.

The layer is the Llama family's ``LlamaDecoderLayer`` (shared TP-aware layers); attention runs
through the forward context as in any model. With tensor parallelism it is therefore sharded as the
target's layers are (heads and MLP columns split over the ranks, ``o_proj`` / ``down_proj``
all-reducing for themselves: the head never defers its reduces); ``fc`` and the norms are
replicated, the embedding and LM heads vocab-parallel (an LM head gathers its shards, padding cut,
before ``d2t`` maps draft ids, so the mapping sees the whole draft vocabulary on every rank).
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from treadle.gpu_worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from treadle.gpu_worker.layers.linear import QKVParallelLinear, ReplicatedLinear
from treadle.gpu_worker.layers.norm import RMSNorm
from treadle.gpu_worker.layers.rotary import RotaryEmbedding, rope_parameters
from treadle.gpu_worker.loader import default_weight_loader
from treadle.gpu_worker.models.llama import LlamaDecoderLayer, LlamaForCausalLM, head_dim_of

EAGLE3_LAYER_NAMES = ("midlayer.", "layers.0.")


def eagle3_capture_layers(config: Any, target_layers: int) -> list[int]:
    """Target layers whose *input* (hidden + residual) EAGLE3 reads: the checkpoint's
    ``eagle_aux_hidden_state_layer_ids`` (outputs of those layers, so inputs of the next), else
    SGLang's default low/mid/high ``[2, n // 2, n - 3]``."""
    ids = (getattr(config, "eagle_config", None) or {}).get("eagle_aux_hidden_state_layer_ids")
    ids = ids or getattr(config, "eagle_aux_hidden_state_layer_ids", None)
    layers = [i + 1 for i in ids] if ids else [2, target_layers // 2, target_layers - 3]
    if len(layers) != 3 or not all(0 <= i <= target_layers for i in layers):
        raise ValueError(f"speculative_draft_model_path: EAGLE3 aux hidden state layers {layers} do not fit a target "
                         f"of {target_layers} layers")
    return layers


def read_head(model_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """A head checkpoint's ``config.json`` and tensors: ``model.safetensors`` (EAGLE3 heads, most
    EAGLE ones) or ``pytorch_model.bin`` (the first EAGLE releases; read with ``weights_only``)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        raw = json.load(f)
    st, pt = os.path.join(model_dir, "model.safetensors"), os.path.join(model_dir, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return raw, load_file(st)
    if os.path.isfile(pt):
        return raw, torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"speculative_draft_model_path: {model_dir} has neither model.safetensors nor pytorch_model.bin "
                     "(an EAGLE head is one file)")


def tap_residual_stream(backbone: nn.Module, layer_ids: list[int], sink: Callable[[torch.Tensor], None]) -> None:
    """Hooks that hand ``sink`` the residual stream entering each of ``layer_ids`` of a Llama-family
    backbone (``len(layers)``: the final norm's input) as it runs. Read where the norm that opens
    the layer returns it (``(norm(x + residual), x + residual)``), not from the layer's inputs: with
    tensor parallelism the layers leave their all-reduce to that norm (``LlamaModel.defer_reduce``),
    so a layer's input ``x`` is this rank's partial sum while the norm's second output is summed
    over the ranks (the same full state on every rank). Layer 0 reads the embedding (all-reduced)."""
    layers = backbone.layers
    for i in layer_ids:
        if i == 0:
            layers[0].register_forward_pre_hook(lambda m, args: sink(args[0]))
        else:
            norm = layers[i].input_layernorm if i < len(layers) else backbone.norm
            norm.register_forward_hook(lambda m, args, out: sink(out[1]))


class EagleHead(nn.Module):
    """The draft head; ``names`` are the checkpoint's tensor names (which optional parts it has).

    Embedding: the head's own (vocab-parallel, loaded through the same shard loader as the
    target's) when the checkpoint carries ``embed_tokens.weight``, and for an EAGLE3 head whose
    hidden size differs from the target's (``target_hidden_size``), which must carry one; else
    ``embed_tokens`` is None and the target's is used. Most checkpoints carry a frozen copy of
    the target's, which ``EagleDraft`` then shares instead; some are trained with their own (vLLM
    reads those too; SGLang always takes the target's). LM head: EAGLE's is always the target's
    (a checkpoint's copy is skipped, as SGLang does); EAGLE3's is its own when the checkpoint has
    ``lm_head.weight`` (then over ``draft_vocab_size`` ids mapped by ``d2t``), else the target's.
    """

    def __init__(self, config: Any, eagle3: bool, names: set[str], max_positions: int):
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.eagle3, self.hidden = eagle3, h
        if config.num_hidden_layers != 1:
            raise ValueError(f"speculative_draft_model_path: an EAGLE head of {config.num_hidden_layers} layers; "
                             "one-layer heads only")
        bias = bool(getattr(config, "attention_bias", False))
        rotary = RotaryEmbedding(head_dim_of(config), max_positions, rope_parameters(config))
        self.layer = LlamaDecoderLayer(config, 0, rotary, bias, bias)
        has = {n.removeprefix("model.") for n in names}
        self.skip = {"lm_head.weight"}  # the target's is used (see above)
        self.embed_tokens: Optional[VocabParallelEmbedding] = None
        target_h = getattr(config, "target_hidden_size", None) or h
        if "embed_tokens.weight" in has or (eagle3 and target_h != h):  # the target's may have the wrong width
            self.embed_tokens = VocabParallelEmbedding(config.vocab_size, h)
        self.lm_head: Optional[ParallelLMHead] = None
        self.draft_vocab = config.vocab_size
        self.register_buffer("d2t", torch.zeros(self.draft_vocab, dtype=torch.int64))
        if not eagle3:
            self.layer.input_layernorm = nn.Identity()  # EAGLE's layer 0 has no input norm
            self.fc = ReplicatedLinear(2 * h, h, "fc.bias" in has)
            return
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        self.layer.self_attn.qkv_proj = QKVParallelLinear(2 * h, head_dim_of(config), heads, kv, bias)
        self.layer.hidden_norm, self.norm = RMSNorm(h, eps), RMSNorm(h, eps)
        self.fc = ReplicatedLinear(3 * target_h, h, "fc.bias" in has)
        if "lm_head.weight" in has:
            self.draft_vocab = getattr(config, "draft_vocab_size", None) or config.vocab_size
            if self.draft_vocab != config.vocab_size and "d2t" not in has:
                raise ValueError(f"speculative_draft_model_path: an EAGLE3 head over {self.draft_vocab} of "
                                 f"{config.vocab_size} ids needs its d2t map")
            self.lm_head = ParallelLMHead(self.draft_vocab, h)
            self.d2t = torch.zeros(self.draft_vocab, dtype=torch.int64)
            self.skip.discard("lm_head.weight")

    def forward(self, emb: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``emb [T, H]`` token embeddings, ``hidden`` the target's (``[T, 3H]`` for EAGLE3's first
        step) or the head's own previous output. Returns (the LM head's input, the next hidden)."""
        if not self.eagle3:
            x, residual = self.layer(self.fc(torch.cat([emb, hidden], dim=-1)), None)
            out = x + residual
            return out, out
        if hidden.shape[-1] != self.hidden:
            hidden = self.fc(hidden)
        layer, residual = self.layer, hidden
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(hidden)], dim=-1)
        x, residual = layer.post_attention_layernorm(layer.self_attn(x), residual)
        return self.norm(layer.mlp(x), residual)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Checkpoint tensors into the (fused) params; every param must be filled."""
        params, loaded = dict(self.named_parameters()), set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if (name == "t2d" or name in self.skip or "rotary_emb.inv_freq" in name
                    or (not self.eagle3 and "input_layernorm" in name)):
                continue
            if name == "d2t":
                if tensor.shape != self.d2t.shape:
                    raise ValueError(f"speculative_draft_model_path: d2t has {tuple(tensor.shape)} entries, the "
                                     f"head's LM head {self.draft_vocab}")
                self.d2t.copy_(tensor.to(torch.int64))
                continue
            for prefix in EAGLE3_LAYER_NAMES:
                if name.startswith(prefix):
                    name = "layer." + name[len(prefix):]
            # the fused params: q/k/v -> qkv_proj, gate/up -> gate_up_proj
            name, shard = LlamaForCausalLM.param_target(LlamaForCausalLM, name)
            if name not in params:
                raise ValueError(f"speculative_draft_model_path: checkpoint tensor {name!r} has no place in an "
                               f"{'EAGLE3' if self.eagle3 else 'EAGLE'} head")
            param = params[name]
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard)
            except RuntimeError as e:  # a shape that does not fit: name the tensor
                raise ValueError(f"speculative_draft_model_path: checkpoint tensor {name!r} of shape "
                                 f"{tuple(tensor.shape)} does not fit the head ({e})") from e
            loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"speculative_draft_model_path: the EAGLE checkpoint lacks {missing[:8]}")
