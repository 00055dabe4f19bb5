"""me_runtime: exactness of ME / CE / single by exact enumeration, seeds, batching, stop
criteria, scoring and every error path, on tiny random Llama and Qwen2 members."""
from __future__ import annotations

import math
import os
from collections import Counter

import pytest
import torch
from scipy import stats

from me_runtime import Ensemble
from me_runtime.decode import Batch
from me_runtime.hf_engine import MemberRunner
from me_runtime.stacked_engine import StackedEngine
from tiny_models import OTHER_ARCHITECTURES, char_tokenizer, next_token_probs, other_architecture_members, tiny_member

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as collected (the fixture below flips it)
V = 5  # vocabulary of the enumeration tests: 5^3 = 125 sequences of 3 tokens
STEPS = 3
PROMPT = [1, 3]
WEIGHTS = [0.5, 0.3, 0.2]
# Every exactness, seed and batching test runs on both engines: the Hugging Face forwards and the
# stacked grouped-GEMM decoder (here with two groups: the Llama members stack, Qwen2 has biases).
ENGINES = ["hf", "stacked"]


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def members():
    # Two architectures in one ensemble; sharp, distinct distributions.
    return [
        tiny_member("llama", V, seed=11, sharpness=6.0),
        tiny_member("qwen2", V, seed=12, sharpness=6.0),
        tiny_member("llama", V, seed=13, sharpness=6.0),
    ]


@pytest.fixture(scope="module", params=ENGINES)
def ensemble(members, request):
    return Ensemble(members, weights=WEIGHTS, engine=request.param)


# ----------------------------------------------------------------------------- exact reference
def transform(p: torch.Tensor, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """DESIGN.md's transforms on a probability vector (float64), written independently of
    me_kernels.reference: temperature -> top-k -> top-p -> min-p, renormalised."""
    if temperature == 0:
        out = torch.zeros_like(p)
        out[int(torch.argmax(p))] = 1.0
        return out
    q = torch.softmax(torch.log(p) / temperature, dim=-1)
    if top_k > 0:
        kth = torch.sort(q, descending=True).values[min(top_k, q.numel()) - 1]
        q = torch.where(q >= kth, q, torch.zeros_like(q))
        q = q / q.sum()
    if top_p < 1.0:
        desc = torch.sort(q, descending=True).values
        n = int(torch.searchsorted(torch.cumsum(desc, 0), torch.tensor(top_p, dtype=q.dtype) - 1e-12)) + 1
        tau = desc[min(n, q.numel()) - 1]
        q = torch.where(q >= tau, q, torch.zeros_like(q))
        q = q / q.sum()
    if min_p > 0.0:
        q = torch.where(q >= min_p * q.max(), q, torch.zeros_like(q))
        q = q / q.sum()
    return q


def exact_sequence_probs(models, weights, prompt, steps, rule, **params) -> dict[tuple, float]:
    """Probability of every continuation of `steps` tokens. rule: "me" (mixture of transformed
    members), "ce" (transformed mixture) or an int (that member alone)."""
    probs: dict[tuple, float] = {}

    def walk(prefix, prob, depth):
        if depth == steps:
            probs[tuple(prefix[len(prompt) :])] = prob
            return
        member_probs = [next_token_probs(m, prefix) for m in models]
        if rule == "me":
            q = sum(w * transform(p, **params) for w, p in zip(weights, member_probs))
        elif rule == "ce":
            q = transform(sum(w * p for w, p in zip(weights, member_probs)), **params)
        else:
            q = transform(member_probs[rule], **params)
        for x in range(q.numel()):
            if q[x] > 0:
                walk(prefix + [x], prob * float(q[x]), depth + 1)

    walk(list(prompt), 1.0, 0)
    return probs


def chi_square_pvalue(samples: list[tuple], expected: dict[tuple, float]) -> float:
    """Pearson chi-square p-value of the sample frequencies against `expected` (bins with an
    expected count under 5 are pooled). Fails outright on an impossible outcome."""
    counts = Counter(samples)
    impossible = [s for s in counts if expected.get(s, 0.0) == 0.0]
    assert not impossible, f"outcomes with probability 0 were drawn: {impossible[:5]}"
    n = len(samples)
    obs, exp, pooled_obs, pooled_exp = [], [], 0, 0.0
    for key, p in expected.items():
        if n * p >= 5:
            obs.append(counts.get(key, 0))
            exp.append(n * p)
        else:
            pooled_obs += counts.get(key, 0)
            pooled_exp += n * p
    if pooled_exp > 0:
        obs.append(pooled_obs)
        exp.append(pooled_exp)
    exp = [e * n / sum(exp) for e in exp]  # absorb float rounding of the probabilities
    return stats.chisquare(obs, exp).pvalue


def draw(ensemble, n, **options) -> list[tuple]:
    gens = ensemble.generate_ids([PROMPT] * n, max_new_tokens=STEPS, seed=1000, **options)
    assert all(len(g.token_ids) == STEPS and g.finish_reason == "length" for g in gens)
    return [tuple(g.token_ids) for g in gens]


# ----------------------------------------------------------------------------- exactness
N = 3000


@pytest.mark.parametrize("method", ["me", "ce"])
def test_plain_sampling_is_the_mixture(ensemble, members, method):
    samples = draw(ensemble, N, method=method)
    mixture = exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, "ce")
    assert chi_square_pvalue(samples, mixture) > 1e-4
    # power check: the same samples clearly reject a single member's distribution
    alone = exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, 0)
    samples_in_support = [s for s in samples if alone.get(s, 0) > 0]
    assert chi_square_pvalue(samples_in_support, alone) < 1e-6


