"""The stacked engine inside the runtime: one grouped-GEMM forward per step for every row, the
same tokens and scores as the hf engine, a step free of host synchronisation, clear errors.

The model itself (logits vs Hugging Face per architecture, weight sharing) is tested in
test_stacked_model.py; the runtime's exactness tests run on both engines in test_runtime.py.
"""
from __future__ import annotations

import pytest
import torch

import me_kernels
import me_runtime.stacked as stacked_module
from me_runtime import Ensemble
from me_runtime.decode import Batch
from me_runtime.stacked_engine import StackedEngine, catch_up_sequences, stage_inputs
from tiny_models import tiny_member

V = 11
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [3], [4, 4, 2], [0, 1]]


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


def llama_members(count=3, **kw):
    return [tiny_member("llama", V, seed=70 + i, sharpness=3.0, **kw) for i in range(count)]


@pytest.mark.parametrize("method", ["me", "ce", "single"])
def test_same_tokens_as_the_hf_engine(method):
    models = llama_members()
    stacked = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="stacked")
    hf = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="hf")
    assert stacked.engine == "stacked" and hf.engine == "hf"
    for params in ({}, dict(temperature=0.8, top_k=4, top_p=0.9)):
        a = stacked.generate_ids(PROMPTS, method=method, max_new_tokens=10, seed=[1, 2, 3, 4], member=1, **params)
        b = hf.generate_ids(PROMPTS, method=method, max_new_tokens=10, seed=[1, 2, 3, 4], member=1, **params)
        assert [(g.token_ids, g.members) for g in a] == [(g.token_ids, g.members) for g in b]
    conts = [[5, 6], [7], [1, 2, 3, 4, 5], [9]]
    assert stacked.score_ids(PROMPTS, conts) == pytest.approx(hf.score_ids(PROMPTS, conts), rel=1e-5, abs=1e-5)


def test_auto_picks_stacked_for_supported_members_and_hf_otherwise():
    from transformers import GPT2Config, GPT2LMHeadModel

    assert Ensemble(llama_members(2)).engine == "stacked"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=64)).eval()
    assert Ensemble([llama_members(1)[0], gpt2]).engine == "hf"
    with pytest.raises(ValueError, match=r"member 1.*GPT2LMHeadModel"):
        Ensemble([llama_members(1)[0], gpt2], engine="stacked")
    with pytest.raises(ValueError, match="engine"):
        Ensemble(llama_members(1), engine="vllm")


def test_capacity_is_checked_before_any_work(monkeypatch):
    ens = Ensemble(llama_members(2), max_seq_len=12)
    calls = []
    monkeypatch.setattr(StackedEngine, "begin", lambda self, batch: calls.append(batch))
    with pytest.raises(ValueError, match=r"needs 13 positions.*max_seq_len is 12"):
        ens.generate_ids([[1] * 8, [2]], max_new_tokens=5)
    with pytest.raises(ValueError, match="max_seq_len"):
        ens.score_ids([[1] * 10], [[2] * 3])
    assert calls == []
    with pytest.raises(ValueError, match="max_seq_len"):
        Ensemble(llama_members(1), max_seq_len=1)
    # by default the limit is the smallest context among the members, and the error names it
    members = llama_members(2)
    members[1].config.max_position_embeddings = 40
    for engine in ("stacked", "hf"):
        with pytest.raises(ValueError, match=r"needs 45 positions.*member 1's context length \(max_position_embeddings\) is 40"):
            Ensemble(members, engine=engine).generate_ids([[1] * 35], max_new_tokens=10)


