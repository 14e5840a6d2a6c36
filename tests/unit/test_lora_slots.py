"""The scheduler's LoRA slot table (``scheduler_proc/lora_slots.py``) and ``lora_paths`` parsing."""

from __future__ import annotations

import pytest

from treadle.runtime.messages import LoraLoad
from treadle.runtime.lora_args import parse_lora_paths
from treadle.runtime.server_args import ServerArgs
from treadle.scheduler_proc.lora_slots import LoraSlots


def test_resident_adapters_share_a_slot_and_load_once():
    t = LoraSlots(2)
    for name in ("a", "b"):
        t.load(name, f"/{name}")
    assert t.acquire("a") == 0 and t.acquire("a") == 0 and t.acquire("b") == 1
    assert t.take_loads() == [LoraLoad(0, "a"), LoraLoad(1, "b")]
    assert t.take_loads() == []


def test_full_slots_wait_then_the_least_recently_used_idle_adapter_goes():
    t = LoraSlots(2)
    for name in ("a", "b", "c"):
        t.load(name, f"/{name}")
    t.acquire("a"), t.acquire("b")
    assert t.acquire("c") is None  # both slots serve running requests
    t.release("b")
    t.release("a")
    t.acquire("a"), t.release("a")  # a used more recently than b
    assert t.acquire("c") == 1 and "b" not in t.slot_of
    assert t.take_loads()[-1] == LoraLoad(1, "c")


def test_pinned_adapters_keep_their_slot():
    t = LoraSlots(2)
    t.load("p", "/p", pinned=True), t.load("a", "/a"), t.load("b", "/b")
    t.acquire("p"), t.release("p")
    t.acquire("a"), t.release("a")
    assert t.acquire("b") == t.slot_of["b"] and "p" in t.slot_of and "a" not in t.slot_of


def test_unload_waits_for_requests_that_name_the_adapter():
    t = LoraSlots(2)
    t.load("a", "/a")
    t.acquire("a")
    t.unload("a")
    assert t.finish_unloads(["a", None]) == []
    t.release("a")
    assert t.finish_unloads([None]) == ["a"]
    assert "a" not in t.loaded and "a" not in t.slot_of


def test_parse_lora_paths_forms():
    assert parse_lora_paths(["./x", "n=./y", {"lora_name": "z", "lora_path": "/z", "pinned": True},
                             '{"lora_name": "j", "lora_path": "/j"}']) == [
        ("./x", "./x", False), ("n", "./y", False), ("z", "/z", True), ("j", "/j", False)]
    assert parse_lora_paths({"a": "/a"}) == [("a", "/a", False)]
    with pytest.raises(ValueError, match="twice"):
        parse_lora_paths(["a=/x", "a=/y"])
    with pytest.raises(ValueError, match="lora_name"):
        parse_lora_paths([{"lora_path": "/x"}])


@pytest.mark.parametrize("kw, field", [
    ({"lora_backend": "cuda"}, "lora_backend"), ({"lora_target_modules": ["lm_head"]}, "lora_target_modules"),
    ({"max_lora_rank": 0}, "max_lora_rank"), ({"max_loaded_loras": -1}, "max_loaded_loras"),
    ({"lora_paths": [3]}, "lora_paths"), ({"lora_paths": ["a=/x", "b=/y"], "max_loaded_loras": 1}, "max_loaded_loras"),
])
def test_bad_lora_server_args_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        ServerArgs(**kw)


def test_lora_slot_shape_defaults_to_the_initial_adapters(tmp_path):
    """Rank: the largest initial adapter's; projections: those any of them adapts (else all)."""
    for name, r, targets in (("a", 4, '["q_proj", "v_proj"]'), ("b", 16, '["down_proj", "q_proj"]'),
                             ("c", 8, '".*proj"')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text(f'{{"r": {r}, "target_modules": {targets}}}')
    a = ServerArgs(device="cpu", lora_paths=[str(tmp_path / "a"), f"b={tmp_path / 'b'}"]).resolved()
    assert a.enable_lora and a.max_lora_rank == 16 and not a.disable_cuda_graph
    assert a.lora_target_modules == ["q_proj", "v_proj", "down_proj"]
    regex = ServerArgs(device="cpu", lora_paths=[str(tmp_path / "a"), str(tmp_path / "c")]).resolved()
    assert regex.lora_target_modules == ["all"]  # a regex target: every projection
    bare = ServerArgs(device="cpu", enable_lora=True).resolved()
    assert bare.max_lora_rank == 64 and bare.lora_target_modules == ["all"]
    given = ServerArgs(device="cpu", lora_paths=[str(tmp_path / "a")], lora_target_modules=["o_proj"]).resolved()
    assert given.lora_target_modules == ["o_proj"]


def test_fifo_policy_evicts_the_longest_resident():
    t = LoraSlots(2, policy="fifo")
    for name in ("a", "b", "c"):
        t.load(name, f"/{name}")
    t.acquire("a"), t.acquire("b")
    t.release("a"), t.release("b")
    t.acquire("a"), t.release("a")  # a used last, but resident longest
    assert t.acquire("c") == 0 and "a" not in t.slot_of and "b" in t.slot_of


def test_an_adapter_being_unloaded_is_served_again_from_the_same_path_without_a_read():
    """The client reloads an adapter that max_loaded_loras evicted as soon as a request names it;
    while requests still use it the workers hold it, so the load only cancels the unloading. Another
    path under that name must wait: the running requests compute with the old weights in its slot."""
    from types import SimpleNamespace

    from treadle.runtime.messages import LoadLoraAdapter, ReadLoraAdapter, UnloadLoraAdapter
    from treadle.scheduler_proc.control import SchedulerControl

    t, reads = LoraSlots(2), []
    ctl = SchedulerControl(SimpleNamespace(lora=t), lambda call: reads.append(call) or {"rank": 4}, to_detok=None)

    def load(path: str) -> dict:
        return ctl.load_lora(LoadLoraAdapter(lora_name="a", lora_path=path))

    assert load("/a")["success"] and reads == [ReadLoraAdapter(name="a", path="/a")]
    t.acquire("a")  # a running request
    assert ctl.unload_lora(UnloadLoraAdapter(lora_name="a"))["success"]
    assert t.still_held("a") == "/a" and not t.serves("a")
    other = load("/elsewhere")
    assert not other["success"] and "still being unloaded" in other["error_message"]
    again = load("/a")
    assert again["success"] and again["loaded_adapters"] == {"a": "/a"} and len(reads) == 1
    assert t.serves("a") and t.slot_of["a"] == 0 and t.finish_unloads([None]) == []
    t.release("a")
    t.unload("a")
    assert t.finish_unloads([None]) == ["a"] and t.still_held("a") is None
    assert load("/elsewhere")["success"] and reads[-1] == ReadLoraAdapter(name="a", path="/elsewhere")
