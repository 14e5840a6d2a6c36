"""Media loading: ``to_media_refs`` shapes/errors (client) and ``load_image`` / ``load_video_frames``
(tokenizer process) over every source kind, local HTTP included. CPU only, no outside network."""

from __future__ import annotations

import base64
import io
import pathlib
import subprocess
import sys
import time

import pytest

from local_http import PROXY_VARS, closed_port, local_http_server
from media_files import COLOURS, write_video

av = pytest.importorskip("av")
Image = pytest.importorskip("PIL.Image")

from treadle.client.media import to_media_refs  # noqa: E402
from treadle.runtime.messages import MediaRef  # noqa: E402
from treadle.tokenizer_proc import media  # noqa: E402
from treadle.tokenizer_proc.media import load_image, load_video_frames  # noqa: E402


# ------------------------------------------------------------------ fixtures
def pattern(w: int = 7, h: int = 5, mode: str = "RGB") -> "Image.Image":
    im = Image.new("RGB", (w, h))
    im.putdata([((x * 37) % 256, (y * 53) % 256, (x * y * 11) % 256) for y in range(h) for x in range(w)])
    return im.convert(mode) if mode != "RGB" else im


def png_bytes(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def png(tmp_path):
    p = tmp_path / "img.png"
    pattern().save(p)
    return p


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    p = tmp_path_factory.mktemp("video") / "clip.mp4"
    write_video(p, 12)
    return p


def colour_index(im) -> int:
    """Which of COLOURS a decoded (lossy) solid frame is."""
    px = im.getpixel((16, 16))
    return min(range(len(COLOURS)), key=lambda i: sum((a - b) ** 2 for a, b in zip(px, COLOURS[i])))


@pytest.fixture
def server(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with local_http_server() as served:
        yield served


def refs1(value):
    """The single MediaRef of a single-prompt call."""
    (out,) = to_media_refs("image_data", value, None)
    assert len(out) == 1
    return out[0]


# ------------------------------------------------------------------ to_media_refs: shapes
def test_none_means_no_media():
    assert to_media_refs("image_data", None, None) == [[]]
    assert to_media_refs("image_data", None, 3) == [[], [], []]


def test_single_item_and_list():
    assert to_media_refs("image_data", "a.png", None) == [[MediaRef(source="a.png", label="image_data")]]
    # a list for a single prompt is several images of that prompt; labels say where each came from
    assert to_media_refs("image_data", ["a.png", b"xy"], None) == [
        [MediaRef(source="a.png", label="image_data[0]"), MediaRef(raw=b"xy", label="image_data[1]")]]
    assert to_media_refs("image_data", [], None) == [[]]


def test_batch_shapes():
    out = to_media_refs("video_data", ["a.mp4", None, ["b.mp4", b"c"], []], 4)
    assert out == [[MediaRef(source="a.mp4", label="video_data[0]")], [],
                   [MediaRef(source="b.mp4", label="video_data[2][0]"), MediaRef(raw=b"c", label="video_data[2][1]")], []]


def test_batch_length_mismatch():
    with pytest.raises(ValueError, match=r"^image_data has 3 entries but the batch has 2 prompts$"):
        to_media_refs("image_data", ["a", "b", "c"], 2)


def test_batch_needs_a_list():
    with pytest.raises(TypeError, match=r"^image_data: a batch of 2 prompts needs a list"):
        to_media_refs("image_data", "a.png", 2)


@pytest.mark.parametrize("value,batch,where,got", [
    (5, None, "image_data", "int"),
    (["a", 5], None, r"image_data\[1\]", "int"),
    (["a", None], None, r"image_data\[1\]", "NoneType"),
    (["a", ["b"]], None, r"image_data\[1\]", "list"),
    (["a", 2.5], 2, r"image_data\[1\]", "float"),
    (["a", ["b", {}]], 2, r"image_data\[1\]\[1\]", "dict"),
    ([None, [None]], 2, r"image_data\[1\]\[0\]", "NoneType"),
])
def test_wrong_types(value, batch, where, got):
    with pytest.raises(TypeError, match=rf"^{where}: expected a path, URL, base64 string, bytes or PIL image, "
                                        rf"got {got}$"):
        to_media_refs("image_data", value, batch)


@pytest.mark.parametrize("value,batch,where", [
    ("", None, "image_data"), ("   ", None, "image_data"), (["a", ""], None, r"image_data\[1\]"),
    ([b""], 1, r"image_data\[0\]"), ([["a", ""]], 1, r"image_data\[0\]\[1\]"),
])
def test_empty_values(value, batch, where):
    with pytest.raises(ValueError, match=rf"^{where}: empty"):
        to_media_refs("image_data", value, batch)


def test_item_kinds(tmp_path, monkeypatch):
    assert refs1(bytearray(b"ab")) == MediaRef(raw=b"ab", label="image_data")
    assert refs1(memoryview(b"ab")) == MediaRef(raw=b"ab", label="image_data")
    monkeypatch.chdir(tmp_path)
    assert refs1(pathlib.Path("x.png")).source == str(tmp_path / "x.png")  # made absolute
    ref = refs1(pattern())  # a PIL image travels as its RGB pixels, not re-encoded
    assert ref.source == "" and ref.raw == b"" and ref.rgb == pattern().tobytes() and ref.size == list(pattern().size)


def test_client_does_not_import_pil():
    code = "import sys, treadle.client.media; print('PIL' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------ load_image: sources
def test_path_and_path_object(png):
    want = pattern().tobytes()
    for ref in (MediaRef(source=str(png)), refs1(png)):
        im = load_image(ref, "image_data[0]")
        assert im.mode == "RGB" and im.size == (7, 5) and im.tobytes() == want


def test_expanduser(png, monkeypatch):
    monkeypatch.setenv("HOME", str(png.parent))
    assert load_image(MediaRef(source="~/img.png"), "f").size == (7, 5)


def test_file_url(png):
    assert load_image(MediaRef(source=png.as_uri()), "f").tobytes() == pattern().tobytes()


def test_data_url_and_bare_base64():
    b64 = base64.b64encode(png_bytes(pattern())).decode()
    want = pattern().tobytes()
    assert load_image(MediaRef(source=f"data:image/png;base64,{b64}"), "f").tobytes() == want
    assert load_image(MediaRef(source=b64), "f").tobytes() == want
    wrapped = "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76))  # MIME-style line wrapping
    assert load_image(MediaRef(source=wrapped), "f").tobytes() == want


def test_raw_bytes_and_pil_round_trip():
    im = pattern(9, 4)
    assert load_image(MediaRef(raw=png_bytes(im)), "f").tobytes() == im.tobytes()
    assert load_image(refs1(im), "f").tobytes() == im.tobytes()  # PIL → RGB bytes → PIL, pixel-exact


def test_pil_odd_mode_round_trip():
    im = pattern().convert("CMYK")  # the client converts any mode to RGB
    out = load_image(refs1(im), "f")
    assert out.mode == "RGB" and out.size == im.size and out.tobytes() == im.convert("RGB").tobytes()


def test_rgb_pixels_that_do_not_match_their_size():
    with pytest.raises(ValueError, match=r"^image_data\[0\]: 10 bytes of RGB pixels do not make a \[4, 4\] image"):
        load_image(MediaRef(rgb=b"0" * 10, size=[4, 4]), "image_data[0]")


def test_formats_and_modes(tmp_path):
    base = pattern(16, 16)
    base.save(tmp_path / "a.jpg", quality=95)
    rgba = base.convert("RGBA")
    rgba.putalpha(100)
    rgba.save(tmp_path / "b.png")
    base.convert("L").save(tmp_path / "c.png")
    base.convert("P").save(tmp_path / "d.png")
    pal = base.convert("P")
    pal.info["transparency"] = 0
    pal.save(tmp_path / "e.png", transparency=0)
    base.save(tmp_path / "f.gif")
    for name in ("a.jpg", "b.png", "c.png", "d.png", "e.png", "f.gif"):
        im = load_image(MediaRef(source=str(tmp_path / name)), "f")
        assert im.mode == "RGB" and im.size == (16, 16), name
    assert load_image(MediaRef(source=str(tmp_path / "b.png")), "f").tobytes() == base.tobytes()
    gray = load_image(MediaRef(source=str(tmp_path / "c.png")), "f")
    raw = gray.tobytes()
    assert raw[0::3] == raw[1::3] == raw[2::3]


def test_http(server, png):
    url, routes = server
    routes["/img.png"] = (png.read_bytes(), 0)
    im = load_image(MediaRef(source=f"{url}/img.png"), "image_data[2]")
    assert im.tobytes() == pattern().tobytes()


def test_http_404(server):
    url, _ = server
    with pytest.raises(ValueError, match=r"^image_data\[2\]: HTTP error 404"):
        load_image(MediaRef(source=f"{url}/nope.png"), "image_data[2]")


def test_http_unreachable():
    port = closed_port()
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^image_data\[0\]: unreachable URL http://127\.0\.0\.1"):
        load_image(MediaRef(source=f"http://127.0.0.1:{port}/x.png"), "image_data[0]", timeout=5)
    assert time.monotonic() - t0 < 3


def test_http_timeout(server, png):
    url, routes = server
    routes["/slow.png"] = (png.read_bytes(), 2.0)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^image_data\[0\]: timed out after 0\.5s fetching http"):
        load_image(MediaRef(source=f"{url}/slow.png"), "image_data[0]", timeout=0.5)
    assert time.monotonic() - t0 < 1.8


def test_http_size_cap(server, monkeypatch):
    url, routes = server
    routes["/big"] = (b"x" * 5000, 0)
    monkeypatch.setattr(media, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(ValueError, match=r"^image_data: .*over the 1000-byte download limit"):
        load_image(MediaRef(source=f"{url}/big"), "image_data")


# ------------------------------------------------------------------ load_image: errors
@pytest.mark.parametrize("ref_fn,msg", [
    (lambda d: MediaRef(source=str(d / "missing.png")), r"file not found: .*missing\.png"),
    (lambda d: MediaRef(source=(d / "missing.png").as_uri()), r"file not found: .*missing\.png"),
    (lambda d: MediaRef(source=str(d)), r"not a regular file"),
    (lambda d: MediaRef(source=str(d / "notes.txt")), r"not an image: .*notes\.txt"),
    (lambda d: MediaRef(raw=b"hello, not an image"), r"the given bytes are not an image"),
    (lambda d: MediaRef(raw=png_bytes(pattern(64, 64))[:80]), r"could not decode the image"),
    (lambda d: MediaRef(source="data:image/png;base64,@@@not base64@@@"), r"undecodable base64 in data URL"),
    (lambda d: MediaRef(source="data:image/png;base64"), r"malformed data URL"),
    (lambda d: MediaRef(source="data:image/png;base64," + base64.b64encode(b"text").decode()), r"not an image"),
    (lambda d: MediaRef(source="aGVsbG8gd29ybGQh"), r"not an existing file, and its base64 decoding is not an image"),
    (lambda d: MediaRef(source="abcde"), r"file not found: abcde"),
    (lambda d: MediaRef(source="ftp://host/x.png"), r"unsupported URL scheme 'ftp'"),
    (lambda d: MediaRef(), r"empty media reference"),
])
def test_image_errors(tmp_path, ref_fn, msg):
    (tmp_path / "notes.txt").write_text("just text\n")
    with pytest.raises(ValueError, match=rf"^image_data\[3\]: {msg}"):
        load_image(ref_fn(tmp_path), "image_data[3]")


# ------------------------------------------------------------------ video
def test_video_uniform_sampling(video):
    frames = load_video_frames(MediaRef(source=str(video)), "video_data[0]", 4)
    assert len(frames) == 4 and all(f.mode == "RGB" and f.size == (32, 32) for f in frames)
    assert [colour_index(f) for f in frames] == [0, 4, 7, 11]  # round(i * 11 / 3)


def test_video_one_and_all_frames(video):
    assert [colour_index(f) for f in load_video_frames(MediaRef(source=str(video)), "v", 1)] == [5]
    assert [colour_index(f) for f in load_video_frames(MediaRef(source=str(video)), "v", 12)] == list(range(12))
    # fewer frames than asked: all of them
    assert [colour_index(f) for f in load_video_frames(MediaRef(source=str(video)), "v", 30)] == list(range(12))


def test_video_sources(video, server):
    data = video.read_bytes()
    url, routes = server
    routes["/clip.mp4"] = (data, 0)
    b64 = base64.b64encode(data).decode()
    for ref in (MediaRef(raw=data), MediaRef(source=f"data:video/mp4;base64,{b64}"), MediaRef(source=b64),
                MediaRef(source=video.as_uri()), MediaRef(source=f"{url}/clip.mp4"),
                to_media_refs("video_data", video, None)[0][0]):
        assert [colour_index(f) for f in load_video_frames(ref, "v", 3)] == [0, 6, 11], ref.source[:40]


def test_video_frame_count_by_decoding(video, monkeypatch):
    monkeypatch.setattr(media, "_reported_frames", lambda av, src: 0)  # container reports no count
    assert [colour_index(f) for f in load_video_frames(MediaRef(source=str(video)), "v", 4)] == [0, 4, 7, 11]


def test_video_over_reported_count(video, monkeypatch):
    monkeypatch.setattr(media, "_reported_frames", lambda av, src: 40)  # container claims more than it has
    assert [colour_index(f) for f in load_video_frames(MediaRef(source=str(video)), "v", 4)] == [0, 4, 7, 11]


@pytest.mark.parametrize("ref_fn,msg", [
    (lambda d: MediaRef(raw=b"this is plain text, not a video at all" * 20), r"the given bytes are not a video"),
    (lambda d: MediaRef(source=str(d / "notes.txt")), r"not a video: .*notes\.txt"),
    (lambda d: MediaRef(source=str(d / "missing.mp4")), r"file not found: .*missing\.mp4"),
    (lambda d: MediaRef(source="data:video/mp4;base64,%%%"), r"undecodable base64 in data URL"),
])
def test_video_errors(tmp_path, ref_fn, msg):
    (tmp_path / "notes.txt").write_text("just text\n" * 50)
    with pytest.raises(ValueError, match=rf"^video_data\[1\]: {msg}"):
        load_video_frames(ref_fn(tmp_path), "video_data[1]", 4)


def test_video_without_video_stream(tmp_path):
    p = tmp_path / "tone.wav"
    with av.open(str(p), mode="w", format="wav") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame(format="s16", layout="mono", samples=800)
        for plane in frame.planes:
            plane.update(bytes(plane.buffer_size))
        frame.sample_rate = 8000
        for pkt in s.encode(frame):
            c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    with pytest.raises(ValueError, match=r"^video_data\[0\]: no video stream"):
        load_video_frames(MediaRef(source=str(p)), "video_data[0]", 2)


def test_video_bad_num_frames(video):
    with pytest.raises(ValueError, match=r"^v: num_frames must be >= 1"):
        load_video_frames(MediaRef(source=str(video)), "v", 0)
