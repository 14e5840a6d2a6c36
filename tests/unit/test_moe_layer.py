"""The MoE layer's torch path (``layers/moe.py``) against transformers' own router and experts,
the per-expert checkpoint names, the expert-parallel exchange on two gloo ranks against one rank,
and the ``ep_size`` checks made before any process starts."""

from __future__ import annotations

import json
import os

import pytest
import torch

from kernel_helpers import run_two_ranks


def test_router_and_experts_match_transformers():
    from transformers import MixtralConfig, Qwen3MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from treadle.gpu_worker.layers.moe import moe_torch, route

    torch.manual_seed(0)
    x = torch.randn(1, 11, 32)
    for hf, renorm in [(MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=6,
                                                            num_experts_per_tok=2)), True),
                       (Qwen3MoeSparseMoeBlock(Qwen3MoeConfig(hidden_size=32, moe_intermediate_size=24, num_experts=6,
                                                              num_experts_per_tok=3, norm_topk_prob=False)), False)]:
        for p in hf.parameters():
            torch.nn.init.normal_(p, std=0.3)
        with torch.no_grad():
            want = hf(x)
            _, hf_weights, hf_ids = hf.gate(x.view(-1, 32))
            weights, ids = route(x.view(-1, 32) @ hf.gate.weight.T, hf.gate.top_k, renorm)
            got = moe_torch(x.view(-1, 32), hf.experts.gate_up_proj, hf.experts.down_proj, weights, ids)
        assert torch.equal(ids, hf_ids) and torch.allclose(weights, hf_weights, atol=1e-7)
        torch.testing.assert_close(got.view_as(want), want, atol=1e-6, rtol=1e-5)


def test_expert_checkpoint_names():
    from treadle.gpu_worker.layers.moe import expert_shard

    qwen = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    mixtral = {"w1": "gate", "w3": "up", "w2": "down"}
    assert expert_shard("model.layers.3.mlp.experts.17.up_proj.weight", qwen) == (
        17, "up", "model.layers.3.mlp.experts.w13_weight")
    assert expert_shard("model.layers.0.mlp.experts.5.w2.weight", mixtral) == (
        5, "down", "model.layers.0.mlp.experts.w2_weight")
    for other in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
                  "model.layers.0.mlp.experts.5.w2.bias", "model.layers.0.mlp.experts.x.w1.weight"):
        assert expert_shard(other, mixtral | qwen) is None, other


def _exchange_worker(rank: int, port: int, out: str) -> None:
    """Each token count: the exchange's partial sums over two ranks, summed, against one rank's
    whole computation (8 experts, 4 on each rank, top-3)."""
    import torch.distributed as dist

    from treadle.gpu_worker import distributed as par
    from treadle.gpu_worker.layers import moe_ep
    from treadle.gpu_worker.layers.moe import moe_torch, route

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    par.init_parallel(rank, 2, torch.device("cpu"), dtype=torch.float32)
    moe_ep.init_expert_parallel(2)
    errors = []
    for tokens in (1, 2, 5, 16):
        g = torch.Generator().manual_seed(tokens)  # the same on both ranks: activations are replicated
        x = torch.randn(tokens, 16, generator=g)
        w13, w2 = torch.randn(8, 24, 16, generator=g), torch.randn(8, 16, 12, generator=g)
        weights, ids = route(torch.randn(tokens, 8, generator=g), 3, True)
        mine = slice(4 * rank, 4 * rank + 4)
        partial = moe_ep.exchange(x, weights, ids, 4, lambda r, w, e: moe_torch(r, w13[mine], w2[mine], w, e))
        dist.all_reduce(partial)
        err = (partial - moe_torch(x, w13, w2, weights, ids)).abs().max().item()
        if err > 1e-5:
            errors.append(f"{tokens} tokens: max error {err:.3g}")
    if rank == 0:
        torch.save(errors, out)
    dist.destroy_process_group()


def test_expert_parallel_exchange_matches_one_rank(tmp_path):
    assert run_two_ranks(_exchange_worker, tmp_path) == []


def test_ep_size_checked_before_start(tmp_path):
    from treadle.runtime.model_check import check_model
    from treadle.runtime.server_args import ServerArgs

    with pytest.raises(ValueError, match="ep_size must be 1 or tp_size"):
        ServerArgs(tp_size=4, ep_size=2)
    with pytest.raises(ValueError, match="ep_size > 1 needs pp_size == 1"):
        ServerArgs(tp_size=2, ep_size=2, pp_size=2)
    ServerArgs(tp_size=2, ep_size=2).check_supported()

    def model(**cfg) -> str:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": ["Qwen3MoeForCausalLM"], "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "num_hidden_layers": 2, **cfg}))
        return str(d)

    dummy = dict(load_format="dummy")
    check_model(model(num_experts=8, moe_intermediate_size=64), ServerArgs(tp_size=2, ep_size=2, **dummy))
    with pytest.raises(ValueError, match="ep_size=2 needs a mixture-of-experts model"):
        check_model(model(architectures=["Qwen3ForCausalLM"]), ServerArgs(tp_size=2, ep_size=2, **dummy))
    with pytest.raises(ValueError, match="this model has 6 experts"):
        check_model(model(num_experts=6, moe_intermediate_size=64), ServerArgs(tp_size=4, ep_size=4, **dummy))
    with pytest.raises(ValueError, match="intermediate size 90 does not divide by tp_size=4"):
        check_model(model(num_experts=8, moe_intermediate_size=90), ServerArgs(tp_size=4, **dummy))
    # enable_deterministic_inference: the torch path on the CPU only (tests/unit/test_batch_invariant_lora_moe.py)
    det = dict(enable_deterministic_inference=True, **dummy)
    moe = model(num_experts=8, moe_intermediate_size=64)
    check_model(moe, ServerArgs(device="cpu", **det))
    check_model(model(architectures=["Qwen3ForCausalLM"]), ServerArgs(device="cuda", **det))
    for kw in (dict(device="cuda"), dict(device="cpu", tp_size=2, ep_size=2)):
        with pytest.raises(ValueError, match="enable_deterministic_inference with a mixture-of-experts model"):
            check_model(moe, ServerArgs(**kw, **det))


def test_expert_weight_loader_reads_its_slice_and_checks_shapes():
    """One rank of two (TP): each expert's gate/up rows and down columns of its half; a tensor of
    another shape is refused before anything is copied."""
    from unittest import mock

    from treadle.gpu_worker.layers import moe

    with mock.patch.object(moe, "tp_size", return_value=2), mock.patch.object(moe, "tp_rank", return_value=1):
        m = moe.FusedMoE(num_experts=3, hidden=4, intermediate=6)
    gate, up, down = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    with mock.patch.object(moe, "tp_rank", return_value=1):
        for part, t in (("gate", gate), ("up", up), ("down", down)):
            m.weight_loader(m.w2_weight if part == "down" else m.w13_weight, t, (2, part))
        with pytest.raises(ValueError, match=r"expert 1 up: checkpoint shape \(6, 5\)"):
            m.weight_loader(m.w13_weight, torch.randn(6, 5), (1, "up"))
    assert torch.equal(m.w13_weight[2], torch.cat([gate[3:], up[3:]])) and torch.equal(m.w2_weight[2], down[:, 3:])
    assert m.loaded == 3
