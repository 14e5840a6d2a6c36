"""The usage guide's examples, as written, with only model_path changed (API.md, USAGE_GUIDE.md).

The examples that sample long answers on the shared engine (128 to 512 tokens each at batch size
one: over a minute of the CI suite one after the other) run at once, each in a thread of its own
and its code as written, so that their decode steps share batches; each test checks its own
example's result."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from treadle import Engine

from e2e_helpers import alive, make_awq_model, make_peft_adapter

pytestmark = pytest.mark.e2e
MODEL = "default"
EXAMPLES: dict[str, Callable[..., Any]] = {}  # name -> the example (engine, tokenizer) -> what it made


def example(fn: Callable[..., Any]) -> Callable[..., Any]:
    EXAMPLES[fn.__name__] = fn
    return fn


@pytest.fixture(scope="module")
def guide(engine, hf_tokenizer) -> Callable[[str], Any]:
    """Runs every ``@example`` at once on the shared engine, waits for all, and returns a lookup by
    name that re-raises what an example raised."""
    with ThreadPoolExecutor(len(EXAMPLES)) as pool:
        futures = {name: pool.submit(fn, engine, hf_tokenizer) for name, fn in EXAMPLES.items()}
    return lambda name: futures[name].result()


@example
def basic_usage(engine, tokenizer):
    response = engine.generate(
        prompt="Hello, how are you?",
        sampling_params={"temperature": 0.8, "max_new_tokens": 128}
    )
    return response


@example
def single_prompt(engine, tokenizer):
    response = engine.generate(
        prompt="Explain quantum computing",
        sampling_params={
            "temperature": 0.7,
            "top_p": 0.9,
            "max_new_tokens": 256
        }
    )
    return response


@example
def batch_generation(engine, tokenizer):
    prompts = [
        "What is the capital of France?",
        "What is the capital of Germany?",
        "What is the capital of Italy?"
    ]
    response = engine.generate(
        prompt=prompts,
        sampling_params={"temperature": 0.8, "max_new_tokens": 50}
    )
    return response


@example
def token_ids_input(engine, tokenizer):
    token_ids = tokenizer("What is machine learning?")["input_ids"]
    response = engine.generate(
        input_ids=token_ids,
        sampling_params={"max_new_tokens": 200}
    )
    return token_ids, response


@example
def sync_streaming(engine, tokenizer):
    chunks = []
    for chunk in engine.generate(
        prompt="Tell me a long story",
        sampling_params={"temperature": 0.8, "max_new_tokens": 512},
        stream=True
    ):
        chunks.append(chunk)
    return chunks


@example
def async_streaming(engine, tokenizer):
    async def generate_async():
        out = []
        async for chunk in await engine.async_generate(
            prompt="Write a poem",
            sampling_params={"temperature": 0.9, "max_new_tokens": 256},
            stream=True
        ):
            out.append(chunk["text"])
        return out

    return asyncio.run(generate_async())


def test_basic_usage(guide):
    response = guide("basic_usage")
    assert isinstance(response["text"], str) and response["meta_info"]["completion_tokens"] >= 1
    assert response["meta_info"]["completion_tokens"] <= 128


def test_context_manager_and_shutdown():
    with Engine(model_path=MODEL) as engine:
        response = engine.generate(
            prompt="What is machine learning?",
            sampling_params={"max_new_tokens": 200}
        )
        # sampled at temperature 1 with a random seed: an immediate EOS (empty text) is a valid answer
        assert isinstance(response["text"], str) and response["meta_info"]["completion_tokens"] >= 1
        pids = engine.get_all_child_pids()
        ipc = engine._ipc.path
    import os
    for pid in pids:
        assert not alive(pid), f"child {pid} survived shutdown"
    assert not os.path.exists(ipc)


def test_single_prompt(guide):
    response = guide("single_prompt")
    line = (f"Tokens: {response['meta_info']['prompt_tokens']} prompt, "
            f"{response['meta_info']['completion_tokens']} completion")
    assert response["meta_info"]["prompt_tokens"] == 3 and "completion" in line
    meta = response["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"} <= set(meta)


def test_batch_generation(guide):
    response = guide("batch_generation")
    texts = [text for text in response["text"]]
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert [r["text"] for r in response] == texts  # list of dicts and column access agree


def test_token_ids_input(guide, engine):
    token_ids, response = guide("token_ids_input")
    assert response["meta_info"]["prompt_tokens"] == len(token_ids)
    batch = engine.generate(input_ids=[token_ids, token_ids[:3]], sampling_params={"max_new_tokens": 4})
    assert [m["prompt_tokens"] for m in batch["meta_info"]] == [len(token_ids), 3]


def test_sync_streaming(guide):
    chunks = guide("sync_streaming")
    assert chunks[-1]["meta_info"]["finish_reason"] is not None
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    ids = [t for c in chunks for t in c["output_ids"]]
    assert len(ids) == chunks[-1]["meta_info"]["completion_tokens"]


def test_stream_deltas_concatenate_to_full_text(engine):
    params = {"temperature": 0, "max_new_tokens": 40}
    full = engine.generate(prompt="Write a poem about Paris", sampling_params=params)
    text = "".join(c["text"] for c in engine.generate(prompt="Write a poem about Paris", sampling_params=params,
                                                     stream=True))
    assert text == full["text"]


def test_async_streaming(guide):
    out = guide("async_streaming")
    assert len(out) >= 1


def test_async_generate_non_stream_and_batch(engine):
    async def run():
        one = await engine.async_generate(prompt="Hi", sampling_params={"max_new_tokens": 4})
        many = await asyncio.gather(*[engine.async_generate(prompt=f"Number {i}", sampling_params={"max_new_tokens": 4})
                                      for i in range(8)])
        return one, many

    one, many = asyncio.run(run())
    assert one["meta_info"]["completion_tokens"] <= 4 and len(many) == 8


def test_error_handling(engine):
    caught = None
    try:
        engine.generate(
            prompt="test",
            sampling_params={"temperature": -1.0}  # Invalid
        )
    except ValueError as e:
        caught = f"Invalid parameter: {e}"
    assert caught is not None and "temperature" in caught
    assert engine.generate(prompt="test", sampling_params={"max_new_tokens": 2})["meta_info"]["completion_tokens"] <= 2


def test_get_server_info(engine):
    info = engine.get_server_info()
    assert info["model_path"] == "default" and info["tp_size"] == 1
    assert info["max_total_tokens"] > 0 and info["max_running_requests"] > 0
    for key in ("tokenizer_path", "dp_size", "pp_size", "page_size", "context_length", "attention_backend", "device",
                "version"):
        assert key in info


def test_with_configuration_tp2(engine, tp2_engine):
    """tp_size=2 over gloo on the CPU: SmolLM2's 3 KV heads split 2 + 1 across the ranks. The guide's
    ``Engine(...)`` call runs as written in conftest's ``tp2_engine`` (``test_parallel`` shares it)."""
    tp1, engine = engine, tp2_engine
    params = {"temperature": 0, "max_new_tokens": 16}
    out = engine.generate(prompt="The capital of France is", sampling_params=params)
    assert out["output_ids"] == tp1.generate(prompt="The capital of France is", sampling_params=params)["output_ids"]
    assert engine.get_server_info()["tp_size"] == 2


