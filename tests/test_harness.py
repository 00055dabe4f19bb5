"""me_runtime.harness: the Ensemble as an lm-evaluation-harness model, on the demo members and the
local tasks under tests/data/lm_eval_tasks (offline). Loglikelihoods equal Ensemble.score_ids
request by request, is_greedy equals a brute-force argmax of the mixture, generate_until equals
the runtime's output, loglikelihood_rolling equals Ensemble.score_rolling, bad model_args are
clear ValueErrors. (The import without lm_eval is tested in test_import_graph.py.)"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from me_runtime import Ensemble, demo_members  # noqa: E402
from me_runtime.harness import AUTO_BATCH_TOKENS, EnsembleLM, main  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
MEMBERS = "|".join(demo_members())


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def ensemble():
    # float32: comparisons across batch compositions agree to ~1e-6 (bf16 would round differently)
    return Ensemble.from_pretrained(demo_members(), weights=[0.6, 0.4], dtype=torch.float32)


@pytest.fixture(scope="module")
def lm(ensemble):
    return EnsembleLM(ensemble, batch_size=3)


@pytest.fixture(scope="module")
def task_manager():
    return TaskManager(include_path=str(TASKS_DIR))


def _rows(name):
    return [json.loads(line) for line in (TASKS_DIR / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def _encode_pair(tok, context, continuation):
    """lm-eval's rule, written out: trailing spaces move to the continuation, the joined text is
    encoded and split at the context's length; an empty context is the BOS token."""
    if not context:
        return [tok.bos_token_id], tok(continuation, add_special_tokens=False)["input_ids"]
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation)["input_ids"]
    ctx = tok(context)["input_ids"]
    return ctx, whole[len(ctx):]


