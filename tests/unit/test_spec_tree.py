"""Tree verification and EAGLE drafting: the ancestor mask and acceptance (pure), the n-gram trie,
and on a tiny random Llama (CPU, float32) a tree verify row against HF, the accepted path's KV,
and an EAGLE / EAGLE3 head's cache against one pass of the head over the whole sequence."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare
from transformers import LlamaConfig, LlamaForCausalLM

from kernel_helpers import Alloc
from spec_heads import make_eagle_head
from treadle.gpu_worker.model_runner import ModelRunner, RunnerConfig
from treadle.gpu_worker.spec_tree import accept_tree_greedy, accept_tree_sampled, depths, move_path_kv, tree_mask
from treadle.runtime.messages import ForwardPlan, NewSlot, PlanRow, SamplingSpec
from treadle.scheduler_proc.spec_ngram import ngram_tree

P_MIN = 1e-3  # a correct sampler fails one test in a thousand runs
PARENTS = [0, 0, 2, 2, 4]  # nodes 1 and 2 are siblings; 0 -> 2 -> 4 -> 5 one path, 0 -> 2 -> 3 another
VOCAB = 500
GREEDY = SamplingSpec(temperature=0.0)
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
             max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)


def test_tree_mask_and_depths():
    assert depths(PARENTS) == [0, 1, 1, 2, 2, 3]
    mask = tree_mask(PARENTS)
    seen = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 2, 3}, 4: {0, 2, 4}, 5: {0, 2, 4, 5}}
    for node, want in seen.items():
        assert set(torch.nonzero(mask[node]).flatten().tolist()) == want
    with pytest.raises(ValueError, match="parent"):
        depths([0, 2])


def test_accept_tree_greedy():
    tokens = [9, 5, 6, 7, 8, 3]
    # argmax at the nodes: root -> 6 (node 2), node 2 -> 8 (node 4), node 4 -> 3 (node 5), node 5 -> 1
    assert accept_tree_greedy([6, 0, 8, 0, 3, 1], tokens, PARENTS) == ([6, 8, 3, 1], [0, 2, 4, 5])
    assert accept_tree_greedy([4, 0, 0, 0, 0, 0], tokens, PARENTS) == ([4], [0])
    assert accept_tree_greedy([5, 2, 7, 0, 0, 0], tokens, PARENTS) == ([5, 2], [0, 1])


def test_tree_rejection_sampling_keeps_the_target_distribution():
    """Chi-square: the first token follows p_root (its children 5 and 6 tried in turn), and the
    second, when the path went through node 2 (token 6), follows node 2's p."""
    vocab, trials = 12, 4000
    logits = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    logits[0, 5] += 1.5
    logits[0, 6] += 2.0
    p = torch.softmax(logits, dim=-1)
    tokens, gen = [9, 5, 6, 7, 8, 3], torch.Generator().manual_seed(1)
    first, second = torch.zeros(vocab), torch.zeros(vocab)
    for _ in range(trials):
        toks, path = accept_tree_sampled(p, tokens, PARENTS, gen)
        assert [tokens[n] for n in path[1:]] == toks[:-1]
        first[toks[0]] += 1
        if len(path) > 1 and path[1] == 2:
            second[toks[1]] += 1
    assert chisquare(first.numpy(), (p[0] * trials).numpy()).pvalue > P_MIN
    n2 = second.sum()
    assert n2 > 300
    assert chisquare(second.numpy(), (p[2] * n2).numpy()).pvalue > P_MIN