def test_engine_configuration_example(tmp_path, default_model_dir):
    """The guide's full configuration as written, on an AWQ checkpoint (a tiny random Llama packed
    in AutoAWQ's layout; tests/e2e/test_awq.py checks its numbers against HF): four tensor-parallel
    ranks, an fp8 KV cache, AWQ weights."""
    awq_path = str(tmp_path / "awq")
    make_awq_model(awq_path, default_model_dir)
    engine = Engine(
        model_path=awq_path,
        tokenizer_path=None,
        trust_remote_code=True,
        tp_size=4,
        dp_size=1,
        pp_size=1,
        mem_fraction_static=0.85,
        max_total_tokens=8192,
        chunked_prefill_size=8192,
        cuda_graph_max_bs=256,
        disable_radix_cache=False,
        quantization="awq",
        kv_cache_dtype="fp8_e4m3",
        log_level="info",
        log_requests=False
    )
    try:
        out = engine.generate(prompt="The capital of France is", sampling_params={"max_new_tokens": 8})
        assert out["meta_info"]["completion_tokens"] == 8
        info = engine.get_server_info()
        assert info["tp_size"] == 4 and info["quantization"] == "awq" and info["kv_cache_dtype"] == "fp8_e4m3"
    finally:
        engine.shutdown()


def test_lora_adapters(default_model_dir, tmp_path, monkeypatch):
    """The guide's LoRA section as written (adapters made with peft under ./adapters); outputs are
    checked against peft in tests/e2e/test_lora_engine.py."""
    for i, name in enumerate(("math", "code", "medical")):
        make_peft_adapter(default_model_dir, str(tmp_path / "adapters" / name), 8, 16, ["q_proj", "v_proj"], seed=i)
    monkeypatch.chdir(tmp_path)
    engine = Engine(
        model_path=MODEL,
        enable_lora=True,
        lora_paths=["./adapters/math", "./adapters/code"]
    )
    try:
        # Load a new adapter
        engine.load_lora_adapter(
            lora_name="medical",
            lora_path="./adapters/medical"
        )

        # Use the adapter
        response = engine.generate(
            prompt="Explain diabetes",
            lora_path="medical",
            sampling_params={"max_new_tokens": 200}
        )
        assert isinstance(response["text"], str) and response["meta_info"]["completion_tokens"] >= 1
        # adapters loaded at start-up are named by their paths
        math = engine.generate(prompt="2 + 2 =", lora_path="./adapters/math", sampling_params={"max_new_tokens": 8})
        assert math["meta_info"]["completion_tokens"] >= 1

        # Unload when done
        engine.unload_lora_adapter("medical")
        with pytest.raises(ValueError, match="never been loaded"):
            engine.generate(prompt="Explain diabetes", lora_path="medical", sampling_params={"max_new_tokens": 8})
    finally:
        engine.shutdown()
