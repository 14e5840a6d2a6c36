"""Chat completions with ``image_url`` parts on a tiny LLaVA, served with a ``chat_template``
override (SGLang's ``--chat-template``, a server argument the Engine accepts for the server):
the image goes to the engine's ``image_data``, the template's ``<image>`` placeholder is
expanded by the engine, and the greedy answer equals the in-process engine's on the same
prompt and image."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from serve_helpers import serve_in_thread
from treadle import Engine

pytestmark = pytest.mark.e2e

# renders OpenAI-style parts: text as is, each image as LLaVA's placeholder (the newline as an expression:
# transformers renders templates with trim_blocks, which eats a newline after a block tag)
TEMPLATE = ("{% for m in messages %}{{ m.role }}: {% if m.content is string %}{{ m.content }}{% else %}"
            "{% for p in m.content %}{% if p.type == 'image' %}<image>{% else %}{{ p.text }}{% endif %}{% endfor %}"
            "{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


def _data_url(seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def llava(tiny_llava_dir):
    eng = Engine(model_path=tiny_llava_dir, random_seed=0, chat_template=TEMPLATE)
    yield eng
    eng.shutdown()


def test_image_parts_reach_the_engine_and_the_override_template_is_used(llava):
    image = _data_url(1)
    with serve_in_thread(llava, "llava") as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.chat.completions.create(model="llava", max_tokens=6, temperature=0, messages=[
            {"role": "user", "content": [{"type": "text", "text": "Describe "},
                                         {"type": "image_url", "image_url": {"url": image}}]}])
    ref = llava.generate(prompt="user: Describe <image>\nassistant:", image_data=image,
                         sampling_params={"max_new_tokens": 6, "temperature": 0})
    assert out.choices[0].message.content == ref["text"]
    assert out.usage.prompt_tokens == ref["meta_info"]["prompt_tokens"] > 16  # the 16 image tokens counted
