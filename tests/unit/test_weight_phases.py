"""The workers' side of a weight update in steps (runtime/messages.WEIGHT_PHASES), on a tiny model
without processes: "check" changes nothing (a distributed update keeps what it received), "apply"
loads what was checked, "drop" forgets it; from disk, an "apply" reads the checkpoint again."""

from __future__ import annotations

import msgspec
import pytest
import torch

from treadle.gpu_worker.model_loader import build_model, reload_weights
from treadle.gpu_worker.weight_group import WeightGroups
from treadle.runtime.llava_layout import load_model_config
from treadle.runtime.messages import UpdateWeightsFromDistributed

CPU = torch.device("cpu")
NAME = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_dir):
    """(base checkpoint dir, a successor's dir, the successor's tensors)."""
    from fp8_checkpoints import save_model, tiny_llama

    hf, tok = tiny_llama(default_model_dir)
    root = tmp_path_factory.mktemp("phases")
    gen = torch.Generator().manual_seed(1)
    new = {n: p.data + 0.1 * torch.randn(p.shape, generator=gen) for n, p in hf.named_parameters()}
    save_model(hf, tok, default_model_dir, str(root / "base"))
    save_model(hf, tok, default_model_dir, str(root / "new"), tensors=new)
    return str(root / "base"), str(root / "new"), new


def _model(base: str):
    cfg = load_model_config(base)
    model = build_model(cfg, torch.float32, CPU, 64, None)
    reload_weights(model, base, None, cfg, 64, CPU)
    return model, cfg


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.state_dict().items()}


def test_a_distributed_update_is_received_once_checked_then_applied_or_dropped(tiny, monkeypatch):
    base, _, new = tiny
    model, cfg = _model(base)
    before = _weights(model)
    groups = WeightGroups(global_rank=1, device=CPU)
    received = []
    monkeypatch.setattr(groups, "receive", lambda call: received.append(call.phase) or list(sent))
    call = UpdateWeightsFromDistributed(names=[NAME], dtypes=["float32"], shapes=[list(new[NAME].shape)],
                                        group_name="g", phase="check")

    def run(phase: str) -> bool:
        return groups.update(model, msgspec.structs.replace(call, phase=phase), cfg, 64)

    sent = [(NAME, new[NAME][:3])]  # a wrong shape: the check refuses it, nothing is kept
    with pytest.raises(ValueError):
        run("check")
    assert not groups.staged and all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    sent = [(NAME, new[NAME])]
    assert run("check") and received == ["check", "check"]
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())  # checked, not loaded
    assert run("drop") and not groups.staged
    with pytest.raises(ValueError, match="no checked tensors of group 'g'"):
        run("apply")
    assert run("check") and run("apply") and received == ["check"] * 3  # the apply receives nothing
    assert not groups.staged and torch.equal(model.model.layers[1].mlp.down_proj.weight, new[NAME])


def test_from_disk_check_changes_nothing_and_apply_reads_the_checkpoint_again(tiny):
    base, new_dir, new = tiny
    model, cfg = _model(base)
    before = _weights(model)
    assert reload_weights(model, new_dir, None, cfg, 64, CPU, "check")
    assert reload_weights(model, new_dir, None, cfg, 64, CPU, "drop")
    assert all(torch.equal(v, before[k]) for k, v in _weights(model).items())
    assert reload_weights(model, new_dir, None, cfg, 64, CPU, "apply")
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, new[NAME])
    with pytest.raises(ValueError, match="load_format"):  # the arguments are checked at every step but "drop"
        reload_weights(model, new_dir, "gguf", cfg, 64, CPU, "check")

