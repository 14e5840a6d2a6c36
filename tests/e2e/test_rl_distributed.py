"""RL weight sync and memory release on a ``tp_size=2`` engine (issue 26).

A trainer process (tests/rl_trainer.py, plain torch) opens a gloo group with the engine's two
workers and broadcasts a perturbed checkpoint; after ``update_weights_from_distributed`` the
engine's greedy tokens and logprobs must be transformers' on the perturbed weights, and
``get_weights_by_name`` must put the new tensors back together from both ranks' shards. Then
``release_memory_occupation`` / ``resume_memory_occupation`` cycles must leave the outputs as
they were."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from test_weight_updates import assert_matches_hf, checkpoint, hf_reference, perturbed

pytestmark = pytest.mark.e2e
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
GREEDY = {"temperature": 0, "max_new_tokens": 8}
TRAINER = os.path.join(os.path.dirname(os.path.dirname(__file__)), "rl_trainer.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tp2(default_model_dir):
    from treadle import Engine

    eng = Engine(model_path=default_model_dir, tp_size=2, random_seed=0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def new_weights(default_model_dir, tmp_path_factory) -> str:
    return checkpoint(default_model_dir, tmp_path_factory.mktemp("rl") / "step1", perturbed)


def run_greedy(engine) -> list[dict]:
    return engine.generate(prompt=PROMPTS, sampling_params=GREEDY, return_logprob=True)


class Trainer:
    """The trainer process, rank 0 of a group of 3 (it + the engine's two workers)."""

    def __init__(self, weights: str) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, TRAINER, str(self.port), "3", weights],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, what: str = "all") -> None:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def test_a_trainer_broadcast_gives_transformers_tokens_and_logprobs(tp2, new_weights, hf_tokenizer):
    before = run_greedy(tp2)
    trainer = Trainer(os.path.join(new_weights, "model.safetensors"))
    try:
        ok, message = tp2.init_weights_update_group("127.0.0.1", trainer.port, 1, 3, backend="gloo")
        assert ok, message
        saved = load_file(os.path.join(new_weights, "model.safetensors"))
        names = sorted(saved)
        shapes = [list(saved[n].shape) for n in names]
        # a request in flight during the update finishes on the old weights and says so
        long = {}
        t = threading.Thread(target=lambda: long.update(r=tp2.generate(
            prompt="Tell me a long story", sampling_params={"temperature": 0, "max_new_tokens": 32, "ignore_eos": True})))
        t.start()
        time.sleep(0.5)
        trainer.send()
        ok, message = tp2.update_weights_from_distributed(names, [saved[n].dtype for n in names], shapes)
        assert ok, message
        t.join(timeout=120)
        assert long["r"]["meta_info"]["completion_tokens"] == 32
        assert long["r"]["meta_info"]["weight_version"] == before[0]["meta_info"]["weight_version"]
        after = run_greedy(tp2)
        assert {r["meta_info"]["weight_version"] for r in after} != {before[0]["meta_info"]["weight_version"]}
        assert_matches_hf(after, hf_reference(new_weights, hf_tokenizer))
        for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.3.self_attn.o_proj.weight",
                     "model.layers.2.mlp.gate_proj.weight", "model.norm.weight", "lm_head.weight"):
            got = torch.tensor(tp2.get_weights_by_name(name, truncate_size=4))  # both ranks' shards, put together
            assert torch.equal(got, saved.get(name, saved["model.embed_tokens.weight"])[:4].float()), name

        # an update whose tensors do not fit the model changes nothing (all are received first)
        trainer.send("bad")
        ok, message = tp2.update_weights_from_distributed(
            names + ["model.layers.0.mlp.nonsense.weight"], [saved[n].dtype for n in names] + ["float32"],
            shapes + [[3]])
        assert not ok and "nonsense" in message, message
        assert [r["output_ids"] for r in run_greedy(tp2)] == [r["output_ids"] for r in after]
    finally:
        trainer.close()
    assert tp2.destroy_weights_update_group() == (True, "Succeeded to destroy custom process group "
                                                          "weight_update_group.")
    ok, message = tp2.destroy_weights_update_group()
    assert not ok and "no weight update group" in message


def test_group_arguments_are_checked_before_any_work(tp2):
    with pytest.raises(ValueError, match="nccl"):
        tp2.init_weights_update_group("127.0.0.1", 29500, 1, 3)  # backend defaults to nccl: CUDA only
    with pytest.raises(ValueError, match="world_size"):
        tp2.init_weights_update_group("127.0.0.1", 29500, 1, 2, backend="gloo")  # 1 + two workers > 2
    with pytest.raises(ValueError, match="master_port"):
        tp2.init_weights_update_group("127.0.0.1", 0, 1, 3, backend="gloo")
    with pytest.raises(ValueError, match="names, dtypes and shapes"):
        tp2.update_weights_from_distributed(["a", "b"], ["float32"], [[1], [1]])
    with pytest.raises(ValueError, match=r"dtypes\[0\]"):
        tp2.update_weights_from_distributed(["a"], ["float99"], [[1]])
    ok, message = tp2.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[576]], group_name="none")
    assert not ok and "init_weights_update_group" in message


@pytest.mark.parametrize("tags", [["weights"], ["kv_cache"], None])
def test_release_and_resume_twenty_times_keeps_the_outputs(tp2, tags):
    want = [r["output_ids"] for r in run_greedy(tp2)]
    for _ in range(20):
        tp2.release_memory_occupation(tags)
        tp2.resume_memory_occupation(tags)
    assert [r["output_ids"] for r in run_greedy(tp2)] == want
    assert tp2._check_integrity()["num_running"] == 0


def test_requests_and_weight_updates_are_refused_while_released(tp2):
    tp2.release_memory_occupation()
    try:
        with pytest.raises(RuntimeError, match="resume_memory_occupation"):
            tp2.generate(prompt="x", sampling_params={"max_new_tokens": 1})
        ok, message = tp2.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[576]])
        assert not ok and "released" in message
        with pytest.raises(ValueError, match="tags"):
            tp2.release_memory_occupation(["everything"])
    finally:
        tp2.resume_memory_occupation()
    assert tp2.generate(prompt="x", sampling_params={"max_new_tokens": 1})["meta_info"]["completion_tokens"] == 1
