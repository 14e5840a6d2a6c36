"""``RequestBuilder``: a public call checked against the engine's configuration (no engine needed)."""

from __future__ import annotations

import pytest

from treadle.client.lora import LoraRegistry
from treadle.client.prepare import RequestBuilder
from treadle.runtime.server_args import ServerArgs

CALL = dict(prompt=None, sampling_params=None, input_ids=None, image_data=None, audio_data=None, video_data=None,
            return_logprob=False, logprob_start_len=None, top_logprobs_num=None, token_ids_logprob=None,
            lora_path=None, custom_logit_processor=None, return_hidden_states=False, stream=False, rid=None,
            session_params=None, priority=None, routed_dp_rank=None, data_parallel_rank=None, cache_salt=None)


def builder(groups=None, **server_args):
    a = ServerArgs(device="cpu", **server_args).resolved()
    return RequestBuilder(a, LoraRegistry(bool(a.enable_lora)), (groups or {}).get)


def generate(b, unsupported=None, **call):
    return b.generate(**{**CALL, **call}, unsupported=unsupported or {})


def test_options_reach_the_requests():
    reqs, is_batch = generate(builder(), prompt=["a", "b"], rid=["x", "y"], return_logprob=True, top_logprobs_num=2,
                              priority=3, cache_salt="s", stream=True)
    assert is_batch and [r.rid for r in reqs] == ["x", "y"]
    r = reqs[0]
    assert r.return_logprob and r.top_logprobs_num == 2 and r.priority == 3 and r.cache_salt == "s" and r.stream


def test_preferred_sampling_params_parsed_once_and_applied():
    b = builder(preferred_sampling_params='{"temperature": 0.5}')
    assert b.preferred == {"temperature": 0.5}
    reqs, _ = generate(b, prompt="a", sampling_params={"max_new_tokens": 3})
    assert reqs[0].sampling.temperature == 0.5 and reqs[0].sampling.max_new_tokens == 3


@pytest.mark.parametrize("call, server_args, error, match", [
    ({"prompt": "a"}, {"is_embedding": True}, ValueError, "use encode"),
    ({"prompt": "a", "audio_data": b"x"}, {}, ValueError, "no audio models"),
    ({"prompt": "a", "return_hidden_states": [False, True]}, {}, ValueError, "enable_return_hidden_states"),
    ({"prompt": "a", "cache_salt": 3}, {}, TypeError, "cache_salt must be a str"),
    ({"prompt": "a", "custom_logit_processor": "m:C"}, {}, ValueError, "enable_custom_logit_processor"),
    ({"prompt": "a", "lora_path": "x"}, {}, ValueError, "LoRA adapter 'x' was requested"),
    ({"prompt": "a", "routed_dp_rank": 2}, {"dp_size": 2}, ValueError, r"routed_dp_rank=2 out of range \[0, 2\)"),
    ({"prompt": ["a", "b"], "session_params": {"id": "s"}}, {}, ValueError, "single prompt with n=1"),
    ({"prompt": "a", "session_params": "s"}, {}, TypeError, "session_params must be a dict"),
])
def test_refused_calls(call, server_args, error, match):
    with pytest.raises(error, match=match):
        generate(builder(**server_args), **call)


def test_unknown_and_unbuilt_arguments():
    with pytest.raises(TypeError, match="generate\\(\\) got unexpected keyword argument\\(s\\): bar, foo"):
        generate(builder(), prompt="a", unsupported={"foo": 1, "bar": 2})
    with pytest.raises(NotImplementedError, match="bootstrap_host"):
        generate(builder(), prompt="a", unsupported={"bootstrap_host": "h"})
    reqs, _ = generate(builder(), prompt="a", unsupported={"bootstrap_host": None})  # a default value is dropped
    assert len(reqs) == 1


def test_dp_rank_and_session_group():
    reqs, _ = generate(builder(dp_size=2), prompt="a", routed_dp_rank=1)
    assert reqs[0].dp_rank == 1
    reqs, _ = generate(builder({"s": 1}, dp_size=2), prompt="a", session_params={"session_id": "s", "rid": "r0"})
    assert reqs[0].session.id == "s" and reqs[0].session.rid == "r0" and reqs[0].dp_rank == 1  # where its KV is
    reqs, _ = generate(builder(dp_size=2), prompt="a", session_params={"id": "unknown"})
    assert reqs[0].dp_rank is None  # the tokenizer picks


def test_encode():
    b = builder(is_embedding=True)
    reqs, is_batch = b.encode([[1, 2], [3]], None, None, None, {})
    assert is_batch and [r.input_ids for r in reqs] == [[1, 2], [3]]
    assert all(r.embed and r.sampling.max_new_tokens == 0 for r in reqs)
    with pytest.raises(TypeError, match="encode\\(\\) got unexpected keyword argument\\(s\\): x"):
        b.encode("a", None, None, None, {"x": 1})
    with pytest.raises(ValueError, match="is_embedding=True to use encode"):
        builder().encode("a", None, None, None, {})


def test_register_processor():
    b = builder(enable_custom_logit_processor=True)
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        b.register_processor("", "m:C")
    b.register_processor("force", "logit_processors_for_tests:ForceToken")
    assert b.processors == {"force": "logit_processors_for_tests:ForceToken"}