@pytest.mark.parametrize("params", [dict(temperature=0.7, top_p=0.8), dict(top_k=2, min_p=0.2), dict(temperature=1.5, top_k=3, top_p=0.9)])
def test_transforms_me_mixes_transformed_members_ce_transforms_the_mixture(ensemble, members, params):
    me_expected = exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, "me", **params)
    ce_expected = exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, "ce", **params)
    me_samples = draw(ensemble, N, method="me", **params)
    ce_samples = draw(ensemble, N, method="ce", **params)
    assert chi_square_pvalue(me_samples, me_expected) > 1e-4
    assert chi_square_pvalue(ce_samples, ce_expected) > 1e-4


def test_me_and_ce_differ_under_truncation(ensemble, members):
    # The two semantics are really different here, so the test above can tell them apart.
    params = dict(temperature=0.7, top_p=0.8)
    ce_expected = exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, "ce", **params)
    me_samples = draw(ensemble, N, method="me", **params)
    support = [s for s in me_samples if ce_expected.get(s, 0) > 0]
    assert len(support) < len(me_samples) or chi_square_pvalue(support, ce_expected) < 1e-6


@pytest.mark.parametrize("member", [0, 1, 2])
def test_single_is_the_member_alone(ensemble, members, member):
    samples = draw(ensemble, 1500, method="single", member=member)
    assert chi_square_pvalue(samples, exact_sequence_probs(members, WEIGHTS, PROMPT, STEPS, member)) > 1e-4
    gens = ensemble.generate_ids([PROMPT], method="single", member=member, max_new_tokens=4, seed=0)
    assert gens[0].members == [member] * 4


def test_greedy_ce_is_the_mixture_argmax(ensemble, members):
    prompts = [[1, 3], [4, 0, 2, 2], [3]]
    gens = ensemble.generate_ids(prompts, method="ce", temperature=0.0, max_new_tokens=6, seed=0)
    for prompt, gen in zip(prompts, gens):
        prefix = list(prompt)
        for tok in gen.token_ids:
            mix = sum(w * next_token_probs(m, prefix) for w, m in zip(WEIGHTS, members))
            assert tok == int(torch.argmax(mix))
            prefix.append(tok)


@pytest.mark.parametrize("engine", ENGINES)
def test_greedy_single_matches_hf_generate(members, engine):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    prompt = [2, 4, 1]
    ours = ens.generate_ids([prompt], method="single", member=1, temperature=0.0, max_new_tokens=8)[0].token_ids
    hf = members[1].generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=8, min_new_tokens=8)
    assert ours == hf[0, len(prompt) :].tolist()


def test_member_trace_frequencies_follow_weights(ensemble):
    gens = ensemble.generate_ids([PROMPT] * 2000, method="me", max_new_tokens=2, seed=7)
    counts = Counter(m for g in gens for m in g.members)
    n = sum(counts.values())
    assert stats.chisquare([counts[m] for m in range(3)], [w * n for w in WEIGHTS]).pvalue > 1e-4


