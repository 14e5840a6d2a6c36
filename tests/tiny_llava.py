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


if __name__ == "__main__":
    from treadle.runtime.model_files import resolve_model_files

    print(build_tiny_llava(sys.argv[1], resolve_model_files("default").model_dir))
