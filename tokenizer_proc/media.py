"""Loading the images and videos of a request (``MediaRef`` → RGB PIL images).

This runs in the tokenizer process, not the user's: reading files, fetching URLs and decoding
pictures is slow, blocking work that must stay off the user's event loop, and doing it here,
before the request is scheduled, means a bad input fails alone with a ``ValueError`` that names the
offending field (``image_data[1]: file not found: ...``) and never reaches the scheduler or the GPU.
Every failure, PIL's and PyAV's own included, is translated into such a ``ValueError``.

Sources, in the order they are tried: ``raw`` bytes; ``data:`` URL; ``file://`` URL;
``http(s)://`` URL (fetched with a timeout and a size cap); local path; bare base64.
Pillow and PyAV are imported on first use (the ``multimodal`` extra), so text-only engines need
neither.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import io
import os
import string
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING, Any, Union

from treadle.runtime.messages import MediaRef

if TYPE_CHECKING:
    import PIL.Image

MAX_DOWNLOAD_BYTES = 64 << 20  # cap on one fetched URL, so a huge or endless response cannot exhaust memory
_B64_CHARS = frozenset(string.ascii_letters + string.digits + "+/=-_")
_CHUNK = 1 << 20


def load_image(ref: MediaRef, field: str, timeout: float = 10.0) -> "PIL.Image.Image":
    """Load one image as a fully decoded RGB ``PIL.Image`` (EXIF orientation applied)."""
    Image, ImageOps = _pil()
    if ref.size:  # a PIL image's pixels, sent as they were
        if len(ref.size) != 2 or min(ref.size) <= 0 or len(ref.rgb) != ref.size[0] * ref.size[1] * 3:
            raise ValueError(f"{field}: {len(ref.rgb)} bytes of RGB pixels do not make a {ref.size} image")
        return Image.frombytes("RGB", tuple(ref.size), ref.rgb)
    src = _resolve(ref, field, timeout)
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            im.load()  # decode now, so truncated/corrupt data fails here and not in the processor
            if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation: show it the way viewers do
                im = ImageOps.exif_transpose(im)
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")  # the direct P→RGB conversion warns about palette transparency
            return im.convert("RGB")  # a copy even when already RGB, so closing the file is safe
    except Image.UnidentifiedImageError:
        raise ValueError(_not_media(ref, field, "an image")) from None
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{field}: could not decode the image{_what(ref)}: {type(e).__name__}: {e}") from None


def load_video_frames(ref: MediaRef, field: str, num_frames: int,
                      timeout: float = 10.0) -> list["PIL.Image.Image"]:
    """Decode a video and return ``num_frames`` RGB frames sampled uniformly over all of it.

    Frame ``i`` of ``k`` is frame ``round(i * (total - 1) / (k - 1))``, so the first and last frames
    are always included (``k == 1`` takes the middle frame); a video with fewer than ``k`` frames
    returns all of them. The frame count comes from the container when it reports one, otherwise
    from a decoding pass; a container that over-reports is recounted and resampled.
    """
    if num_frames < 1:
        raise ValueError(f"{field}: num_frames must be >= 1, got {num_frames}")
    av = _av()
    src = _resolve(ref, field, timeout)
    try:
        total = _reported_frames(av, src)
        if total <= 0:
            total = _decode(av, src, None)[1]
        if total <= 0:
            raise ValueError(f"{field}: the video has no decodable frames{_what(ref)}")
        picks = _uniform(total, num_frames)
        frames, seen = _decode(av, src, set(picks))
        if len(frames) < len(set(picks)):  # fewer frames than reported: sample what is really there
            if seen <= 0:
                raise ValueError(f"{field}: the video has no decodable frames{_what(ref)}")
            picks = _uniform(seen, num_frames)
            frames, _ = _decode(av, src, set(picks))
        return [frames[i] for i in picks]
    except _NoVideoStream:
        raise ValueError(f"{field}: no video stream in the file{_what(ref)}") from None
    except ValueError as e:
        if str(e).startswith(field):
            raise
        raise ValueError(_not_media(ref, field, "a video", e)) from None
    except Exception as e:  # av.FFmpegError (InvalidDataError, ...), OSError, ...
        raise ValueError(_not_media(ref, field, "a video", e)) from None


# ------------------------------------------------------------------ sources
def _resolve(ref: MediaRef, field: str, timeout: float) -> Union[bytes, str]:
    """The media's encoded bytes, or the path of a local file holding them."""
    if ref.raw:
        return ref.raw
    s = ref.source.strip()
    if not s:
        raise ValueError(f"{field}: empty media reference (no source and no bytes)")
    low = s[:16].lower()
    if low.startswith("data:"):
        return _data_url(s, field)
    if low.startswith("file://"):
        p = urllib.parse.urlparse(s)
        if p.netloc not in ("", "localhost"):
            raise ValueError(f"{field}: file:// URL on another host is not supported: {_short(s)}")
        return _local_file(urllib.request.url2pathname(p.path), field)
    if low.startswith(("http://", "https://")):
        return _fetch(s, field, timeout)
    if "://" in s[:32]:
        raise ValueError(f"{field}: unsupported URL scheme {s.split('://', 1)[0]!r} "
                         "(use a path, file://, http(s)://, data: URL or base64)")
    path = os.path.expanduser(s)
    if os.path.exists(path) or not _looks_like_base64(s):
        return _local_file(path, field)
    try:
        return base64.b64decode(_squash(s), altchars=b"-_" if ("-" in s or "_" in s) else None, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field}: file not found, and not valid base64 either: {_short(s)}") from None


