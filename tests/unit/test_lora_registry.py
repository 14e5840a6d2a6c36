"""The client's LoRA registry (``client/lora.py``): ``max_loaded_loras`` evicts the least recently
used unpinned adapter, and a request naming an evicted adapter loads it again first."""

from __future__ import annotations

import asyncio

import pytest

from treadle.client.lora import LoraRegistry


class FakeControl:
    """The engine's control calls, as one DP group answers them; ``bad`` paths fail to load."""

    def __init__(self, bad: tuple[str, ...] = ()) -> None:
        self.bad = bad
        self.calls: list[tuple] = []

    def load_lora_adapter(self, name: str, path: str, pinned: bool) -> dict:
        self.calls.append(("load", name, pinned))
        if path in self.bad:
            return {0: {"success": False, "error_message": f"cannot read {path}"}}
        return {0: {"success": True}}

    def unload_lora_adapter(self, name: str, groups=None) -> None:
        self.calls.append(("unload", name))


def registry(max_loaded=None, **kw) -> tuple[LoraRegistry, FakeControl]:
    control = FakeControl(**kw)
    return LoraRegistry(True, max_loaded, control), control


def test_loading_past_the_bound_evicts_the_least_recently_used():
    reg, control = registry(max_loaded=2)
    assert reg.load("a", "/a") and reg.load("b", "/b")
    reg.resolve("a")  # a request for a: b is now the least recently used
    res = reg.load("c", "/c")
    assert res.success and res.loaded_adapters == {"a": "/a", "c": "/c"}
    assert control.calls[-2:] == [("load", "c", False), ("unload", "b")]  # loaded first, then room made
    assert reg.evicted == {"b": "/b"}


def test_pinned_adapters_are_never_evicted():
    reg, control = registry(max_loaded=2)
    reg.load("p", "/p", pinned=True), reg.load("a", "/a")
    reg.resolve("a")
    assert reg.load("b", "/b").success and set(reg.paths) == {"p", "b"}  # a went, though p was older
    reg.unload("b")
    reg.load("q", "/q", pinned=True)
    full = reg.load("c", "/c")
    assert not full.success and "max_loaded_loras=2" in full.error_message
    assert set(reg.paths) == {"p", "q"} and ("load", "c", False) not in control.calls


def test_a_request_reloads_an_evicted_adapter_by_its_path():
    reg, control = registry(max_loaded=2)
    reg.load("a", "/a"), reg.load("b", "/b"), reg.load("c", "/c")  # a evicted
    assert reg.resolve(["a", None]) == ["a", None]
    assert control.calls[-2:] == [("load", "a", False), ("unload", "b")] and set(reg.paths) == {"c", "a"}
    # a call that names two adapters never evicts one of them to make room for the other
    reg.resolve(["c", "b"])
    assert set(reg.paths) == {"c", "b"} and reg.evicted == {"a": "/a"}
    with pytest.raises(ValueError, match="names 3 different adapters, but max_loaded_loras is 2"):
        reg.resolve(["a", "b", "c"])


def test_reload_failure_and_explicit_unload():
    reg, control = registry(max_loaded=1)
    reg.load("a", "/gone"), reg.load("b", "/b")
    control.bad = ("/gone",)  # the directory went away after a was evicted
    assert reg.evicted == {"a": "/gone"}
    with pytest.raises(ValueError, match="Failed to implicitly load LoRA adapter a: cannot read /gone"):
        reg.resolve("a")
    assert set(reg.paths) == {"b"}  # nothing was evicted for the failed reload
    # unloading forgets an adapter, loaded or evicted: requests naming it fail again
    assert reg.unload("a").success and reg.unload("b").success
    for name in ("a", "b"):
        with pytest.raises(ValueError, match=f"never been loaded: {name}"):
            reg.resolve(name)


def test_async_callers_reload_on_a_thread():
    reg, control = registry(max_loaded=1)
    reg.load("a", "/a"), reg.load("b", "/b")

    async def call():
        await reg.reload_evicted_async(None)
        await reg.reload_evicted_async(["a", None])
        return control.calls[-2:], reg.resolve(["a", None])

    assert asyncio.run(call()) == ([("load", "a", False), ("unload", "b")], ["a", None])
    with pytest.raises(TypeError, match="got 3"):
        asyncio.run(reg.reload_evicted_async(["b", 3]))  # checked as the synchronous call checks it