def test_shared_selection_one_member_per_step_and_exact(ensemble, members):
    gens = ensemble.generate_ids([PROMPT, [2], [4, 4, 4]], method="me", selection="shared", max_new_tokens=6, seed=3)
    for t in range(6):
        assert len({g.members[t] for g in gens}) == 1
    # Exact per-request distribution: one request per call (requests inside a call are
    # correlated through the shared member), many calls with different seeds.
    samples, step_members = [], []
    for call in range(400):
        g = ensemble.generate_ids([PROMPT, [2]], method="me", selection="shared", max_new_tokens=2, seed=50_000 + 7 * call)
        samples.append(tuple(g[0].token_ids))
        step_members += g[0].members
    assert chi_square_pvalue(samples, exact_sequence_probs(members, WEIGHTS, PROMPT, 2, "ce")) > 1e-4
    n = len(step_members)
    counts = Counter(step_members)
    assert stats.chisquare([counts[m] for m in range(3)], [w * n for w in WEIGHTS]).pvalue > 1e-4


@pytest.mark.triton_kernels
@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on CPU: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("method, params", [("me", {}), ("ce", dict(top_p=0.8)), ("me", dict(temperature=0.7, top_k=3))])
@pytest.mark.parametrize("engine", ENGINES)
def test_runtime_on_the_triton_kernels(members, method, params, engine, monkeypatch):
    # The kernels draw the reference's Philox numbers, so the runtime gives the same tokens on
    # the interpreted Triton kernels as on the torch reference path.
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    prompts = [[1, 3], [4, 0, 2]]
    on_kernels = ens.generate_ids(prompts, method=method, max_new_tokens=4, seed=[3, 4], **params)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    on_reference = ens.generate_ids(prompts, method=method, max_new_tokens=4, seed=[3, 4], **params)
    assert [(g.token_ids, g.members) for g in on_kernels] == [(g.token_ids, g.members) for g in on_reference]


# ----------------------------------------------------------------------------- seeds, batching
RAGGED = [[1, 2, 3, 4, 0, 1, 2], [3], [4, 4, 2], [0, 1]]


@pytest.mark.parametrize("method", ["me", "ce", "single"])
@pytest.mark.parametrize("selection", ["independent"])
@pytest.mark.parametrize("engine", ENGINES)
def test_batch_invariance_and_determinism(members, method, selection, engine):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    batch = ens.generate_ids(RAGGED, method=method, max_new_tokens=12, seed=[5, 6, 7, 8], member=2)
    again = ens.generate_ids(RAGGED, method=method, max_new_tokens=12, seed=[5, 6, 7, 8], member=2)
    assert [g.token_ids for g in batch] == [g.token_ids for g in again]
    for i, prompt in enumerate(RAGGED):
        alone = ens.generate_ids([prompt], method=method, max_new_tokens=12, seed=5 + i, member=2)[0]
        assert alone.token_ids == batch[i].token_ids
        assert alone.members == batch[i].members
    # the order of requests inside the batch does not matter either
    rev = ens.generate_ids(RAGGED[::-1], method=method, max_new_tokens=12, seed=[8, 7, 6, 5], member=2)
    assert [g.token_ids for g in rev[::-1]] == [g.token_ids for g in batch]


@pytest.mark.parametrize("attention", ["sdpa", "eager", "2d-mask"])
def test_padding_masks_for_each_attention_path(attention, monkeypatch):
    # Ragged prompts are left-padded; each mask path of the hf engine must give every row the
    # logits it gets alone.
    import me_runtime.hf_engine as decode_module

    models = [tiny_member(arch, V, seed=41 + i, sharpness=4.0) for i, arch in enumerate(("llama", "qwen2"))]
    if attention == "eager":
        for m in models:
            m.set_attn_implementation("eager")
    if attention == "2d-mask":
        monkeypatch.setattr(decode_module, "_padding_mask_kind", lambda config: "2d")
    expected_kind = {"sdpa": "4d-bool", "eager": "4d-float", "2d-mask": "2d"}[attention]
    assert decode_module.MemberRunner(models[0], torch.device("cpu")).mask_kind == expected_kind
    ens = Ensemble(models, engine="hf")
    for method in ("me", "ce"):
        batch = ens.generate_ids(RAGGED, method=method, max_new_tokens=8, seed=[1, 2, 3, 4])
        for i, prompt in enumerate(RAGGED):
            alone = ens.generate_ids([prompt], method=method, max_new_tokens=8, seed=1 + i)[0]
            assert alone.token_ids == batch[i].token_ids


