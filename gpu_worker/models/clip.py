"""CLIP vision encoder (HF ``CLIPVisionModel``), the vision tower of LLaVA.

Plain torch modules, replicated on every tensor-parallel rank: the tower is small next to the
language model and runs once per image, so sharding it would cost more in communication than
it saves. Names mirror the checkpoints (``vision_model.encoder.layers.N...``). Only the layers
up to the one whose output is used are built (``num_layers``): LLaVA reads the second-to-last
layer, so the last one (and ``post_layernorm``) would be weights that never run.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# Not cuDNN: it builds a plan for every new image-batch size, 40-130 ms of host time each time
# (measured on an H100), where flash / memory-efficient attention start at once.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

ACTIVATIONS = {  # HF ``hidden_act`` names
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


def hidden_state_index(i: int, num_layers: int) -> int:
    """HF's ``hidden_states[i]`` index as a non-negative one (``-1``: the last layer's output)."""
    if not -(num_layers + 1) <= i <= num_layers:
        raise ValueError(f"vision feature layer {i} out of range for {num_layers} layers")
    return i % (num_layers + 1)


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim, patch = config.hidden_size, config.patch_size
        self.image_size = config.image_size
        self.class_embedding = nn.Parameter(torch.empty(dim))
        self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // patch) ** 2 + 1, dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        n, _, h, w = pixel_values.shape
        if h != self.image_size or w != self.image_size:  # no position interpolation (HF's default too)
            raise ValueError(f"image of {h}x{w} pixels; the vision tower takes {self.image_size}x{self.image_size}")
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [N, patches, dim]
        x = torch.cat([self.class_embedding.expand(n, 1, -1), patches], dim=1)
        return x + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        dim, self.num_heads = config.hidden_size, config.num_attention_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, dim = x.shape
        q, k, v = (p(x).view(n, s, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        with sdpa_kernel(_SDPA_BACKENDS):  # every patch sees every patch; scale head_dim**-0.5
            out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(n, s, dim))


class CLIPMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CLIPAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(num_layers))


class CLIPVisionTransformer(nn.Module):
    def __init__(self, config, num_layers: int):
        super().__init__()
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic, as in HF
        self.encoder = CLIPEncoder(config, num_layers)


class CLIPVisionModel(nn.Module):
    def __init__(self, config, num_layers: Optional[int] = None):
        """``num_layers``: build only the first this many encoder layers (default: all)."""
        super().__init__()
        self.num_hidden_layers = config.num_hidden_layers
        n = config.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= n <= config.num_hidden_layers:
            raise ValueError(f"num_layers {n} outside [0, {config.num_hidden_layers}]")
        self.vision_model = CLIPVisionTransformer(config, n)

    @property
    def num_built_layers(self) -> int:
        return len(self.vision_model.encoder.layers)

    def hidden_states(self, pixel_values: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """HF's ``hidden_states[i]`` for each ``i`` of ``layers`` (0: the embeddings after
        ``pre_layrnorm``; ``i``: the output of layer ``i``; negative counts from the end), each
        ``[N, 1 + patches, hidden]``. Layers after the deepest one asked for are not run."""
        want = [hidden_state_index(i, self.num_hidden_layers) for i in layers]
        if max(want) > self.num_built_layers:
            raise ValueError(f"layer {max(want)} asked for; only {self.num_built_layers} layers were built")
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))
        out = {0: x}
        for i, layer in enumerate(vm.encoder.layers[: max(want)], start=1):
            x = layer(x)
            if i in want:
                out[i] = x
        return [out[i] for i in want]