def test_one_grouped_gemm_per_projection_whatever_members_the_rows_chose(monkeypatch):
    models = llama_members()
    ens = Ensemble(models, engine="stacked")
    layers = models[0].config.num_hidden_layers
    calls = []
    real = stacked_module.grouped_linear

    def counting(x, members, weight, bias=None):
        calls.append(int(torch.unique(members).numel()))
        return real(x, members, weight, bias)

    monkeypatch.setattr(stacked_module, "grouped_linear", counting)
    engine = ens._engine
    batch = Batch([[1, 2], [3, 4], [5, 6]], [0, 1, 2], max_new_tokens=4, device=torch.device("cpu"))
    engine.begin(batch)
    members = torch.tensor([0, 1, 2], dtype=torch.int32)
    with torch.inference_mode():
        logits = engine.member_logits(batch, 0, members, [0, 1, 2])
    # 4 projections per layer (qkv, o, gate_up, down) + the lm_head, rows on 3 different members
    assert len(calls) == 4 * layers + 1
    assert max(calls) == 3
    for row, model in enumerate(models):
        ref = model(input_ids=torch.tensor([batch.prompt_ids[row].tolist()])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
    engine.end()


def test_rows_catch_up_lazily_over_several_tokens():
    # A member skipped for some steps reads all its pending tokens in one multi-token forward;
    # the logits equal a fresh forward over the whole sequence.
    models = llama_members(2)
    engine = Ensemble(models, engine="stacked")._engine
    batch = Batch([[1, 2, 3], [4]], [0, 1], max_new_tokens=6, device=torch.device("cpu"))
    engine.begin(batch)
    with torch.inference_mode():
        for t in range(5):
            members = [0, 0] if t < 4 else [1, 0]
            engine.member_logits(batch, t, torch.tensor(members), members)
            batch.generated[:, t] = torch.tensor([t + 2, t + 5]) % V
        logits = engine.member_logits(batch, 5, torch.tensor([1, 1]), [1, 1])
    for row, prompt in enumerate([[1, 2, 3], [4]]):
        full = prompt + [((t + 2) if row == 0 else (t + 5)) % V for t in range(5)]
        ref = models[1](input_ids=torch.tensor([full])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
    engine.end()


def test_weights_are_held_once():
    models = llama_members()
    ens = Ensemble(models, engine="stacked")
    stacked = [t for g in ens._engine.groups for t in g.weight_tensors()]

    def inside(p):
        start = p.untyped_storage().data_ptr()
        return any(start == s.untyped_storage().data_ptr() for s in stacked)

    assert all(inside(p) for m in models for p in m.parameters())
    # memory_bytes counts each storage once: the stacked tensors are exactly the weights' bytes
    param_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    ens.generate_ids([[1, 2, 3]], max_new_tokens=4, seed=0)
    mem = ens.memory_bytes()
    assert mem["weights"] == param_bytes
    # the last call's cache: 3 members x 1 slot x (3 + 4) positions x layers x k and v
    config = models[0].config
    head_dim = config.hidden_size // config.num_attention_heads
    per_position = config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * 4
    rows = 3 * 1 + 1  # every (member, slot) row and the trash row
    assert mem["kv_cache"] == rows * (3 + 4) * per_position
    assert Ensemble(models, engine="hf").memory_bytes() == {"weights": param_bytes, "kv_cache": None}


def test_the_device_step_compiles_without_graph_breaks():
    # The proof that a stacked step has no host synchronisation: its device part -- rows sorted by
    # shape group, each group's catch-up in several end-aligned chunks from the consumed table
    # (one forward per chunk for every row on its own member, the table updated in place), the
    # fused ME sampling step -- compiles with fullgraph=True and gives the eager result.
    torch._dynamo.reset()
    models = [tiny_member("llama", V, seed=80), tiny_member("qwen2", V, seed=81), tiny_member("llama", V, seed=82)]
    engine = Ensemble(models, engine="stacked")._engine
    assert len(engine.groups) == 2  # Qwen2's biases make it a group of its own
    weights = torch.tensor([0.5, 0.3, 0.2])
    batch = Batch([[1, 2, 3, 4, 5], [4, 5], [6, 7, 8]], [0, 1, 2], max_new_tokens=4, device=torch.device("cpu"))
    members = torch.tensor([0, 1, 2])  # groups 0, 1, 0: two rows in group 0, one in group 1 (host-known)

    def step(members, seeds, offset):
        order = torch.sort(engine.member_group_dev[members], stable=True).indices
        logits = torch.empty((3, V))
        begin = 0
        for g, count in ((0, 2), (1, 1)):
            rows = order[begin : begin + count]
            begin += count
            out = catch_up_sequences(engine.groups[g], engine.caches[g], None, batch.tokens, batch.width,
                                     batch.prompt_lens_dev, 0, rows, members[rows], engine.member_local,
                                     engine.slots_dev, engine.consumed_dev, q=2, n_chunks=3, kv_len=5)
            logits.index_copy_(0, rows, out)
        return me_kernels.me_step(logits, weights, seed=seeds, offset=offset)

    offset = torch.zeros(3, dtype=torch.long)
    with torch.inference_mode():
        engine.begin(batch)
        eager = step(members, batch.seeds, offset)
        eager_consumed = engine.consumed_dev.clone()
        engine.begin(batch)  # fresh caches and consumed table: the step writes both
        compiled = torch.compile(step, fullgraph=True, dynamic=False)(members, batch.seeds, offset)
    assert torch.equal(eager[0], compiled[0]) and torch.equal(eager[1], compiled[1])
    assert torch.equal(engine.consumed_dev, eager_consumed)
    assert engine.consumed_dev.tolist() == [[5, 0, 0], [0, 2, 0], [0, 0, 3]]


def test_sliding_window_members_match_the_hf_engine():
    from transformers import MistralConfig, MistralForCausalLM

    models = []
    for seed in range(2):
        torch.manual_seed(seed)
        config = MistralConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               sliding_window=4, bos_token_id=None, eos_token_id=None, pad_token_id=None)
        models.append(MistralForCausalLM(config).eval())
    prompts = [[1, 3, 5, 7, 9, 2, 4], [3], [4, 4, 0]]
    a = Ensemble(models, engine="stacked").generate_ids(prompts, method="me", max_new_tokens=12, seed=[1, 2, 3])
    b = Ensemble(models, engine="hf").generate_ids(prompts, method="me", max_new_tokens=12, seed=[1, 2, 3])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["me", "ce"])