def test_flatten_checks_tree_rows():
    from treadle.gpu_worker.step_inputs import PlanLimits, flatten_plan

    def flat(row: PlanRow):
        return flatten_plan(ForwardPlan(step=1, rows=[PlanRow(1, [4], 2, [9]), row]), PlanLimits(4, 64, 64, 100),
                            lambda slot: SamplingSpec(), extras=True, report=True, takes_images=False, model_name="m",
                            lora=False)

    s = flat(PlanRow(0, [5, 6, 7, 8], 4, [10, 11, 12, 13], spec=3, tree=[0, 0, 1]))
    assert s.tree_rows == [(1, 1, [0, 0, 1], 4)] and s.spec_rows == [(1, 0, 4)]
    for bad in ([0, 0], [0, 2, 1], [0, 0, 3]):
        with pytest.raises(ValueError, match="tree parents"):
            flat(PlanRow(0, [5, 6, 7, 8], 4, [10, 11, 12, 13], spec=3, tree=bad))
    with pytest.raises(ValueError, match="tree parents"):  # a tree row is the last token and its nodes only
        flat(PlanRow(0, [3, 5, 6, 7, 8], 3, [9, 10, 11, 12, 13], spec=3, tree=[0, 0, 1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_move_path_kv(dtype):
    buf = torch.randn(2, 3, 8, 2, 4).to(dtype)  # [k/v, layers, locations, heads, dim]
    locs, path = [7, 2, 5, 0, 3, 6], [0, 2, 4, 5]
    before = buf.float().clone()  # (float() of a float32 tensor is the tensor itself)
    move_path_kv(buf, locs, path)
    for j, node in enumerate(path):
        assert torch.equal(buf[:, :, locs[j]].float(), before[:, :, locs[node]])
    assert torch.equal(buf[:, :, 1].float(), before[:, :, 1])  # not the row's


def test_ngram_tree_branches_from_several_matches():
    ids = [5, 1, 2, 3, 7, 8, 0, 2, 3, 9, 1, 2, 3]
    # [1, 2, 3] matched at 1..3 continues 7 8 0 2; [2, 3] at 7..8 continues 9: a second branch
    assert ngram_tree(ids, 5, 3) == ([7, 8, 0, 2, 9], [0, 1, 2, 3, 0])
    assert ngram_tree(ids, 5, 1) == ([7, 8, 0, 2, 3], [0, 1, 2, 3, 4])  # one branch: the chain's drafts
    # continuations 4 5 9 0 1 and 4 5 6 0 1 4 share their first two nodes
    assert ngram_tree([1, 4, 5, 6, 0, 1, 4, 5, 9, 0, 1], 6, 2) == ([4, 5, 9, 0, 1, 6], [0, 1, 2, 3, 4, 2])
    assert ngram_tree([1, 2, 3], 4, 2) == ([], [])


# ---------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def target(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE, intermediate_size=128, num_hidden_layers=3, initializer_range=0.1,
                                      bos_token_id=None, eos_token_id=None, pad_token_id=0)).eval()
    path = str(tmp_path_factory.mktemp("target"))
    hf.save_pretrained(path)
    return hf, path


_CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CPU_AND_CUDA = ["cpu", pytest.param("cuda", marks=_CUDA)]  # CUDA: the Triton backend, tree steps handed over


def _runner(path: str, device: str = "cpu", **kw) -> ModelRunner:
    backend = "triton" if device == "cuda" else "torch_native"
    return ModelRunner(RunnerConfig(model_dir=path, device=device, dtype="float32", kv_tokens=512, max_slots=4,
                                    context_len=128, attention_backend=backend, **kw))


def _tol(device: str) -> float:
    return 1e-4 if device == "cpu" else 1e-3


def _prompt(n: int) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()


@torch.no_grad()
def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0, -1].float()


@torch.no_grad()
def _hf_greedy(hf, ids: list[int], n: int) -> list[int]:
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("device,deterministic", [("cpu", False), ("cpu", True), pytest.param("cuda", False, marks=_CUDA)],
                         ids=["torch_native", "no_tree_mask_backend", "cuda_triton"])
def test_tree_verify_matches_hf_and_keeps_the_accepted_path(target, device, deterministic):
    """Every node's logits are HF's for the prompt plus the node's path; the greedy path through
    non-contiguous nodes is accepted, its KV moved, and the next decode gives HF's logits. A
    backend without tree masks (the deterministic one, as Triton on CUDA) hands tree steps to the
    torch-native one."""
    hf, path = target
    runner, p = _runner(path, device, deterministic=deterministic), _prompt(12)
    assert getattr(runner.attn_backend, "supports_tree", False) == (device == "cpu" and not deterministic)
    locs = Alloc(3, 512)(20)
    first, _ = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, p, 0, locs[:12])]))
    g = _hf_greedy(hf, p, 5)
    assert first == g[:1]
    nodes = [g[0], (g[1] + 1) % VOCAB, g[1], (g[2] + 1) % VOCAB, g[2], g[3]]  # the path 0 -> 2 -> 4 -> 5 is greedy
    row = PlanRow(0, nodes, 12, locs[12:18], spec=5, tree=PARENTS)
    logits = runner.forward_logits(ForwardPlan(step=1, rows=[row]))
    for node in range(6):
        ancestors = [n for n in range(node + 1) if tree_mask(PARENTS)[node, n]]
        torch.testing.assert_close(logits[node].cpu(), _hf_logits(hf, p + [nodes[n] for n in ancestors]),
                                   atol=_tol(device), rtol=0)
    _, outs = runner.forward(ForwardPlan(step=2, rows=[row]))
    assert outs[0].spec_ids == g[1:5]
    after = runner.forward_logits(ForwardPlan(step=3, rows=[PlanRow(0, [g[4]], 16, [locs[16]])]))
    torch.testing.assert_close(after[0].cpu(), _hf_logits(hf, p + g[:5]), atol=_tol(device), rtol=0)


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + SHAPE["rms_norm_eps"]) * w


