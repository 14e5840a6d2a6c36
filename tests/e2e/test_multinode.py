"""Two 'nodes' on this machine (loopback ``dist_init_addr``): node 0 serves, node 1 runs worker ranks."""

from __future__ import annotations

import socket
import threading

import pytest

from treadle import Engine

pytestmark = pytest.mark.e2e

PROMPTS = ["What is the capital of France?", "Once upon a time"]
PARAMS = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}


def test_tp2_across_two_nodes_matches_tp1(engine):
    want = [r["output_ids"] for r in engine.generate(prompt=PROMPTS, sampling_params=PARAMS)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kw = dict(model_path="default", tp_size=2, nnodes=2, dist_init_addr=f"127.0.0.1:{port}")
    node1: dict = {}

    def run_node1() -> None:  # as SGLang, Engine(node_rank=1) blocks while its workers serve node 0
        try:
            node1["engine"] = Engine(node_rank=1, **kw)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            node1["error"] = e

    t = threading.Thread(target=run_node1, daemon=True)
    t.start()
    with Engine(node_rank=0, **kw) as head:
        got = [r["output_ids"] for r in head.generate(prompt=PROMPTS, sampling_params=PARAMS)]
        local = sorted(n for n in head._sup.ready_info if n.startswith("worker"))
        assert t.is_alive()  # node 1 still holds rank 1
    t.join(timeout=30)  # node 0's shutdown stops node 1's workers, and its Engine returns
    assert not t.is_alive() and "error" not in node1, node1
    assert got == want
    assert local == ["worker0"]  # rank 1 ran on the other "node"
    with pytest.raises(RuntimeError, match="node_rank=1 of nnodes=2: it only runs worker ranks"):
        node1["engine"].generate("hi")