def test_cuda_graph_replay_gives_the_eager_tokens(method, monkeypatch):
    # On CUDA the stacked engine replays captured graphs of its forward; the tokens, member traces
    # and scores must equal the eager forward's, across calls that reuse the captured graphs and
    # with rows finishing early (fewer rows: padded no-op rows in the bucket).
    models = [m.cuda() for m in llama_members(3, eos_token_id=2)]
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3], [4, 4, 2], [0, 1], [5, 5, 5]]
    runs = {}
    for graphs in ("1", "0"):
        monkeypatch.setenv("ME_CUDA_GRAPHS", graphs)
        ens = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="stacked")
        assert ens._engine.cuda_graphs == (graphs == "1")
        outs = [ens.generate_ids(prompts, method=method, max_new_tokens=16, seed=[1, 2, 3, 4, 5]) for _ in range(2)]
        outs.append(ens.generate_ids(prompts[:2], method=method, max_new_tokens=16, seed=[1, 2]))
        runs[graphs] = [[(g.token_ids, g.members, g.finish_reason) for g in out] for out in outs]
    assert runs["1"] == runs["0"]
    assert runs["1"][0] == runs["1"][1] and runs["1"][2] == runs["1"][0][:2]


def test_graph_inputs_pad_rows_with_row_0_and_count_0():
    # A CUDA graph's bucket has more rows than the step: padded rows must be no-ops (count 0)
    # on a member the real rows use (else grouped_linear would read an unchosen member's weights).
    static = (torch.full((4, 2), 9),) + tuple(torch.full((4,), 9) for _ in range(4))
    values = (torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([2, 2, 1]), torch.tensor([0, 1, 2]),
              torch.tensor([5, 6, 7]), torch.tensor([2, 1, 2]))
    stage_inputs(static, values)
    tokens, member, slot, start, count = static
    assert tokens[:3].tolist() == values[0].tolist()
    assert member.tolist() == [2, 2, 1, 2] and slot.tolist() == [0, 1, 2, 0] and start.tolist() == [5, 6, 7, 5]
    assert count.tolist() == [2, 1, 2, 0]


