"""LLaVA (HF ``LlavaForConditionalGeneration``): a CLIP vision tower, a two-layer projector, and a
Llama-family language model.

The runner encodes images (``encode_images``) and hands the step's vision embeddings and the token
indices they replace to the forward context (``mm_embeds``); ``forward`` embeds the tokens, puts
the vision embeddings at those indices and runs the language model on the result. Steps without
images (all decode steps) are the language model's own forward. Vision tower and projector live
on the first pipeline stage only, replicated on every tensor-parallel rank.

Checkpoints come in two name layouts, both accepted: the hub's (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.vision_model.*``, ``multi_modal_projector.*``) and
the one transformers 5 models hold (``model.language_model.*``, ``model.vision_tower.*`` without
``vision_model.``, ``model.multi_modal_projector.*``, ``lm_head.*``); ``save_pretrained`` of
transformers 5.24 writes a mix (``language_model.model.*`` but ``vision_tower.embeddings.*``).
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import nn

from treadle.gpu_worker.distributed import pp_rank
from treadle.gpu_worker.forward_context import get_forward_context
from treadle.gpu_worker.loader import default_weight_loader
from treadle.gpu_worker.models.base import ModelBase
from treadle.gpu_worker.models.clip import CLIPVisionModel, activation, hidden_state_index
from treadle.gpu_worker.models.registry import get_model_class
from treadle.gpu_worker.pipeline import owns_layer_tensor

_VISION = ("vision_tower.", "multi_modal_projector.")


def checkpoint_name(name: str) -> tuple[bool, str]:
    """``(is_text, name)``: a checkpoint tensor's name in this model, in either layout; for the
    language model the name inside it (``model.layers.0...``, ``lm_head.weight``)."""
    if name.startswith("model."):  # transformers 5: model.{language_model,vision_tower,multi_modal_projector}.*
        name = name[len("model."):]
    if name.startswith("lm_head."):
        return True, name
    if name.startswith("language_model."):
        rest = name[len("language_model."):]
        return True, rest if rest.startswith(("model.", "lm_head.")) else "model." + rest
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]
    return False, name


class LlavaMultiModalProjector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=bias)
        self.act = activation(act)
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(ModelBase):
    supports_pp = True
    takes_images = True

    def __init__(self, config, max_positions: Optional[int] = None):
        super().__init__()
        self.config, text, vision = config, config.text_config, config.vision_config
        self.language_model = get_model_class(text)(text, max_positions=max_positions)
        self.lazy_weights = self.language_model.lazy_weights
        layers = config.vision_feature_layer
        self.feature_layers = [layers] if isinstance(layers, int) else list(layers)
        self.select = getattr(config, "vision_feature_select_strategy", "default")
        if self.select not in ("default", "full"):
            raise ValueError(f"unsupported vision_feature_select_strategy {self.select!r} (default or full)")
        self.vision_tower: Optional[CLIPVisionModel] = None
        self.multi_modal_projector: Optional[LlavaMultiModalProjector] = None
        if pp_rank() == 0:  # only the first stage embeds tokens, so only it needs images
            if getattr(vision, "model_type", "clip_vision_model") != "clip_vision_model":
                raise ValueError(f"unsupported LLaVA vision tower {vision.model_type!r} (CLIP only)")
            deepest = max(hidden_state_index(i, vision.num_hidden_layers) for i in self.feature_layers)
            self.vision_tower = CLIPVisionModel(vision, num_layers=deepest)
            self.multi_modal_projector = LlavaMultiModalProjector(
                vision.hidden_size * len(self.feature_layers), text.hidden_size,
                getattr(config, "projector_hidden_act", "gelu"), getattr(config, "multimodal_projector_bias", True))

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision embeddings ``[N, tokens, hidden]`` of images ``[N, 3, H, W]``, in the model dtype:
        the feature layers' patch states (CLS dropped for "default"), projected to the text width."""
        if self.vision_tower is None:
            raise RuntimeError("images are encoded on the first pipeline stage only")
        dtype = self.multi_modal_projector.linear_1.weight.dtype
        feats = self.vision_tower.hidden_states(pixel_values.to(dtype), self.feature_layers)
        if self.select == "default":
            feats = [f[:, 1:] for f in feats]
        return self.multi_modal_projector(torch.cat(feats, dim=-1))

    def forward(self, input_ids: torch.Tensor, carry: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """As ``LlamaForCausalLM.forward``; on the first stage of a step with images, the token
        embeddings at the context's ``mm_embeds`` indices are replaced by the vision embeddings."""
        mm = get_forward_context().mm_embeds if carry is None else None
        if mm is not None:
            idx, emb = mm
            x = self.language_model.model.embed_tokens(input_ids)
            carry = (x.index_copy(0, idx, emb.to(x.dtype)), None)
        return self.language_model(input_ids, carry)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language_model.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (either layout) in; returns the param names filled."""
        params, loaded = dict(self.named_parameters()), set()

        def text_tensors():  # the language model's share goes on to its own loader; vision ones are copied here
            for name, tensor in weights:
                is_text, name = checkpoint_name(name)
                if is_text:
                    yield name, tensor
                elif self._wants_vision(name):
                    if name not in params:
                        raise KeyError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
                    default_weight_loader(params[name], tensor)
                    loaded.add(name)

        loaded |= {"language_model." + n for n in self.language_model.load_weights(text_tensors())}
        missing = {n for n in params if n.startswith(_VISION) and n not in loaded}
        if missing:
            raise ValueError(f"checkpoint lacks {sorted(missing)[:8]} ({len(missing)} params)")
        return loaded

    def wants_tensor(self, name: str) -> bool:
        """Whether this rank needs a checkpoint tensor: vision tower and projector on the first
        stage (never the unused last layers or ``post_layernorm``); text ones as the language model says."""
        is_text, name = checkpoint_name(name)
        return self.language_model.wants_tensor(name) if is_text else self._wants_vision(name)

    def _wants_vision(self, name: str) -> bool:
        if self.vision_tower is None or ".post_layernorm." in name or name.endswith(".position_ids"):
            return False
        own = owns_layer_tensor(name, 0, self.vision_tower.num_built_layers)
        return True if own is None else own
