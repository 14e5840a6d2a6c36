"""``ServerArgs``: construction-time validation, ``resolved()`` and the JSON round trip."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from treadle.runtime.server_args import ServerArgs


def test_defaults_construct():
    a = ServerArgs()
    assert a.model_path == "default" and a.tp_size == 1 and a.log_level == "error"
    assert a.page_size is None and a.device is None and a.stream_interval == 1


def test_unknown_kwarg_type_error():
    with pytest.raises(TypeError, match="tp_sise"):
        ServerArgs(tp_sise=2)


INVALID = [
    ("tp_size", 0), ("tp_size", -1), ("tp_size", 1.5), ("tp_size", "2"), ("tp_size", True),
    ("dp_size", 0), ("pp_size", 0), ("nnodes", 0), ("stream_interval", 0), ("max_loras_per_batch", 0),
    ("mem_fraction_static", 1.5), ("mem_fraction_static", 0.0), ("mem_fraction_static", 1.0),
    ("mem_fraction_static", -0.1), ("mem_fraction_static", "0.5"), ("mem_fraction_static", float("nan")),
    ("chunked_prefill_size", 0), ("chunked_prefill_size", -2), ("chunked_prefill_size", 1.5),
    ("log_level", "loud"), ("log_level", "INFO"), ("log_level", None),
    ("dtype", "float8"), ("dtype", "int4"),
    ("load_format", "pickle"), ("attention_backend", "fa3"), ("schedule_policy", "lifo"), ("tokenizer_mode", "fast"),
    ("grammar_backend", "outlines_x"), ("kv_cache_dtype", "int8"), ("quantization", "magic"),
    ("device", "tpu"), ("device", "gpu"),
    ("page_size", 0), ("page_size", -4), ("page_size", 2.0),
    ("context_length", 1), ("max_total_tokens", 8), ("max_running_requests", 0), ("max_queued_requests", 0),
    ("max_prefill_tokens", 0), ("cuda_graph_max_bs", 0), ("random_seed", -1), ("base_gpu_id", -1),
    ("gpu_id_step", 0), ("log_requests_level", 4), ("log_requests_level", -1),
    ("schedule_conservativeness", 0), ("schedule_conservativeness", -1.0), ("schedule_conservativeness", "1"),
    ("watchdog_timeout", "300"), ("watchdog_timeout", 0), ("watchdog_timeout", float("inf")),
    ("preferred_sampling_params", "{not json"), ("preferred_sampling_params", "[1, 2]"),
    ("preferred_sampling_params", "3"), ("preferred_sampling_params", '"str"'),
    ("lora_paths", "a.safetensors"),
]


@pytest.mark.parametrize("field,value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_field(field, value):
    with pytest.raises(ValueError, match=field):
        ServerArgs(**{field: value})


@pytest.mark.parametrize("kw", [{"node_rank": 1}, {"node_rank": 2, "nnodes": 2}, {"node_rank": -1}])
def test_node_rank_range(kw):
    with pytest.raises(ValueError, match="node_rank"):
        ServerArgs(**kw)


@pytest.mark.parametrize("model_path", ["", None, 5])
def test_model_path(model_path):
    with pytest.raises(ValueError, match="model_path"):
        ServerArgs(model_path=model_path)


VALID = [
    {"tp_size": 2, "dp_size": 2}, {"node_rank": 1, "nnodes": 2, "tp_size": 2, "dist_init_addr": "10.0.0.1:5000"},
    {"mem_fraction_static": 0.5},
    {"chunked_prefill_size": -1}, {"chunked_prefill_size": 1}, {"log_level": "debug"}, {"dtype": "bfloat16"},
    {"dtype": "float32"}, {"page_size": 16}, {"device": "cpu"}, {"device": "cuda"}, {"device": "cuda:1"},
    {"preferred_sampling_params": '{"temperature": 0.0}'}, {"preferred_sampling_params": "{}"},
    {"context_length": 2}, {"max_total_tokens": 16}, {"random_seed": 0}, {"log_requests_level": 3},
    {"quantization": "gguf"}, {"load_format": "dummy"}, {"lora_paths": ["a", "b=c"]}, {"grammar_backend": "none"},
]


@pytest.mark.parametrize("kw", VALID, ids=[repr(k) for k in VALID])
def test_valid_values(kw):
    a = ServerArgs(**kw)
    for k, v in kw.items():
        assert getattr(a, k) == v



def test_preferred_sampling_params_non_string_names_field():
    with pytest.raises((ValueError, TypeError), match="preferred_sampling_params"):
        ServerArgs(preferred_sampling_params={"temperature": 0.0})


def test_resolved_fills_auto_values():
    a = ServerArgs(device="cpu")
    r = a.resolved()
    assert r is not a
    assert a.page_size is None and a.random_seed is None  # the original is untouched
    assert r.device == "cpu"
    assert r.page_size == 1
    assert r.attention_backend == "torch_native"
    assert r.grammar_backend == "xgrammar"
    assert r.tokenizer_path == r.model_path == "default"
    assert r.chunked_prefill_size == 512  # one CPU step stays near a second (issue 21)
    assert isinstance(r.random_seed, int) and 0 <= r.random_seed <= 2**30
    assert r.enable_lora is False
    assert r.dtype == "auto"
    assert r.max_running_requests == 64 and r.max_total_tokens == 16384  # the CPU's defaults, decided here
    assert r.mem_fraction_static == 0.85 and r.cuda_graph_max_bs == 64
    assert ServerArgs(device="cpu", dtype="bf16", kv_cache_dtype="fp16").resolved().dtype == "bfloat16"
    assert ServerArgs(device="cpu", kv_cache_dtype="fp16").resolved().kv_cache_dtype == "float16"


def test_unbuilt_attention_backend_refused_before_start():
    with pytest.raises(NotImplementedError, match="attention_backend='flashinfer'"):
        ServerArgs(attention_backend="flashinfer").check_supported()


def test_resolved_autodetects_device():
    import torch

    r = ServerArgs().resolved()
    assert r.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_resolved_keeps_explicit_values():
    a = ServerArgs(device="cpu", page_size=16, random_seed=7, attention_backend="triton", grammar_backend="none",
                   tokenizer_path="/tok", chunked_prefill_size=-1, lora_paths=["x"])
    r = a.resolved()
    assert (r.page_size, r.random_seed, r.attention_backend, r.grammar_backend) == (16, 7, "triton", "none")
    assert r.tokenizer_path == "/tok" and r.chunked_prefill_size == -1 and r.enable_lora is True
    assert r.resolved() == r  # idempotent once resolved


def test_resolved_cuda_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="cuda"):
        ServerArgs(device="cuda").resolved()


@pytest.mark.parametrize("a", [
    ServerArgs(),
    ServerArgs(tp_size=2, page_size=4, preferred_sampling_params='{"top_k": 5}', lora_paths=["a"], device="cpu"),
    ServerArgs(device="cpu").resolved(),
])
def test_json_round_trip(a):
    text = a.to_json()
    json.loads(text)
    b = ServerArgs.from_json(text)
    assert b == a
    assert b.to_dict() == a.to_dict()


def test_from_json_validates():
    d = ServerArgs().to_dict()
    d["tp_size"] = 0
    with pytest.raises(ValueError, match="tp_size"):
        ServerArgs.from_json(json.dumps(d))
    d = ServerArgs().to_dict()
    d["nope"] = 1
    with pytest.raises(TypeError):
        ServerArgs.from_json(json.dumps(d))


def test_field_names():
    names = ServerArgs.field_names()
    assert names == {f.name for f in dataclasses.fields(ServerArgs)}
    assert {"model_path", "tp_size", "page_size", "max_prefill_tokens", "stream_interval"} <= names


# ------------------------------------------------------------------ SGLang's other fields (runtime/sglang_compat.py)
from treadle.runtime.sglang_compat import REFUSED  # noqa: E402
from treadle.runtime.sglang_no_effect import NO_EFFECT  # noqa: E402

SGLANG_DEFAULTS = {**NO_EFFECT, **{name: default for name, (default, _) in REFUSED.items()}}


def test_sglang_tables_are_disjoint_and_not_treadle_fields():
    assert not set(NO_EFFECT) & set(REFUSED)
    own = set(ServerArgs.__annotations__)  # the fields ServerArgs implements itself
    assert not own & set(SGLANG_DEFAULTS)
    assert set(SGLANG_DEFAULTS) <= ServerArgs.field_names()


def test_sglang_names_from_user_code_are_fields():
    for name in ("enable_memory_saver", "port", "host", "chat_template", "reasoning_parser", "tool_call_parser",
                 "json_model_override_args", "enable_torch_compile", "speculative_algorithm", "mm_attention_backend",
                 "download_dir", "ep_size", "enable_dp_attention", "cuda_graph_bs", "model_impl", "api_key",
                 "enable_multimodal"):
        assert name in ServerArgs.field_names(), name


def test_sglang_defaults_passed_explicitly_are_accepted():
    a = ServerArgs(**SGLANG_DEFAULTS)
    a.check_supported()
    assert a == ServerArgs()


def test_no_effect_sample_constructs_and_round_trips():
    kw = {"port": 30010, "host": "0.0.0.0", "api_key": "k", "enable_torch_compile": True, "cuda_graph_bs": [1, 2, 4],
          "mm_attention_backend": "sdpa", "enable_memory_saver": True, "download_dir": "/models",
          "tokenizer_worker_num": 2, "model_impl": "transformers", "uvicorn_access_log_exclude_prefixes": ["/h"]}
    a = ServerArgs(device="cpu", **kw)
    a.check_supported()
    assert all(getattr(a, k) == v for k, v in kw.items())
    assert ServerArgs.from_json(a.to_json()) == a == ServerArgs(**a.to_dict())
    assert "port" not in repr(a) and "device='cpu'" in repr(a)  # the repr stays about what Treadle uses
    assert ServerArgs().uvicorn_access_log_exclude_prefixes == []  # a fresh list each time, as SGLang's
    assert ServerArgs().uvicorn_access_log_exclude_prefixes is not ServerArgs().uvicorn_access_log_exclude_prefixes


def test_sglang_fields_are_keyword_only():
    assert ServerArgs("some/model").model_path == "some/model"


def test_no_effect_value_must_reach_the_children():
    with pytest.raises(ValueError, match="warmups"):
        ServerArgs(warmups=object())
    with pytest.raises(ValueError, match="api_key must be a JSON-serializable value") as e:
        ServerArgs(api_key=b"sk-in-bytes")  # a secret's value stays out of the message (runtime/redact.py)
    assert "sk-in-bytes" not in str(e.value)


def _other_value(default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, (int, float)):
        return default + 2
    if isinstance(default, str):
        return default + "_other"
    if isinstance(default, list):
        return ["x"]
    return "x"  # default None


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_names_argument_and_reason(name):
    default, why = REFUSED[name]
    a = ServerArgs(**{name: _other_value(default)})  # construction accepts it; the engine refuses it
    with pytest.raises(NotImplementedError, match=rf"{name}=.*\({re.escape(why)}\)"):
        a.check_supported()
    ServerArgs(**{name: default}).check_supported()


@pytest.mark.parametrize("kw", [{"enable_multimodal": True}, {"model_config_parser": "hf"}])
def test_refused_names_accept_what_treadle_does_anyway(kw):
    ServerArgs(**kw).check_supported()


def test_refused_several_named_together():
    with pytest.raises(NotImplementedError) as e:
        ServerArgs(moe_dp_size=2, speculative_algorithm="EAGLE", speculative_draft_model_path="/h", pp_size=2,
                   quantization="bitsandbytes").check_supported()
    assert all(s in str(e.value) for s in ("moe_dp_size=2 (", "speculative_algorithm='EAGLE' with pp_size=2 (",
                                           "quantization='bitsandbytes'"))


@pytest.mark.parametrize("name", ["hf_overrides", "prot", "enable_torch_compiles"])
def test_unknown_names_still_type_error(name):
    with pytest.raises(TypeError, match=name):
        ServerArgs(**{name: 1})


def test_engine_refuses_before_starting_anything():
    from treadle import Engine

    with pytest.raises(NotImplementedError, match="speculative_eagle_topk"):
        Engine(speculative_algorithm="STANDALONE", speculative_draft_model_path="/no/such/draft",
               speculative_eagle_topk=4)
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        Engine(speculative_algorithm="EAGLE", speculative_draft_model_path=None)
    with pytest.raises(TypeError, match="hf_overrides"):
        Engine(hf_overrides={})


def _readme_names(label: str) -> set[str]:
    """The backticked names on the indented lines under the README bullet that starts with ``label``."""
    lines = (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"- {label}"))
    while not lines[start].endswith(":"):  # the label may wrap; the names start after its colon
        start += 1
    names = []
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        names += re.findall(r"`([a-z0-9_]+)`", line)
    assert len(names) == len(set(names)), "a name listed twice"
    return set(names)


def test_readme_lists_match_the_tables():
    assert _readme_names("refused with") == set(REFUSED)
    assert _readme_names("accepted with no effect") == set(NO_EFFECT)


def test_a_machine_without_gpu_device_files_resolves_to_the_cpu_without_torch():
    """The user's process picks the device; with no GPU device file it needs no torch import."""
    import subprocess
    import sys

    from treadle.runtime.resolve_args import may_have_gpu

    code = ("import sys; from treadle.runtime.server_args import ServerArgs; "
            "a = ServerArgs(model_path='default').resolved(); print(a.device, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if may_have_gpu():  # a GPU machine: torch decides
        import torch

        assert out.stdout.split()[0] == ("cuda" if torch.cuda.is_available() else "cpu")
    else:
        assert out.stdout.split() == ["cpu", "False"]
