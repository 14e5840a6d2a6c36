"""ZeroMQ helpers: a private ipc directory per engine and typed msgspec senders/receivers."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from typing import Any, Optional

import msgspec
import zmq

_ENCODER = msgspec.msgpack.Encoder()


# Waits for the owner to die, then removes the directory. A shell loop, not a Python process: it
# costs nothing while it waits. ($0: the owner's pid, $1: the directory.)
_JANITOR = 'while kill -0 "$0" 2>/dev/null; do sleep 0.2; done; rm -rf -- "$1"'


class IpcDir:
    """A private temp directory (mode 0700: only its owner can connect) holding one engine's
    ``ipc://`` endpoints, so two engines never collide.

    ``shutdown()`` removes it. If the user's process dies without one (SIGKILL, SIGTERM with no
    handler), its children die with it (parent-death signal) and cannot clean up either; so a
    janitor, a shell loop started with the directory, removes it within 0.2 s of the owner's death.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path or tempfile.mkdtemp(prefix="treadle-")
        self._janitor = subprocess.Popen(["sh", "-c", _JANITOR, str(os.getpid()), self.path],
                                         start_new_session=True, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def endpoint(self, name: str) -> str:
        return f"ipc://{os.path.join(self.path, name)}"

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self._janitor.poll() is None:
            self._janitor.kill()
            self._janitor.wait()


def make_socket(ctx: zmq.Context, kind: int, endpoint: str, bind: bool) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if bind:
        sock.bind(endpoint)
    else:
        sock.connect(endpoint)
    return sock


class Sender:
    """A PUSH socket that sends msgspec Structs."""

    def __init__(self, ctx: zmq.Context, endpoint: str, bind: bool = False) -> None:
        self.sock = make_socket(ctx, zmq.PUSH, endpoint, bind)

    def send(self, msg: Any) -> None:
        self.sock.send(_ENCODER.encode(msg), copy=False)

    def send_bytes(self, payload: bytes) -> None:
        self.sock.send(payload, copy=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class Receiver:
    """A PULL socket that decodes one tagged union; a foreign or malformed frame raises
    ``msgspec.DecodeError``/``ValidationError`` and is never executed."""

    def __init__(self, ctx: zmq.Context, endpoint: str, union: Any, bind: bool = True) -> None:
        self.sock = make_socket(ctx, zmq.PULL, endpoint, bind)
        self.decoder = msgspec.msgpack.Decoder(union)

    def recv(self, timeout_ms: Optional[int] = None) -> Any:
        """The next message, or None after ``timeout_ms`` (None blocks)."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms):
            return None
        return self.decoder.decode(self.sock.recv(copy=False).buffer)

    def recv_nowait(self) -> Any:
        try:
            frame = self.sock.recv(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        return self.decoder.decode(frame.buffer)

    def close(self) -> None:
        self.sock.close(linger=0)
