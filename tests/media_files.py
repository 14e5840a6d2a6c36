"""Test media written on the fly (importable from tests/unit and tests/e2e, like local_http.py).

Callers skip their module first when PyAV or Pillow is missing (``pytest.importorskip``).
"""

from __future__ import annotations

import pathlib

# Distinct solid colours, one a video frame (lossy codecs keep them tellable apart).
COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255), (0, 255, 255),
           (255, 255, 255), (0, 0, 0), (128, 0, 0), (0, 128, 0), (0, 0, 128), (128, 128, 128)]


def write_video(path: pathlib.Path, n: int = 12) -> None:
    """``n`` frames of distinct solid colours, 32x32, with the first codec this PyAV can encode."""
    import av
    from PIL import Image

    errors = []
    for codec, fmt in (("mpeg4", "mp4"), ("libx264", "mp4"), ("mjpeg", "avi"), ("libvpx", "webm")):
        try:
            with av.open(str(path), mode="w", format=fmt) as c:
                s = c.add_stream(codec, rate=12)
                s.width, s.height, s.pix_fmt = 32, 32, "yuvj420p" if codec == "mjpeg" else "yuv420p"
                for i in range(n):
                    frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), COLOURS[i % len(COLOURS)]))
                    for pkt in s.encode(frame):
                        c.mux(pkt)
                for pkt in s.encode():
                    c.mux(pkt)
            return
        except Exception as e:  # this codec is not available here: try the next
            errors.append(f"{codec}: {e}")
    raise RuntimeError(f"no usable video encoder: {errors}")