def test_int_seed_means_seed_plus_index(ensemble):
    a = ensemble.generate_ids(RAGGED, max_new_tokens=5, seed=40)
    b = ensemble.generate_ids(RAGGED, max_new_tokens=5, seed=[40, 41, 42, 43])
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    different = ensemble.generate_ids(RAGGED, max_new_tokens=5, seed=41)
    assert [g.token_ids for g in a] != [g.token_ids for g in different]


@pytest.mark.parametrize("method", ["me", "ce"])
@pytest.mark.parametrize("engine", ENGINES)
def test_finished_rows_leave_the_batch_without_changing_the_others(method, engine):
    # EOS = token 2 is likely: requests finish at different steps and are dropped mid-batch.
    models = [tiny_member("llama", 8, seed=21 + i, sharpness=3.0, eos_token_id=2) for i in range(3)]
    ens = Ensemble(models, engine=engine)
    prompts = [[1, 3, 5, 7, 1], [4], [6, 6], [3, 1, 0], [5, 5, 5, 5]]
    seeds = [100, 101, 102, 103, 104]
    gens = ens.generate_ids(prompts, method=method, max_new_tokens=20, seed=seeds)
    reasons = {g.finish_reason for g in gens}
    assert "eos" in reasons, "the test needs some requests to stop early"
    for prompt, seed, gen in zip(prompts, seeds, gens):
        alone = ens.generate_ids([prompt], method=method, max_new_tokens=20, seed=seed)[0]
        assert alone.token_ids == gen.token_ids and alone.finish_reason == gen.finish_reason
        if gen.finish_reason == "eos":
            assert gen.token_ids[-1] == 2 and 2 not in gen.token_ids[:-1]
        else:
            assert len(gen.token_ids) == 20