def _mixture_argmax_all(ensemble, ids):
    """Brute force: each member's plain forward over the whole sequence, the mixture of softmaxes,
    its argmax at every position (the token predicted for the next one)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        mix = sum(w * torch.softmax(m(x).logits[0].float(), -1) for w, m in zip(ensemble.weights, ensemble.models))
    return mix.argmax(-1).tolist()


def _ll(args):
    return [Instance("loglikelihood", {}, a, i) for i, a in enumerate(args)]


def test_registered_as_me_ensemble():
    assert get_model("me-ensemble") is EnsembleLM


# ----------------------------------------------------------------------------- loglikelihood
def test_loglikelihood_equals_score_request_by_request(ensemble, lm):
    tok = ensemble.tokenizer
    text = _rows("me_demo_gen")[3]["context"]
    greedy = ensemble.generate(["The Rabbit said"], method="ce", temperature=0.0, max_new_tokens=6)[0].text
    args = [
        ("The cat", " sat on the mat."),
        ("def f(x):", "\n    return x"),
        ("Alice said ", "hello"),  # trailing space moves to the continuation
        ("", "Alice was beginning"),  # empty context: BOS
        (text[:-40], text[-40:]),
        ("The Rabbit said", greedy),  # the mixture's own greedy continuation
        ("The Rabbit said", greedy + " zebra"),
        ("x", ""),  # empty continuation
    ]
    got = lm.loglikelihood(_ll(args), disable_tqdm=True)
    assert all(isinstance(lp, float) and isinstance(g, bool) for lp, g in got)
    for (context, continuation), (lp, is_greedy) in zip(args, got):
        ctx, cont = _encode_pair(tok, context, continuation)
        assert lp == pytest.approx(ensemble.score_ids([ctx], [cont])[0], rel=1e-5, abs=1e-4)
        argmax = _mixture_argmax_all(ensemble, ctx + cont)
        expected = all(argmax[len(ctx) - 1 + j] == t for j, t in enumerate(cont))
        assert is_greedy is expected, (context, continuation)
    assert got[5][1] is True and got[6][1] is False
    assert got[7] == (0.0, True)
    # where the boundary tokenizes cleanly, the same number as Ensemble.score on the strings
    assert got[0][0] == pytest.approx(ensemble.score(["The cat"], [" sat on the mat."])[0], rel=1e-5)


def test_is_greedy_on_both_engines_equals_the_brute_force_argmax(ensemble):
    hf = Ensemble(ensemble.models, tokenizer=ensemble.tokenizer, weights=ensemble.weights, engine="hf")
    assert ensemble.engine == "stacked"
    rows = _rows("me_demo_mc")[:6]
    args = [(r["context"], c) for r in rows for c in r["choices"]]
    for gen in ensemble.generate([r["context"] for r in rows], method="ce", temperature=0.0, max_new_tokens=4):
        args.append((rows[len(args) % len(rows)]["context"], gen.text))
    results = {e.engine: EnsembleLM(e, batch_size=5).loglikelihood(_ll(args), disable_tqdm=True)
               for e in (ensemble, hf)}
    assert [lp for lp, _ in results["stacked"]] == pytest.approx([lp for lp, _ in results["hf"]], rel=1e-5, abs=1e-4)
    tok = ensemble.tokenizer
    expected = []
    for context, continuation in args:
        ctx, cont = _encode_pair(tok, context, continuation)
        argmax = _mixture_argmax_all(ensemble, ctx + cont)
        expected.append(all(argmax[len(ctx) - 1 + j] == t for j, t in enumerate(cont)))
    assert [g for _, g in results["stacked"]] == expected == [g for _, g in results["hf"]]
    assert any(expected) and not all(expected)


def test_encode_pair_and_truncation(ensemble):
    tok = ensemble.tokenizer
    assert EnsembleLM(ensemble).max_gen_toks == 256 and EnsembleLM(ensemble, max_length=40).max_gen_toks == 20
    lm = EnsembleLM(ensemble, max_length=40, max_gen_toks=8)
    assert lm._encode_pair("Alice said  ", "hi") == _encode_pair(tok, "Alice said  ", "hi")
    long_context = _rows("me_demo_mc")[12]["context"]
    (lp, _), = lm.loglikelihood(_ll([(long_context, " the end")]), disable_tqdm=True)
    ctx, cont = _encode_pair(tok, long_context, " the end")
    assert len(ctx) + len(cont) > 40
    # the last 40 tokens: the whole continuation and the context's tail, as lm-eval's HF model
    assert lp == pytest.approx(ensemble.score_ids([ctx[-(40 - len(cont)):]], [cont])[0], rel=1e-5, abs=1e-4)
    with pytest.raises(ValueError, match="max_length"):
        lm.loglikelihood(_ll([("a", " word" * 60)]), disable_tqdm=True)


def test_requests_are_sorted_longest_first_and_batched(ensemble, monkeypatch):
    lm = EnsembleLM(ensemble, batch_size=2)
    calls = []
    real = Ensemble.score_ids

    def spy(self, prompts, conts, **kw):
        calls.append([len(p) + len(c) for p, c in zip(prompts, conts)])
        return real(self, prompts, conts, **kw)

    monkeypatch.setattr(Ensemble, "score_ids", spy)
    args = [("a", " b"), ("The cat sat on the mat and", " looked"), ("x", " y z w v"), ("The dog", " ran")]
    got = lm.loglikelihood(_ll(args), disable_tqdm=True)
    assert [len(c) for c in calls] == [2, 2]
    flat = [n for c in calls for n in c]
    assert flat == sorted(flat, reverse=True)
    monkeypatch.setattr(Ensemble, "score_ids", real)
    alone = [lm.loglikelihood(_ll([a]), disable_tqdm=True)[0][0] for a in args]
    assert [lp for lp, _ in got] == pytest.approx(alone, rel=1e-5, abs=1e-4)  # original order

    # "auto": rows x the batch's longest sequence within AUTO_BATCH_TOKENS, at most max_batch_size
    calls.clear()
    monkeypatch.setattr(Ensemble, "score_ids", spy)
    auto = EnsembleLM(ensemble, batch_size="auto", max_batch_size=3)
    auto.loglikelihood(_ll(args * 2), disable_tqdm=True)
    assert [len(c) for c in calls] == [3, 3, 2]
    assert all(len(c) * c[0] <= AUTO_BATCH_TOKENS for c in calls)


# ----------------------------------------------------------------------------- rolling
def test_loglikelihood_rolling_equals_score_rolling(ensemble, lm, monkeypatch):
    texts = [r["text"] for r in _rows("me_demo_ppl")]
    assert max(len(ensemble.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]) for t in texts) > 512
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                   disable_tqdm=True)
    assert got == pytest.approx(ensemble.score_rolling(texts), rel=1e-5)
    # batch_size counts windows (forward rows): the two 2-window texts, then the four others
    calls = []
    real = Ensemble.score_rolling_ids

    def spy(self, seqs, **kw):
        calls.append(seqs)
        return real(self, seqs, **kw)

    monkeypatch.setattr(Ensemble, "score_rolling_ids", spy)
    requests = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    again = EnsembleLM(ensemble, batch_size=4).loglikelihood_rolling(requests, disable_tqdm=True)
    assert [len(c) for c in calls] == [2, 4] and min(len(x) for x in calls[0]) > 512
    assert again == pytest.approx(got, rel=1e-5)
    monkeypatch.setattr(Ensemble, "score_rolling_ids", real)
    short = EnsembleLM(ensemble, max_length=64, max_gen_toks=8)
    got = short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[0],), 0)], disable_tqdm=True)
    assert got == pytest.approx(ensemble.score_rolling(texts[:1], max_length=64), rel=1e-5)


# ----------------------------------------------------------------------------- generation
def _gen(context, **gen_kwargs):
    return Instance("generate_until", {}, (context, gen_kwargs), 0)


def test_generate_until_greedy_is_the_mixture_argmax_for_me_and_ce(ensemble):
    prompts = ["def __init__(self", "Alice was beginning to", "import os\n"]
    expected = [g.text for g in ensemble.generate(prompts, method="ce", temperature=0.0, max_new_tokens=12)]
    for method in ("me", "ce"):
        lm = EnsembleLM(ensemble, method=method, batch_size=2)
        for kwargs in ({"do_sample": False}, {"temperature": 0.0}, {"do_sample": True, "temperature": 0}):
            got = lm.generate_until([_gen(p, max_gen_toks=12, until=[], **kwargs) for p in prompts], disable_tqdm=True)
            assert got == expected


def test_generate_until_stops_and_strips_the_stop_string(ensemble, lm):
    prompt = "Alice was beginning to"
    free = ensemble.generate([prompt], method="ce", temperature=0.0, max_new_tokens=20)[0].text
    stop = free.strip()[4:7]  # a string the free generation produces
    assert stop and stop in free
    got, = lm.generate_until([_gen(prompt, until=[stop], max_gen_toks=20, do_sample=False)], disable_tqdm=True)
    assert got == free[: free.index(stop)] and stop not in got
    got, = lm.generate_until([_gen(prompt, until=stop, max_new_tokens=3, do_sample=False)], disable_tqdm=True)
    assert len(ensemble.tokenizer(got, add_special_tokens=False)["input_ids"]) <= 3


def test_generate_until_sampling_is_the_runtime_and_independent_of_batching(ensemble):
    prompts = ["def f(", "The Queen", "class A:", "Alice"]
    kwargs = dict(until=["\n"], max_gen_toks=10, do_sample=True, temperature=0.9, top_k=50)
    requests = [_gen(p, **kwargs) for p in prompts]
    outs = {}
    for method in ("me", "ce"):
        for batch_size in (1, 3):
            lm = EnsembleLM(ensemble, method=method, batch_size=batch_size, seed=7, top_p=0.95)
            outs[method, batch_size] = lm.generate_until(requests, disable_tqdm=True)
        assert outs[method, 1] == outs[method, 3]
        expected = [g.text for g in ensemble.generate(prompts, method=method, temperature=0.9, top_k=50, top_p=0.95,
                                                       max_new_tokens=10, stop=["\n"], seed=7)]
        assert outs[method, 1] == expected
    with pytest.raises(ValueError, match="repetition_penalty"):
        EnsembleLM(ensemble).generate_until([_gen("a", repetition_penalty=1.1)], disable_tqdm=True)


def test_generate_until_with_drafting_is_ce(ensemble):
    prompts = ["def __init__(self", "Alice was"]
    plain = EnsembleLM(ensemble, method="ce").generate_until([_gen(p, max_gen_toks=8, until=[]) for p in prompts],
                                                             disable_tqdm=True)
    drafted = EnsembleLM(ensemble, method="ce", draft_tokens=3)
    assert drafted.generate_until([_gen(p, max_gen_toks=8, until=[]) for p in prompts], disable_tqdm=True) == plain


# ----------------------------------------------------------------------------- chat templates
def test_chat_template(ensemble):
    lm = EnsembleLM(ensemble)
    chat = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="no chat template"):
        lm.apply_chat_template(chat)
    assert lm.chat_template(False) is None
    assert lm.tokenizer_name == ensemble.tokenizer.name_or_path.replace("/", "__")
    template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<assistant>{% endif %}")
    tok = ensemble.tokenizer
    saved = tok.chat_template
    try:
        tok.chat_template = template
        assert lm.chat_template(True) == template
        assert lm.apply_chat_template(chat) == "<user>hi\n<assistant>"
    finally:
        tok.chat_template = saved


# ----------------------------------------------------------------------------- model_args
@pytest.mark.parametrize(
    "args, match",
    [
        ("members=A|B,temperatur=0.5", "unknown model_args.*temperatur"),
        ("members=A|B,weights=0.5|0.3|0.2", "weights has 3 entries but members has 2"),
        ("members=A|B,weights=half|half", "weights must be numbers"),
        ("members=A|B,method=beam", "method must be one of"),
        ("members=A|B,method=single", "method must be one of"),
        ("members=A|B,selection=all", "selection must be one of"),
        ("members=A|B,engine=vllm", "engine must be one of"),
        ("weights=0.5|0.5", "needs members"),
    ],
)
def test_bad_model_args_are_clear_value_errors_before_loading(args, match, monkeypatch):
    def no_load(*a, **k):
        raise AssertionError("loaded members before checking model_args")

    monkeypatch.setattr(Ensemble, "from_pretrained", no_load)
    with pytest.raises(ValueError, match=match):
        EnsembleLM.create_from_arg_string(args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(method="single"), "method"),
        (dict(batch_size="many"), "batch_size"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_length=10_000), "max_seq_len"),
        (dict(max_gen_toks=512), "max_gen_toks"),
        (dict(draft_tokens=2), "draft_tokens"),
        (dict(top_p=0.0), "top_p"),
    ],
)
def test_bad_arguments(ensemble, kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnsembleLM(ensemble, **kwargs)


def test_create_from_arg_string():
    lm = EnsembleLM.create_from_arg_string(
        f"members={MEMBERS},weights=1|0,method=ce,engine=hf,dtype=float32,draft_tokens=2,seed=3",
        {"batch_size": "4", "device": "cpu", "max_batch_size": None},
    )
    assert lm.ensemble.weights == [1.0, 0.0] and lm.ensemble.engine == "hf" and lm.method == "ce"
    assert lm.batch_size == 4 and lm.seed == 3 and lm.draft["draft_tokens"] == 2
    assert next(lm.ensemble.models[0].parameters()).dtype == torch.float32
    # model_args win over lm-eval's own --batch_size
    lm = EnsembleLM.create_from_arg_string(f"members={MEMBERS},batch_size=auto", {"batch_size": 1})
    assert lm.batch_size == "auto"


# ----------------------------------------------------------------------------- whole evaluations
def test_simple_evaluate_on_the_local_tasks(ensemble, lm, task_manager):
    out = simple_evaluate(model=lm, tasks=["me_demo_mc", "me_demo_gen", "me_demo_ppl"], task_manager=task_manager,
                          log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    tok = ensemble.tokenizer
    # multiple choice: every (context, choice) scored as Ensemble.score_ids on lm-eval's encoding
    samples = out["samples"]["me_demo_mc"]
    assert len(samples) == 40
    pairs = [_encode_pair(tok, *args) for s in samples for args in s["arguments"]]
    # compared in batches of 8 (the harness ran batches of 3, longest first)
    expected = iter([v for i in range(0, len(pairs), 8)
                     for v in ensemble.score_ids([c for c, _ in pairs[i:i + 8]], [x for _, x in pairs[i:i + 8]])])
    correct = 0
    for s in samples:
        scores = [resp[0][0] for resp in s["resps"]]
        assert scores == pytest.approx([next(expected) for _ in scores], rel=1e-5, abs=1e-4)
        correct += max(range(len(scores)), key=scores.__getitem__) == s["doc"]["answer"]
    assert out["results"]["me_demo_mc"]["acc,none"] == pytest.approx(correct / 40)
    # generation: the runtime's greedy (CE) output, cut at the first line break
    samples = out["samples"]["me_demo_gen"]
    contexts = [s["arguments"][0][0] for s in samples]
    expected = ensemble.generate(contexts, method="ce", temperature=0.0, max_new_tokens=16, stop=["\n"])
    assert [s["resps"][0][0] for s in samples] == [g.text.split("\n")[0] for g in expected]
    # rolling: Ensemble.score_rolling of each document
    samples = out["samples"]["me_demo_ppl"]
    texts = [s["arguments"][0][0] for s in samples]
    assert [s["resps"][0][0] for s in samples] == pytest.approx(ensemble.score_rolling(texts), rel=1e-5)
    assert 1.0 < out["results"]["me_demo_ppl"]["bits_per_byte,none"] < 4.0


def test_me_eval_cli(tmp_path, monkeypatch):
    argv = ["me-eval", "--model", "me-ensemble", "--model_args", f"members={MEMBERS},weights=0.5|0.5,method=me",
            "--tasks", "me_demo_ppl", "--include_path", str(TASKS_DIR), "--limit", "2", "--output_path",
            str(tmp_path), "--batch_size", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    written = list(tmp_path.rglob("results_*.json"))
    assert len(written) == 1
    results = json.loads(written[0].read_text())
    assert results["results"]["me_demo_ppl"]["bits_per_byte,none"] > 0
    assert results["config"]["model"] == "me-ensemble"
