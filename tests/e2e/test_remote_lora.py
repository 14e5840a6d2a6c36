"""The usage guide's LoRA example through ``RemoteEngine``: adapters loaded at start-up and at run
time over ``/load_lora_adapter``, used by name, unloaded; failures returned as the in-process
engine returns them, and the adapter's greedy output equal to the in-process one's."""

from __future__ import annotations

import pytest

from treadle import Engine, RemoteEngine
from treadle.client.lora import LoRAUpdateOutput

from e2e_helpers import make_peft_adapter
from serve_helpers import serve_in_thread

pytestmark = pytest.mark.e2e
GREEDY = {"temperature": 0, "max_new_tokens": 6}


def test_lora_adapters_through_http(default_model_dir, tmp_path, monkeypatch):
    for i, name in enumerate(("math", "medical")):
        make_peft_adapter(default_model_dir, str(tmp_path / "adapters" / name), 8, 16, ["q_proj", "v_proj"], seed=i)
    monkeypatch.chdir(tmp_path)
    local = Engine(model_path="default", enable_lora=True, lora_paths=["./adapters/math"])
    try:
        with serve_in_thread(local) as url, RemoteEngine(url) as engine:
            # Load a new adapter (a relative path, as the guide writes it: resolved here, sent absolute)
            loaded = engine.load_lora_adapter(lora_name="medical", lora_path="./adapters/medical")
            assert isinstance(loaded, LoRAUpdateOutput) and loaded.success
            assert set(loaded.loaded_adapters) == {"./adapters/math", "medical"}
            again = engine.load_lora_adapter(lora_name="medical", lora_path="./adapters/medical")
            assert not again.success and "already loaded" in again.error_message

            # Use the adapter: the same greedy tokens as the in-process engine gives
            response = engine.generate(prompt="Explain diabetes", lora_path="medical", sampling_params=GREEDY,
                                       return_logprob=True)
            assert response["output_ids"] == local.generate(prompt="Explain diabetes", lora_path="medical",
                                                            sampling_params=GREEDY)["output_ids"]
            plain = engine.generate(prompt="Explain diabetes", sampling_params=GREEDY, return_logprob=True)
            first = [r["meta_info"]["output_token_logprobs"][0][0] for r in (plain, response)]
            assert abs(first[0] - first[1]) > 1e-3  # the adapter was applied
            math = engine.generate(prompt="2 + 2 =", lora_path="./adapters/math", sampling_params={"max_new_tokens": 2})
            assert math["meta_info"]["completion_tokens"] >= 1

            # Unload when done
            assert engine.unload_lora_adapter("medical").success
            assert not engine.unload_lora_adapter("medical").success  # returned, not raised, as in-process
            with pytest.raises(ValueError, match="never been loaded"):
                engine.generate(prompt="Explain diabetes", lora_path="medical", sampling_params={"max_new_tokens": 2})
    finally:
        local.shutdown()
