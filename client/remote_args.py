"""The arguments of ``RemoteEngine``'s calls as the JSON bodies of SGLang's native routes.

What JSON cannot carry is converted the way the in-process ``Engine`` would read it (bytes, a PIL
image or a local file as a base64 data URL; a ``CustomLogitProcessor`` as its ``to_str()``) or
refused with a ``TypeError`` naming the field. The rest is checked by the server, whose 400 names
the field (``remote_wire.py`` turns it into the in-process exception).
"""

from __future__ import annotations

import base64
import dataclasses
import io
import mimetypes
import os
import pathlib
import sys
from typing import Any

import msgspec

from treadle.runtime.logit_processor import CustomLogitProcessor
from treadle.runtime.server_args import ServerArgs

_encoder = msgspec.json.Encoder(enc_hook=lambda obj: _plain(obj))


def _plain(obj: Any) -> Any:
    """What msgspec cannot encode itself: numpy arrays and scalars, torch tensors, paths."""
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


def encode_body(body: dict[str, Any]) -> bytes:
    """The request body as JSON; a value JSON cannot carry is a ``TypeError`` naming its field."""
    try:
        return _encoder.encode(body)
    except (TypeError, OverflowError, msgspec.EncodeError):
        pass
    for key, value in body.items():  # find the field at fault, for the message
        try:
            _encoder.encode(value)
        except (TypeError, OverflowError, msgspec.EncodeError) as e:
            raise TypeError(f"{key}: cannot be sent to the server as JSON ({e}).") from None
    raise TypeError("The request cannot be sent to the server as JSON.")


def media_json(field: str, value: Any) -> Any:
    """``image_data`` / ``video_data`` as JSON strings: URLs and base64 stay as they are; bytes, a
    PIL image and a local file become base64 data URLs, so a server on another machine gets the
    content, not a path it cannot read. Lists (per prompt, several per prompt) keep their shape."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [media_json(f"{field}[{i}]", v) for i, v in enumerate(value)]
    if isinstance(value, (bytes, bytearray, memoryview)):
        if not len(value):
            raise ValueError(f"{field}: empty bytes")
        return data_url(bytes(value), "application/octet-stream")
    if isinstance(value, pathlib.PurePath):
        value = os.path.expanduser(str(value))
        if not os.path.isfile(value):
            raise ValueError(f"{field}: file not found: {value}")
        return _file_url(value)
    if isinstance(value, str):
        local = value[len("file://"):] if value.startswith("file://") else value
        if "://" not in local and not local.startswith("data:") and os.path.isfile(local):
            return _file_url(local)
        return value
    pil = sys.modules.get("PIL.Image")  # no PIL loaded means this cannot be a PIL image
    if pil is not None and isinstance(value, pil.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")  # lossless: the server decodes the same pixels
        return data_url(buf.getvalue(), "image/png")
    raise TypeError(f"{field}: expected a path, URL, base64 string, bytes or PIL image, got {type(value).__name__}")


def _file_url(path: str) -> str:
    with open(path, "rb") as f:
        return data_url(f.read(), mimetypes.guess_type(path)[0] or "application/octet-stream")


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def processor_json(value: Any) -> Any:
    """``custom_logit_processor`` as the string the server takes: a class (or an instance without
    attributes) becomes its ``to_str()`` import path. An instance's attributes cannot ride in that
    string, so such an instance is refused (put per-request data in ``custom_params``)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return [processor_json(v) for v in value]
    if isinstance(value, type) and issubclass(value, CustomLogitProcessor):
        return value.to_str()
    if isinstance(value, CustomLogitProcessor):
        if vars(value):
            raise TypeError(f"custom_logit_processor: an instance of {type(value).__qualname__} with attributes "
                            "cannot be sent over HTTP; pass the class (or 'package.module:Name') and put "
                            "per-request data in sampling_params['custom_params'].")
        return type(value).to_str()
    raise TypeError("custom_logit_processor must be a CustomLogitProcessor subclass or instance, or a string, "
                    f"got {type(value).__name__}.")


def generate_body(args: dict[str, Any]) -> dict[str, Any]:
    """``generate``'s arguments as ``/generate``'s JSON: ``prompt`` is ``text``, media and logit
    processors become strings, arguments left at None are left out."""
    unsupported = args.pop("unsupported", {}) or {}
    if args.get("prompt") is not None and args.get("input_ids") is not None:
        raise ValueError("Give either prompt or input_ids, not both.")
    if args.get("prompt") is None and args.get("input_ids") is None:
        raise ValueError("Either prompt or input_ids should be provided.")
    if not isinstance(args.get("stream"), bool):
        raise TypeError(f"stream must be a bool, got {type(args.get('stream')).__name__}.")
    args["text"] = args.pop("prompt")
    for field in ("image_data", "video_data", "audio_data"):
        args[field] = media_json(field, args.get(field))
    args["custom_logit_processor"] = processor_json(args.get("custom_logit_processor"))
    body = {k: v for k, v in args.items() if v is not None}
    body.update(unsupported)  # the server names them in its error, as the Engine does
    return body


def encode_body_of(prompt: Any, image_data: Any, rid: Any, lora_path: Any, unsupported: dict[str, Any]
                   ) -> dict[str, Any]:
    args = {"text": prompt, "image_data": media_json("image_data", image_data), "rid": rid, "lora_path": lora_path}
    body = {k: v for k, v in args.items() if v is not None}
    body.update(unsupported)
    return body


def server_args_of(info: dict[str, Any]) -> ServerArgs:
    """The ``ServerArgs`` a server reports (its effective values; not checked again here: the server
    checked them, and a path in them names a file on the server's machine)."""
    args = ServerArgs.__new__(ServerArgs)
    for f in dataclasses.fields(ServerArgs):
        if f.name in info:
            value = info[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            value = f.default_factory()  # type: ignore[misc]
        else:
            value = None
        object.__setattr__(args, f.name, value)
    return args