@torch.no_grad()
def _head_kv_reference(hf, head_dir: str, eagle3: bool, seq: list[int], n: int) -> torch.Tensor:
    """``[2, n, heads, dim]``: the K (rotated) and V a head must hold at positions ``0 .. n-1``,
    from the pair (HF's hidden state at p, token p + 1) and the checkpoint's own tensors."""
    from safetensors.torch import load_file
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    t = load_file(f"{head_dir}/model.safetensors")
    states = hf(torch.tensor([seq[:n]]), output_hidden_states=True).hidden_states  # inputs of layers 0..2, final
    table = t.get("embed_tokens.weight", hf.model.embed_tokens.weight)  # the head's own embedding, if it has one
    emb = table[torch.tensor(seq[1:n + 1])]
    if eagle3:  # the default layers of a 3-layer target: inputs of layers 0, 1, 2
        hid = torch.cat([states[i][0] for i in range(3)], dim=-1) @ t["fc.weight"].T
        x = torch.cat([_rms(emb, t["midlayer.input_layernorm.weight"]), _rms(hid, t["midlayer.hidden_norm.weight"])], -1)
        pre = "midlayer."
    else:
        x = torch.cat([emb, states[-1][0]], dim=-1) @ t["fc.weight"].T + t["fc.bias"]
        pre = "layers.0."
    k = (x @ t[pre + "self_attn.k_proj.weight"].T).view(n, 2, 16).transpose(0, 1)[None]
    v = (x @ t[pre + "self_attn.v_proj.weight"].T).view(n, 2, 16)
    cos, sin = LlamaRotaryEmbedding(LlamaConfig(**SHAPE))(k, torch.arange(n)[None])
    k = apply_rotary_pos_emb(k, k, cos, sin)[1][0].transpose(0, 1)
    return torch.stack([k, v])


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("eagle3", [False, True], ids=["eagle", "eagle3"])
def test_eagle_head_reads_the_right_pairs(target, tmp_path, eagle3, device):
    """The prompt in two chunks, then verify steps alternating the head's own tree drafts and an
    oracle tree whose greedy path runs through non-contiguous nodes: greedy tokens are HF's; the
    target's KV and the head's KV at every known position are what HF's hidden states and the
    checkpoint give for the pair (hidden at p, token p + 1) at position p."""
    hf, path = target
    head = make_eagle_head(str(tmp_path / "head"), eagle3, draft_vocab=300, intermediate_size=96, **SHAPE)
    runner = _runner(path, device, draft_model_dir=head, spec_algorithm="EAGLE3" if eagle3 else "EAGLE", spec_topk=2,
                     spec_steps=3)
    p, locs = _prompt(20), Alloc(5, 512)(48)
    want = _hf_greedy(hf, p, 24)
    runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, p[:8], 0, locs[:8], sample=False)]))
    ids, _ = runner.forward(ForwardPlan(step=1, rows=[PlanRow(0, p[8:], 8, locs[8:20])]))
    seq, trees, own = p + ids, 0, runner.draft.propose

    def oracle(plan, _):  # nodes: wrong, x1, wrong, x2 under x1: the path 0 -> 2 -> 4
        x1, x2 = want[len(seq) - 20], want[len(seq) - 19]
        row = plan.rows[0]
        row.input_ids, row.tree = [row.input_ids[0], (x1 + 1) % VOCAB, x1, (x2 + 1) % VOCAB, x2], [0, 0, 2, 2]
        return {}

    for step in range(6):
        runner.draft.propose = oracle if step % 2 else own
        pos = len(seq) - 1
        row = PlanRow(0, [seq[-1]], pos, locs[pos:pos + 5], spec=4, draft_steps=3)
        _, outs = runner.forward(ForwardPlan(step=2 + step, rows=[row]))
        trees += bool(row.tree)
        assert len(outs[0].spec_ids) == (3 if step % 2 else 1)  # the random head's drafts fail
        seq += outs[0].spec_ids
    assert trees == 6 and seq[20:] == want[:len(seq) - 20]
    n = len(seq) - 1
    at = torch.tensor(locs[:n], device=device)
    ref_kv = torch.stack(_target_kv(hf, seq[:n]), dim=1)  # [2, layers, T, heads, dim]
    torch.testing.assert_close(runner.kv_cache.buf[:, :, at].cpu(), ref_kv, atol=_tol(device), rtol=0)
    torch.testing.assert_close(runner.draft.kv_cache.buf[:, 0, at].cpu(), _head_kv_reference(hf, head, eagle3, seq, n),
                               atol=_tol(device), rtol=0)