def _local_file(path: str, field: str) -> str:
    if not os.path.exists(path):
        raise ValueError(f"{field}: file not found: {path}")
    if not os.path.isfile(path):
        raise ValueError(f"{field}: not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{field}: file not readable: {path}")
    return path


def _data_url(s: str, field: str) -> bytes:
    """``data:[<mediatype>][;base64],<data>`` (RFC 2397)."""
    header, comma, payload = s[5:].partition(",")
    if not comma:
        raise ValueError(f"{field}: malformed data URL (no comma): {_short(s)}")
    if not header.lower().split(";")[-1].strip() == "base64":
        data = urllib.parse.unquote_to_bytes(payload)
    else:
        try:
            payload = _squash(urllib.parse.unquote(payload))
            data = base64.b64decode(payload, altchars=b"-_" if ("-" in payload or "_" in payload) else None,
                                    validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"{field}: undecodable base64 in data URL ({e}): {_short(s)}") from None
    if not data:
        raise ValueError(f"{field}: empty data URL")
    return data


def _fetch(url: str, field: str, timeout: float) -> bytes:
    """GET ``url`` with ``timeout`` (connect, each read, and the whole body) and ``MAX_DOWNLOAD_BYTES``."""
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(url, headers={"User-Agent": "treadle"})
    opener = urllib.request.build_opener()  # per call, so it picks up the current proxy settings
    try:
        with opener.open(req, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > MAX_DOWNLOAD_BYTES:
                raise ValueError(f"{field}: {url} is {int(length)} bytes, over the "
                                 f"{MAX_DOWNLOAD_BYTES}-byte download limit")
            chunks, size = [], 0
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ValueError(f"{field}: {url} is over the {MAX_DOWNLOAD_BYTES}-byte download limit")
                if time.monotonic() > deadline:
                    raise TimeoutError()
                chunks.append(chunk)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{field}: HTTP error {e.code} {e.reason} fetching {url}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise ValueError(f"{field}: timed out after {timeout:g}s fetching {url}") from None
        raise ValueError(f"{field}: unreachable URL {url}: {e.reason}") from None
    except TimeoutError:
        raise ValueError(f"{field}: timed out after {timeout:g}s fetching {url}") from None
    except ValueError as e:
        if str(e).startswith(field):
            raise
        raise ValueError(f"{field}: invalid URL {url}: {e}") from None
    except (OSError, http.client.HTTPException) as e:
        raise ValueError(f"{field}: failed fetching {url}: {type(e).__name__}: {e}") from None
    data = b"".join(chunks)
    if not data:
        raise ValueError(f"{field}: empty response from {url}")
    return data


def _looks_like_base64(s: str) -> bool:
    """Could ``s`` be base64 rather than a path? Paths usually have a ``.`` or ``~``; base64 never does."""
    t = _squash(s)
    return len(t) % 4 != 1 and len(t) >= 4 and all(c in _B64_CHARS for c in t)


def _squash(s: str) -> str:
    return "".join(s.split())  # base64 text is often wrapped at 76 columns


# ------------------------------------------------------------------ video
_TEXT_DEMUXERS = frozenset({"tty", "bin", "xbin", "adf", "idf"})
_TEXT_CODECS = frozenset({"ansi", "bintext", "xbin", "idf"})


class _NoVideoStream(Exception):
    pass


def _open(av: Any, src: Union[bytes, str]) -> Any:
    return av.open(io.BytesIO(src) if isinstance(src, bytes) else src, mode="r")


def _reported_frames(av: Any, src: Union[bytes, str]) -> int:
    with _open(av, src) as c:
        return int(_video_stream(c).frames or 0)


def _decode(av: Any, src: Union[bytes, str], picks: "set[int] | None") -> "tuple[dict[int, Any], int]":
    """Decode in order, keeping frames whose index is in ``picks`` (``None``: count only).

    Returns the kept frames by index and how many frames were decoded; stops after the last pick.
    """
    kept: dict[int, Any] = {}
    last = max(picks) if picks else -1
    n = 0
    with _open(av, src) as c:
        stream = _video_stream(c)
        stream.thread_type = "AUTO"
        for frame in c.decode(stream):
            if picks is not None and n in picks:
                kept[n] = frame.to_image()  # RGB24 PIL image
            n += 1
            if picks is not None and n > last:
                break
    return kept, n


def _video_stream(container: Any) -> Any:
    if not container.streams.video:
        raise _NoVideoStream()
    stream = container.streams.video[0]
    # FFmpeg "plays" text files (tty demuxer, ANSI art codecs) as video; that is never what was meant.
    if container.format.name in _TEXT_DEMUXERS or stream.codec_context.name in _TEXT_CODECS:
        raise ValueError(f"a text file ({container.format.name} demuxer)")
    return stream


def _uniform(total: int, k: int) -> list[int]:
    """``k`` indices spread evenly over ``range(total)``, first and last included (round half up)."""
    if k >= total:
        return list(range(total))
    if k == 1:
        return [(total - 1) // 2]
    return [(2 * i * (total - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k)]


# ------------------------------------------------------------------ helpers
def _pil() -> tuple[Any, Any]:
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError("image input needs Pillow: pip install 'treadle[multimodal]'") from None
    return Image, ImageOps


def _av() -> Any:
    _pil()  # frames are returned as PIL images
    try:
        import av
    except ImportError:
        raise ImportError("video input needs PyAV: pip install 'treadle[multimodal]'") from None
    return av


def _what(ref: MediaRef) -> str:
    return f" ({len(ref.raw)} bytes given)" if ref.raw else f" ({_short(ref.source)})"


def _not_media(ref: MediaRef, field: str, kind: str, err: Any = None) -> str:
    why = f": {type(err).__name__}: {err}" if err is not None else ""
    if ref.raw:
        return f"{field}: the given bytes are not {kind}{why}"
    s = ref.source.strip()
    if not s.lower().startswith(("data:", "file://", "http://", "https://")) and \
            not os.path.exists(os.path.expanduser(s)):
        return f"{field}: not an existing file, and its base64 decoding is not {kind}: {_short(s)}"
    return f"{field}: not {kind}: {_short(s)}{why}"


def _short(s: str, n: int = 80) -> str:
    return s if len(s) <= n else f"{s[:n]}... ({len(s)} chars)"