@pytest.mark.parametrize("attention", ["sdpa", "eager", "2d-mask"])
def test_kv_cache_holds_no_padding_holes(attention):
    # Member caches hold (current prompt width + generated tokens read) columns, for every row;
    # when the longest prompt leaves, its padding columns go too. Logits stay exact throughout.
    model = tiny_member("qwen2", V, seed=5, sharpness=4.0)
    if attention == "eager":
        model.set_attn_implementation("eager")
    prompts = [[1] * 9, [2, 3], [4]]
    batch = Batch(prompts, [0, 1, 2], max_new_tokens=8, device=torch.device("cpu"))
    runner = MemberRunner(model, torch.device("cpu"))
    if attention == "2d-mask":
        runner.mask_kind = "2d"
    with torch.inference_mode():
        runner.catch_up(batch, 0)
        for t in range(1, 6):
            batch.generated[:, t - 1] = t % V
            if t == 3:
                runner.catch_up(batch, t)
        logits = runner.catch_up(batch, 5)
        for row, prompt in enumerate(prompts):
            full = prompt + [t % V for t in range(1, 6)]
            ref = model(input_ids=torch.tensor([full])).logits[0, -1]
            torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)
        batch.generated[:, 5] = 6 % V
        assert runner.cache.get_seq_length() == 9 + 5 == runner.cache_len
        keep = [1, 2]
        keep_dev = torch.tensor(keep)
        batch.keep(keep, keep_dev)
        runner.keep(keep, keep_dev)
        assert runner.cache.get_seq_length() == 2 + 5  # 7 padding columns dropped
        logits = runner.catch_up(batch, 6)
    # and the logits still match an unpadded forward of each request
    for row, prompt in enumerate([[2, 3], [4]]):
        full = prompt + [t % V for t in range(1, 7)]
        ref = model(input_ids=torch.tensor([full])).logits[0, -1]
        torch.testing.assert_close(logits[row], ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- text, stop, eos
@pytest.fixture(scope="module")
def text_ensemble():
    tok = char_tokenizer(eos=False)  # EOS comes from the generation config in test_eos_...
    vocab = len(tok)
    models = [tiny_member(arch, vocab, seed=31 + i, sharpness=2.0) for i, arch in enumerate(("llama", "qwen2"))]
    return Ensemble(models, tokenizer=tok)


def test_generate_text_and_stop_strings(text_ensemble):
    free = text_ensemble.generate(["hello world"], max_new_tokens=20, seed=9)[0]
    assert free.finish_reason == "length" and free.text == text_ensemble.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    stop = free.text[5:7]  # a piece of what this seed generates
    first = free.text.find(stop)
    assert first >= 0
    cut = text_ensemble.generate(["hello world"], max_new_tokens=20, seed=9, stop=[stop, "zzzz"])[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:first]
    # generation stopped at the token that completed the stop string
    decode = text_ensemble.tokenizer.decode
    k = next(k for k in range(1, 21) if stop in decode(free.token_ids[:k], skip_special_tokens=True))
    assert cut.token_ids == free.token_ids[:k]


def test_eos_from_generation_config(text_ensemble):
    free = text_ensemble.generate(["abc"], max_new_tokens=10, seed=4)[0]
    eos = free.token_ids[3]
    models = text_ensemble.models
    saved = [m.generation_config.eos_token_id for m in models]
    try:
        for m in models:
            m.generation_config.eos_token_id = [eos]
        ens = Ensemble(models, tokenizer=text_ensemble.tokenizer)
        out = ens.generate(["abc"], max_new_tokens=10, seed=4)[0]
    finally:
        for m, s in zip(models, saved):
            m.generation_config.eos_token_id = s
    k = free.token_ids.index(eos)
    assert out.finish_reason == "eos" and out.token_ids == free.token_ids[: k + 1]


def test_progress_bar_and_zero_tokens(text_ensemble):
    gens = text_ensemble.generate(["ab", "c"], max_new_tokens=0, seed=0, progress=True)
    assert [(g.token_ids, g.text, g.finish_reason) for g in gens] == [([], "", "length")] * 2
    assert len(text_ensemble.generate(["ab"], max_new_tokens=3, seed=0, progress=True)[0].token_ids) == 3


# ----------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("engine", ENGINES)
def test_score_is_the_exact_mixture_log_likelihood(members, engine):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    prompts = [[1, 2, 3], [4], [0, 0, 1, 2, 3, 4, 4]]
    conts = [[4, 4], [1, 2, 3, 0], [2]]
    got = ens.score_ids(prompts, conts)
    for prompt, cont, value in zip(prompts, conts, got):
        expected = 0.0
        for j, tok in enumerate(cont):
            prefix = prompt + cont[:j]
            expected += math.log(sum(w * float(next_token_probs(m, prefix)[tok]) for w, m in zip(WEIGHTS, members)))
        assert value == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert ens.score_ids([[1]], [[]]) == [0.0]


def _mixture_argmax(models, weights, prefix) -> int:
    mix = sum(w * next_token_probs(m, prefix) for w, m in zip(weights, models))
    return int(torch.argmax(mix))


@pytest.mark.parametrize("engine", ENGINES)
def test_score_with_greedy_is_the_brute_force_argmax(members, engine):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    prompts = [[1, 2, 3], [4], [0, 0, 1, 2, 3, 4, 4], [2, 2]]
    greedy_conts = []
    for prompt in prompts:  # the mixture's own greedy continuations, 1 to 4 tokens
        cont = []
        for _ in range(1 + len(greedy_conts)):
            cont.append(_mixture_argmax(members, WEIGHTS, prompt + cont))
        greedy_conts.append(cont)
    # the same continuations with their last token replaced by another one: not greedy
    broken = [c[:-1] + [(c[-1] + 1) % V] for c in greedy_conts]
    random_conts = [[4, 4], [1, 2, 3, 0], [2], [0, 1, 0]]
    all_prompts = prompts * 3
    all_conts = greedy_conts + broken + random_conts
    got = ens.score_ids(all_prompts, all_conts, with_greedy=True)
    assert [lp for lp, _ in got] == pytest.approx(ens.score_ids(all_prompts, all_conts), rel=1e-6, abs=1e-6)
    for prompt, cont, (_, is_greedy) in zip(all_prompts, all_conts, got):
        expected = all(_mixture_argmax(members, WEIGHTS, prompt + cont[:j]) == tok for j, tok in enumerate(cont))
        assert is_greedy is expected, (prompt, cont)
    assert [g for _, g in got[:4]] == [True] * 4 and [g for _, g in got[4:8]] == [False] * 4
    assert ens.score_ids([[1]], [[]], with_greedy=True) == [(0.0, True)]
    with pytest.raises(TypeError, match="with_greedy"):
        ens.score_ids([[1]], [[2]], with_greedy=1)


def test_score_text(text_ensemble):
    tok = text_ensemble.tokenizer
    got = text_ensemble.score(["the cat"], [" sat"])
    expected = text_ensemble.score_ids([tok("the cat")["input_ids"]], [tok(" sat", add_special_tokens=False)["input_ids"]])
    assert got == pytest.approx(expected) and got[0] < 0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(method="beam"), ValueError, "method"),
        (dict(selection="all"), ValueError, "selection"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(max_new_tokens=2.5), TypeError, "max_new_tokens"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(min_p=1.5), ValueError, "min_p"),
        (dict(temperature=-0.1), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(member=3), ValueError, "member"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(seed=[1]), ValueError, "seed"),
        (dict(seed="1"), TypeError, "seed"),
        (dict(stop=[""]), ValueError, "stop"),
    ],
)
def test_bad_generate_arguments(ensemble, kwargs, error, match):
    kwargs = dict(kwargs)  # the parameter dict is shared by both engines' runs
    with pytest.raises(error, match=match):
        ensemble.generate_ids([PROMPT, [1]], max_new_tokens=kwargs.pop("max_new_tokens", 2), **kwargs)
    # the ensemble stays usable
    assert len(ensemble.generate_ids([PROMPT], max_new_tokens=2, seed=0)[0].token_ids) == 2