@pytest.mark.parametrize("copy", [True, False], ids=["copy_of_the_targets", "its_own"])
def test_eagle_head_with_an_embedding(target, tmp_path, copy):
    """A checkpoint's ``embed_tokens``: a copy of the target's is dropped for the target's (one
    table); another is the head's own, and the head's KV after a prefill is what it gives."""
    hf, path = target
    table = hf.model.embed_tokens.weight.detach().clone()
    head = make_eagle_head(str(tmp_path / "head"), False, intermediate_size=96, embed=table if copy else table.flip(0),
                           **SHAPE)
    runner = _runner(path, draft_model_dir=head, spec_algorithm="EAGLE", spec_steps=2)
    draft = runner.draft
    assert (draft.head.embed_tokens is None) == copy
    assert draft.embed is (runner.model.model.embed_tokens if copy else draft.head.embed_tokens)
    p, locs = _prompt(10), Alloc(4, 512)(10)
    ids, _ = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, p, 0, locs)]))
    want = _head_kv_reference(hf, head, False, p + ids, 10)
    torch.testing.assert_close(draft.kv_cache.buf[:, 0, torch.tensor(locs)], want, atol=1e-4, rtol=0)


@torch.no_grad()
def _target_kv(hf, ids: list[int]) -> list[torch.Tensor]:
    """HF's cache per layer as ``[2, T, kv_heads, dim]``."""
    cache = hf(torch.tensor([ids]), use_cache=True).past_key_values
    return [torch.stack([cache.layers[i].keys[0].transpose(0, 1), cache.layers[i].values[0].transpose(0, 1)])
            for i in range(3)]


def test_eagle_head_checks(target, tmp_path):
    """A head whose vocabulary or hidden size is not the target's, an empty directory, a head of
    the other layout, and a checkpoint tensor that fits no parameter fail at start-up with the
    field named."""
    _, path = target
    cases = [(dict(vocab_size=VOCAB + 1), "vocabulary"), (dict(hidden_size=32, num_attention_heads=2), "hidden states"),
             (dict(num_hidden_layers=2), "one-layer heads only")]
    for i, (change, match) in enumerate(cases):
        head = make_eagle_head(str(tmp_path / str(i)), True, draft_vocab=300, intermediate_size=96, **{**SHAPE, **change})
        with pytest.raises(ValueError, match=match):
            _runner(path, draft_model_dir=head, spec_algorithm="EAGLE3", spec_steps=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither model.safetensors"):
        _runner(path, draft_model_dir=str(tmp_path / "empty"), spec_algorithm="EAGLE", spec_steps=2)
    eagle = make_eagle_head(str(tmp_path / "eagle"), False, intermediate_size=96, **SHAPE)
    with pytest.raises(ValueError, match="holds an EAGLE head"):
        _runner(path, draft_model_dir=eagle, spec_algorithm="EAGLE3", spec_steps=2)
    cfg = (tmp_path / "eagle" / "config.json")
    cfg.write_text(cfg.read_text().replace("LlamaForCausalLMEagle", "LlamaForCausalLM"))  # no layout named
    with pytest.raises(ValueError, match="checkpoint tensor 'fc"):  # EAGLE's fc (and its bias) fit no EAGLE3 head
        _runner(path, draft_model_dir=eagle, spec_algorithm="EAGLE3", spec_steps=2)


def test_eagle_trees_drafted_together_as_alone(target, tmp_path):
    """Two rows' trees grown in one batched head forward per level are the trees each row gets on
    its own, and so is the scratch KV of their expanded nodes (the rows' masks, scratch areas and
    frontiers do not mix)."""
    _, path = target
    head = make_eagle_head(str(tmp_path / "head"), True, std=0.3, draft_vocab=300, intermediate_size=96, **SHAPE)
    prompts = {0: _prompt(9), 1: _prompt(14)}

    def drafts(together: bool) -> dict[int, tuple[list[int], list[int], torch.Tensor]]:
        runner = _runner(path, draft_model_dir=head, spec_algorithm="EAGLE3", spec_topk=3, spec_steps=3)
        alloc = Alloc(7, 512)
        locs = {s: alloc(32) for s in prompts}
        prefill = [PlanRow(s, p, 0, locs[s][:len(p)]) for s, p in prompts.items()]
        first = {}
        for rows in ([prefill] if together else [[r] for r in prefill]):
            ids, _ = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(r.slot, GREEDY) for r in rows], rows=rows))
            first.update({r.slot: tok for r, tok in zip(rows, ids)})
        verify = [PlanRow(s, [first[s]], len(p), locs[s][len(p):len(p) + 7], spec=6, draft_steps=3)
                  for s, p in prompts.items()]
        scratch = {}
        for rows in ([verify] if together else [[v] for v in verify]):
            runner.draft.propose(ForwardPlan(step=1, rows=rows), runner)
            for j, v in enumerate(rows):  # 3 levels, top-3: 6 expanded nodes per row
                at = runner.draft.scratch + j * 3 * 3
                scratch[v.slot] = runner.draft.kv_cache.buf[:, 0, at:at + 6].clone()
        return {v.slot: (v.input_ids, v.tree, scratch[v.slot]) for v in verify}

    alone, together = drafts(False), drafts(True)
    for s in prompts:
        assert len(alone[s][0]) == 7 and alone[s][1] and alone[s][2].abs().sum() > 0
        assert together[s][:2] == alone[s][:2]
        torch.testing.assert_close(together[s][2], alone[s][2], atol=1e-5, rtol=0)


