"""RemoteEngine's request bodies: what JSON cannot carry is converted as the in-process Engine
would read it, or refused naming the field; bad calls the client can see fail before sending."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest

from treadle import RemoteEngine
from treadle.client.remote_args import media_json, processor_json
from treadle.runtime.logit_processor import DisallowedTokensLogitsProcessor


def remote(requests: list) -> RemoteEngine:
    """A RemoteEngine whose server records the requests and answers one result."""

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"text": "", "output_ids": [], "meta_info": {"id": "r"}})

    return RemoteEngine("http://treadle.test", transport=httpx.MockTransport(answer))


def test_local_checks_before_sending():
    sent: list = []
    eng = remote(sent)
    with pytest.raises(ValueError, match="not both"):
        eng.generate(prompt="a", input_ids=[1])
    with pytest.raises(ValueError, match="should be provided"):
        eng.generate()
    with pytest.raises(TypeError, match="sampling_params"):
        eng.generate(prompt="a", sampling_params={"max_new_tokens": object()})
    with pytest.raises(ValueError, match="capacity_of_str_len"):
        eng.open_session(capacity_of_str_len=-1)
    assert sent == []


# ---------------------------------------------------------------------------------------- arguments
def test_media_become_strings_the_server_reads(tmp_path):
    png = tmp_path / "dot.png"
    from PIL import Image

    image = Image.new("RGB", (3, 2), (10, 20, 30))
    image.save(png)
    assert media_json("image_data", "https://example.com/a.jpg") == "https://example.com/a.jpg"
    assert media_json("image_data", b"\x89PNG") == "data:application/octet-stream;base64," + \
        base64.b64encode(b"\x89PNG").decode()
    assert media_json("image_data", str(png)).startswith("data:image/png;base64,")
    assert media_json("image_data", png) == media_json("image_data", f"file://{png}")
    url = media_json("image_data", image)
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert decoded.size == (3, 2) and decoded.getpixel((1, 1)) == (10, 20, 30)
    assert media_json("image_data", [[b"a", "x.jpg"], None]) == [["data:application/octet-stream;base64,YQ==",
                                                                  "x.jpg"], None]
    with pytest.raises(TypeError, match=r"image_data\[1\]"):
        media_json("image_data", ["x.jpg", 3])


class Scaled(DisallowedTokensLogitsProcessor):
    def __init__(self):
        self.factor = 2


def test_logit_processors_travel_as_their_import_path():
    path = DisallowedTokensLogitsProcessor.to_str()
    assert processor_json(DisallowedTokensLogitsProcessor) == path
    assert processor_json(DisallowedTokensLogitsProcessor()) == path
    assert processor_json(["pkg.mod:Name", None]) == ["pkg.mod:Name", None]
    with pytest.raises(TypeError, match="custom_logit_processor"):
        processor_json(Scaled())
    sent: list = []
    remote(sent).generate(prompt="a", custom_logit_processor=DisallowedTokensLogitsProcessor,
                 sampling_params={"custom_params": {"token_ids": [1]}})
    assert json.loads(sent[0].content)["custom_logit_processor"] == path