@pytest.mark.parametrize(
    "weights, error, match",
    [
        ([1.0, 2.0], ValueError, "3 members"),
        ([1.0, -1.0, 1.0], ValueError, "weights\\[1\\]"),
        ([1.0, float("nan"), 1.0], ValueError, "weights\\[1\\]"),
        ([0.0, 0.0, 0.0], ValueError, "all zero"),
        ("0.5", TypeError, "weights"),
    ],
)
def test_bad_weights(members, weights, error, match):
    with pytest.raises(error, match=match):
        Ensemble(members, weights=weights)


def test_bad_prompts_and_members(members, text_ensemble):
    ens = Ensemble(members)
    with pytest.raises(ValueError, match="empty"):
        ens.generate_ids([[1], []])
    with pytest.raises(ValueError, match="outside"):
        ens.generate_ids([[1, V]])
    with pytest.raises(ValueError, match="tokenizer"):
        ens.generate(["abc"])
    with pytest.raises(ValueError, match="tokenizer"):
        ens.generate_ids([[1]], stop=["x"])
    with pytest.raises(ValueError, match="empty"):
        text_ensemble.generate(["ok", ""])
    with pytest.raises(ValueError, match="vocabularies differ"):
        Ensemble([members[0], tiny_member("llama", V + 3, seed=1)])
    with pytest.raises(ValueError, match="continuations"):
        ens.score_ids([[1], [2]], [[1]])


