"""A tiny random LLaVA checkpoint (HF ``llava-hf`` layout) for tests: CLIP vision tower + Llama text model.

Built from HF's own classes and written with ``save_pretrained``, so it is exactly what a user's
directory holds: ``config.json``, ``model.safetensors`` (float32), the default model's tokenizer
with an added ``<image>`` special token (its id is ``image_token_index``), and a ``LlavaProcessor``
(``processor_config.json``, and ``preprocessor_config.json`` for ``CLIPImageProcessor``). A 32x32
image makes 16 patches of 8x8, hence 16 placeholder tokens (the CLS position is dropped).

``PYTHONPATH=. python tests/tiny_llava.py DIR`` (from the repository root) writes one to DIR.
"""

from __future__ import annotations

import os
import sys

import torch

IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16


def tiny_llava_config(vocab_size: int, image_token_index: int, **text_overrides):
    """The tiny model's ``LlavaConfig``; big-ish init ranges so greedy output is not degenerate."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=3, num_attention_heads=4, projection_dim=64, initializer_range=0.1)
    text = LlamaConfig(**{**dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=0,
                                 tie_word_embeddings=False), **text_overrides})
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token_index,
                       image_seq_length=IMAGE_TOKENS, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu")


def tiny_llava_processor(tokenizer_dir: str):
    """The default model's tokenizer plus ``<image>``, and a 32 px CLIP image processor."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=side)
    return LlavaProcessor(image_processor=images, tokenizer=tok, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=tok.chat_template)


def build_tiny_llava(path: str, tokenizer_dir: str, seed: int = 0) -> str:
    """Write the tiny model to ``path`` (created); returns ``path``."""
    from transformers import LlavaForConditionalGeneration

    os.makedirs(path, exist_ok=True)
    proc = tiny_llava_processor(tokenizer_dir)
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(proc.tokenizer), image_id)).eval()
    model.save_pretrained(path)
    proc.save_pretrained(path)  # processor_config.json (image processor inside), tokenizer, chat template
    proc.image_processor.save_pretrained(path)  # preprocessor_config.json too, for readers that want it
    return path


def build_tiny_llava_original(path: str, tokenizer_dir: str, seed: int = 0):
    """The same tiny model in the original LLaVA layout (``liuhaotian/llava-v1.5-*``): a Llama
    checkpoint with ``model.mm_projector.{0,2}`` inside and ``mm_*`` fields, the tokenizer without
    ``<image>``, and the vision tower as a separate CLIPModel checkpoint (``path/clip``, with its
    image processor) that ``mm_vision_tower`` names. Returns ``(path, hf)``: HF's
    ``LlavaForConditionalGeneration`` holding the same weights (``image_token_index`` 0, the
    config's ``pad_token_id``), the reference."""
    import json

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel, LlavaForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = tiny_llava_config(len(tok), 0)
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration(cfg).eval()
    state = hf.state_dict()
    clip_dir = os.path.join(path, "clip")
    clip = CLIPModel(CLIPConfig(vision_config=cfg.vision_config.to_dict(), text_config=dict(
        vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2))).eval()
    clip.load_state_dict({**clip.state_dict(), **{"vision_model." + k[len("model.vision_tower."):]: v
                                                  for k, v in state.items() if k.startswith("model.vision_tower.")}})
    clip.save_pretrained(clip_dir)
    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=side).save_pretrained(clip_dir)
    renames = (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1.", "model.mm_projector.0."),
               ("model.multi_modal_projector.linear_2.", "model.mm_projector.2."), ("lm_head.", "lm_head."))
    tensors = {new + k[len(old):]: v.contiguous() for k, v in state.items() for old, new in renames if k.startswith(old)}
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = {**cfg.text_config.to_dict(), "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              "mm_vision_tower": clip_dir, "mm_hidden_size": cfg.vision_config.hidden_size,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    tok.save_pretrained(path)
    return path, hf


if __name__ == "__main__":
    from treadle.runtime.model_files import resolve_model_files

    print(build_tiny_llava(sys.argv[1], resolve_model_files("default").model_dir))