def test_eagle_tree_nodes_see_only_their_ancestors(target, tmp_path, monkeypatch):
    """Each expanded first-level node's head output equals the head run on that node alone after
    the prefix: siblings expanded in the same forward do not see each other."""
    from treadle.gpu_worker import spec_eagle

    _, path = target
    head = make_eagle_head(str(tmp_path / "head"), False, std=0.3, intermediate_size=96, **SHAPE)
    runner, p = _runner(path, draft_model_dir=head, spec_algorithm="EAGLE", spec_topk=3, spec_steps=2), _prompt(11)
    locs = Alloc(9, 512)(20)
    ids, _ = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, p, 0, locs[:11])]))
    grown = []
    monkeypatch.setattr(spec_eagle._Tree, "best", lambda t, f=spec_eagle._Tree.best: grown.append(t) or f(t))
    runner.draft.propose(ForwardPlan(step=1, rows=[PlanRow(0, ids, 11, locs[11:15], spec=3, draft_steps=2)]), runner)
    tree, draft = grown[0], runner.draft
    expanded = [c for c in tree.slot_of]
    assert len(expanded) == 3 and all(tree.nodes[c][3] == 1 for c in expanded)
    spare = torch.tensor([draft.scratch + 20])  # a scratch location no tree of this step uses
    for c in expanded:
        _, feat = draft._run(torch.tensor([tree.nodes[c][0]]), tree.nodes[0][4][None], torch.tensor([11]), spare,
                             [(0, 11, 1)], {0: (spare, torch.ones(1, 1, dtype=torch.bool))})
        torch.testing.assert_close(feat[0], tree.nodes[c][4], atol=1e-3, rtol=1e-4)


def test_eagle3_head_without_lm_head_uses_the_targets(target, tmp_path):
    """An EAGLE3 checkpoint without ``lm_head`` / ``d2t`` drafts over the target's LM head (SGLang's
    ``load_lm_head_from_target``); its embedding is the target's."""
    from safetensors.torch import load_file, save_file

    _, path = target
    head = make_eagle_head(str(tmp_path / "head"), True, draft_vocab=300, intermediate_size=96, **SHAPE)
    tensors = {k: v for k, v in load_file(f"{head}/model.safetensors").items() if k not in ("lm_head.weight", "d2t")}
    save_file(tensors, f"{head}/model.safetensors")
    runner = _runner(path, draft_model_dir=head, spec_algorithm="EAGLE3", spec_topk=2, spec_steps=2)
    assert runner.draft.head.lm_head is None and runner.draft.embed is runner.model.model.embed_tokens
    locs = Alloc(2, 512)(16)
    ids, _ = runner.forward(ForwardPlan(step=0, new_slots=[NewSlot(0, GREEDY)], rows=[PlanRow(0, _prompt(6), 0, locs[:6])]))
    row = PlanRow(0, ids, 6, locs[6:10], spec=3, draft_steps=2)
    runner.draft.propose(ForwardPlan(step=1, rows=[row]), runner)
    x = runner.draft.last[0][0]
    best = int(runner.model.compute_logits(x[None])[0].argmax())
    assert row.input_ids[1] == best and len(row.input_ids) == 4  # the first node: the target head's argmax