@pytest.mark.parametrize("engine", ENGINES)
def test_interrupted_generate_leaves_the_ensemble_usable(members, engine, monkeypatch):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    expected = ens.generate_ids(RAGGED, max_new_tokens=6, seed=1)
    calls = {"n": 0}
    cls, name = (MemberRunner, "catch_up") if engine == "hf" else (StackedEngine, "_catch_up")
    original = getattr(cls, name)

    def interrupting(self, *args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(cls, name, interrupting)
    with pytest.raises(KeyboardInterrupt):
        ens.generate_ids(RAGGED, max_new_tokens=6, seed=1)
    monkeypatch.setattr(cls, name, original)
    assert [g.token_ids for g in ens.generate_ids(RAGGED, max_new_tokens=6, seed=1)] == [g.token_ids for g in expected]


# ----------------------------------------------------------------------------- other architectures
@pytest.mark.parametrize("name", list(OTHER_ARCHITECTURES))
def test_other_architectures_batch_invariance_with_finishing_rows(name):
    # Any AutoModelForCausalLM: ragged prompts, sliding-window and hybrid caches, learned
    # positions, and requests that finish early (dropped from every cache mid-batch).
    models = other_architecture_members(name)
    ens = Ensemble(models)  # "auto": stacked for Mistral and Qwen3, hf for the others
    prompts = [[1, 3, 5, 7, 9, 11, 4], [3], [4, 4, 0], [6, 7]]
    for method in ("me", "ce"):
        batch = ens.generate_ids(prompts, method=method, max_new_tokens=12, seed=[11, 12, 13, 14])
        for i, prompt in enumerate(prompts):
            alone = ens.generate_ids([prompt], method=method, max_new_tokens=12, seed=11 + i)[0]
            assert alone.token_ids == batch[i].token_ids and alone.finish_reason == batch[i].finish_reason
    reasons = {g.finish_reason for method in ("me", "ce") for g in ens.generate_ids(prompts, method=method, max_new_tokens=12, seed=[11, 12, 13, 14])}
    assert reasons == {"eos", "length"}, f"the test needs both early and full-length requests, got {reasons}"


# ----------------------------------------------------------------------------- context limits
@pytest.mark.parametrize("engine", ENGINES)
def test_context_limit_refuses_or_truncates_left(engine):
    """prompt + max_new_tokens beyond a member's context: a ValueError naming the member and the
    numbers, or with truncate="left" the prompt's last tokens (the same tokens as that prompt)."""
    short = [tiny_member("llama", V, seed=31, sharpness=4.0), tiny_member("llama", V, seed=32, sharpness=4.0)]
    short[1].config.max_position_embeddings = 24  # member 1 sets the limit
    ens = Ensemble(short, engine=engine)
    assert ens.max_seq_len == 24
    long_prompt = [(i * 7) % V for i in range(30)]
    with pytest.raises(ValueError, match=r"request 0 needs 36 positions.*member 1's context length.*is 24"):
        ens.generate_ids([long_prompt], max_new_tokens=6, seed=0)
    got = ens.generate_ids([long_prompt, [1, 2]], max_new_tokens=6, seed=[0, 1], truncate="left")
    want = ens.generate_ids([long_prompt[-18:], [1, 2]], max_new_tokens=6, seed=[0, 1])
    assert [g.token_ids for g in got] == [g.token_ids for g in want]
    with pytest.raises(ValueError, match="truncate must be None or 'left'"):
        ens.generate_ids([[1]], max_new_tokens=2, truncate="right")
    with pytest.raises(ValueError, match="max_new_tokens = 24 leaves no room for a prompt"):
        ens.generate_ids([[1]], max_new_tokens=24, truncate="left")


# ----------------------------------------------------------------------------- memory, batches
@pytest.mark.parametrize("engine", ENGINES)
def test_max_batch_size_runs_consecutive_batches_with_the_same_tokens(members, engine):
    ens = Ensemble(members, weights=WEIGHTS, engine=engine)
    for opts in (dict(method="me"), dict(method="ce", top_p=0.8), dict(method="ce", draft_tokens=2)):
        whole = ens.generate_ids(RAGGED, max_new_tokens=5, seed=[5, 6, 7, 8], **opts)
        chunked = ens.generate_ids(RAGGED, max_new_tokens=5, seed=[5, 6, 7, 8], max_batch_size=3, **opts)
        assert [(g.token_ids, g.finish_reason) for g in chunked] == [(g.token_ids, g.finish_reason) for g in whole]
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        ens.generate_ids(RAGGED, max_new_tokens=2, max_batch_size=0)
    with pytest.raises(TypeError, match="max_batch_size must be None or an int"):
        ens.generate_ids(RAGGED, max_new_tokens=2, max_batch_size=2.0)


def test_memory_estimate_is_the_stacked_cache_and_refuses_what_cannot_fit(members):
    ens = Ensemble(members, weights=WEIGHTS, engine="stacked")  # two groups: Llama and Qwen2 members
    prompts = [[1, 2, 3], [4, 0]]
    ens.generate_ids(prompts, max_new_tokens=6, seed=0)
    est = ens.estimate_memory(2, 3, 6)
    assert est["kv_cache"] == ens.memory_bytes()["kv_cache"]  # exact on the CPU (no buckets)
    assert est["total"] == est["kv_cache"] + est["logits"] + est["activations"]
    assert ens.estimate_memory(4, 3, 6)["total"] > est["total"]
    assert ens.estimate_memory(2, 3, 6, method="ce", draft_tokens=3)["logits"] > est["logits"]
    # the refusal a CUDA device would give, with a made-up amount of free memory
    free = int(ens.estimate_memory(1, 3, 6)["total"] * 1.5)
    with pytest.raises(ValueError, match=r"2 requests of up to 3 \+ 6 tokens need about .* max_batch_size=1 fits"):
        ens._refuse_if_too_big(prompts, 6, "me", 0, None, free)
    ens._refuse_if_too_big(prompts, 6, "me", 0, 1, free)  # one at a time fits
    with pytest.raises(ValueError, match="not even one request fits"):
        ens._refuse_if_too_big(prompts, 6, "me", 0, None, 10)