def test_a_second_ensemble_of_the_same_members_shares_their_stacked_weights():
    # Re-weighting the same members (the demo's score table does it) must not stack them again:
    # the second Ensemble reuses the group, so the weights stay held once. Another order or
    # subset is a new group, with a warning that the weights are then held twice.
    models = llama_members(2)
    a = Ensemble(models, engine="stacked")
    b = Ensemble(models, weights=[1.0, 0.0], engine="stacked")
    assert a._engine.groups[0] is b._engine.groups[0]
    assert a.memory_bytes()["weights"] == sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    with pytest.warns(RuntimeWarning, match="held twice"):
        Ensemble(models[::-1], engine="stacked")


def test_cuda_graph_path_logic_with_eager_replays(eager_cuda_graphs):
    # The graph path's own logic on the CPU (see the eager_cuda_graphs fixture in conftest.py).
    models = llama_members(3, eos_token_id=2)
    graphed = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="stacked")
    graphed._engine.cuda_graphs = True
    plain = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="stacked")
    prompts = [[1, 2, 3, 4, 5, 6, 7], [3], [4, 4, 2], [0, 1], [5, 5, 5]]
    # CE by drafting too: its verification reads the drafted span with logits="all" (graphs of
    # q = span), rolls back, and its first round reads the prompts in chunks
    for method, extra in (("me", {}), ("ce", {}), ("ce", dict(draft_tokens=3, draft_adaptive=False))):
        for batch in (prompts, prompts, prompts[:2]):
            seeds = list(range(1, len(batch) + 1))
            a = graphed.generate_ids(batch, method=method, max_new_tokens=16, seed=seeds, **extra)
            b = plain.generate_ids(batch, method=method, max_new_tokens=16, seed=seeds, **extra)
            assert [(g.token_ids, g.members, g.finish_reason) for g in a] == [
                (g.token_ids, g.members, g.finish_reason) for g in b]
    engine = graphed._engine
    assert engine.forwards and engine.forwards[0] is not None
    assert len(engine.forwards[0].graphs) > 2  # several buckets captured, then replayed
    assert engine.caches[0].slots == 8  # 5 rows -> a bucket of 8, kept for the 2-row call


@pytest.mark.parametrize("method", ["me", "ce"])
def test_chunked_catch_ups_and_scoring_match_the_hf_engine(method, monkeypatch):
    # Long catch-ups (prompts) run in end-aligned chunks of at most CHUNK_TOKENS tokens over all
    # sequences; scoring chunks positions the same way. Tiny chunks force many of them.
    import me_runtime.stacked_engine as stacked_engine_module

    monkeypatch.setattr(stacked_engine_module, "CHUNK_TOKENS", 3)
    models = llama_members(3)
    stacked = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="stacked")
    hf = Ensemble(models, weights=[0.5, 0.3, 0.2], engine="hf")
    a = stacked.generate_ids(PROMPTS, method=method, max_new_tokens=8, seed=[4, 5, 6, 7])
    b = hf.generate_ids(PROMPTS, method=method, max_new_tokens=8, seed=[4, 5, 6, 7])
    assert [(g.token_ids, g.members) for g in a] == [(g.token_ids, g.members) for g in b]
    conts = [[5, 6, 7, 8], [7], [1, 2, 3, 4, 5], [9, 9]]
    assert stacked.score_ids(PROMPTS, conts) == pytest.approx(hf.score_ids(PROMPTS, conts), rel=1e-5, abs=1e-5)
