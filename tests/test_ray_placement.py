"""placement="ray": members in Ray actors give the tokens and scores of placement="local", one remote
call per running member per step, and a lost actor gives a clear, bounded error after which the
ensemble works again. One local Ray cluster (2 CPUs) for the whole module."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from me_runtime import Ensemble, demo_members  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# ragged prompts (1 to 13 tokens), one seed per request, a stop string that ends some requests early
PROMPTS = ["def parse(line):\n    return", "The ship", "import os\nimport sys\n\nclass Reader:", "I"]
SEEDS = [5, 17, 2, 40]
STOP = ["\n\n", "."]
NEW_TOKENS = 24
OPTIONS = {
    "me": dict(method="me"),
    "me-shared": dict(method="me", selection="shared"),
    "ce": dict(method="ce"),
    "single": dict(method="single", member=1),
}


# The driver samples with the compiled CPU ops, as the actors do (their runtime_env below): the
# local run and the actors' must use the same kernels for the same tokens.
pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"TRITON_INTERPRET": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local():
    return Ensemble.from_pretrained(demo_members(), weights=[0.6, 0.4])


@pytest.fixture(scope="module")
def remote(cluster):
    ens = Ensemble.from_pretrained(demo_members(), weights=[0.6, 0.4], placement="ray",
                                   ray_options={"timeout_s": 20, "load_timeout_s": 120, "torch_threads": 1})
    yield ens
    ens.close()


def _same(a, b):
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.members for g in a] == [g.members for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.text for g in a] == [g.text for g in b]


@pytest.fixture
def run_ahead(remote, request):
    """Sets remote.run_ahead for one test (0: one call per step, the protocol without run-ahead)."""
    saved, remote.run_ahead = remote.run_ahead, request.param
    yield request.param
    remote.run_ahead = saved


@pytest.mark.parametrize("run_ahead", [0, 16], indirect=True)
@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_same_tokens_as_local(local, remote, name, run_ahead):
    kwargs = dict(OPTIONS[name], max_new_tokens=NEW_TOKENS, seed=SEEDS, stop=STOP)
    expected = local.generate(PROMPTS, **kwargs)
    _same(remote.generate(PROMPTS, **kwargs), expected)
    # the case covers requests that finish early (rows retire while others go on) and full ones
    lengths = {len(g.token_ids) for g in expected}
    assert len(lengths) > 1, lengths
    # one request alone: where running ahead happens most (ME: every time a member is drawn again)
    kwargs["seed"] = SEEDS[0]
    _same(remote.generate(PROMPTS[:1], **kwargs), local.generate(PROMPTS[:1], **kwargs))


def test_same_tokens_in_batches_and_with_top_p(local, remote):
    kwargs = dict(method="me", max_new_tokens=12, seed=SEEDS, top_p=0.9, temperature=0.8, max_batch_size=3)
    _same(remote.generate(PROMPTS, **kwargs), local.generate(PROMPTS, **kwargs))


@pytest.mark.parametrize("run_ahead", [0], indirect=True)
def test_one_call_per_running_member_per_step(remote, run_ahead):
    gens = remote.generate(PROMPTS, method="me", max_new_tokens=NEW_TOKENS, seed=SEEDS)
    stats = remote.last_call_stats
    assert len(stats["calls_per_step"]) == max(len(g.token_ids) for g in gens)
    for t, (calls, called) in enumerate(zip(stats["calls_per_step"], stats["members_per_step"])):
        chosen = sorted({g.members[t] for g in gens if len(g.members) > t})
        assert called == chosen, t
        assert calls == len(chosen), t
    assert 2 in stats["calls_per_step"] and 1 in stats["calls_per_step"]  # both cases occurred

    remote.generate(PROMPTS, method="ce", max_new_tokens=6, seed=SEEDS)
    assert remote.last_call_stats["calls_per_step"] == [2] * 6
    gens = remote.generate(PROMPTS, method="me", selection="shared", max_new_tokens=6, seed=SEEDS)
    assert remote.last_call_stats["calls_per_step"] == [1] * 6
    assert [[m] for m in gens[0].members] == remote.last_call_stats["members_per_step"]
    remote.generate(PROMPTS, method="single", member=0, max_new_tokens=6, seed=SEEDS)
    assert remote.last_call_stats["members_per_step"] == [[0]] * 6


@pytest.mark.parametrize("run_ahead", [16], indirect=True)
def test_running_ahead_saves_calls_and_nothing_else(local, remote, run_ahead):
    """With run_ahead, a step is either called (one call per running member) or was run by the
    previous step's call, whose actor served every row alone and which every row drew again."""
    for kwargs in (dict(method="me", seed=SEEDS), dict(method="me", seed=SEEDS[:1]),
                   dict(method="me", selection="shared", seed=SEEDS), dict(method="single", member=0, seed=SEEDS)):
        prompts = PROMPTS[: len(kwargs["seed"])]
        gens = remote.generate(prompts, max_new_tokens=NEW_TOKENS, **kwargs)
        _same(gens, local.generate(prompts, max_new_tokens=NEW_TOKENS, **kwargs))
        stats = remote.last_call_stats
        assert len(stats["calls_per_step"]) == NEW_TOKENS
        for t, (calls, called) in enumerate(zip(stats["calls_per_step"], stats["members_per_step"])):
            chosen = sorted({g.members[t] for g in gens})
            assert calls == len(called)
            if calls:
                assert called == chosen, t
            else:  # ran ahead: one member serves every row at t - 1 and at t
                assert len(chosen) == 1 and {g.members[t - 1] for g in gens} == set(chosen), t
        assert stats["calls_per_step"][0] > 0
        if kwargs["method"] == "single" or len(prompts) == 1:
            assert sum(stats["calls_per_step"]) < NEW_TOKENS  # the calls saved
    # single, no EOS in these 24 tokens: one call per run_ahead + 1 steps
    assert remote.last_call_stats["calls_per_step"] == [int(t % (run_ahead + 1) == 0) for t in range(NEW_TOKENS)]


def test_scores_equal_local(local, remote):
    prompts = ["def add(a, b):", "It was a dark", "x"]
    conts = ["\n    return a + b\n", " and stormy night.", ""]
    assert remote.score(prompts, conts) == pytest.approx(local.score(prompts, conts), rel=1e-5, abs=1e-5)
    assert remote.last_call_stats == {"method": "score", "calls": 2}
    ids_p = [local.tokenizer(p)["input_ids"] for p in prompts]
    ids_c = [local.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
    expected = local.score_ids(ids_p, ids_c, with_greedy=True)
    got = remote.score_ids(ids_p, ids_c, with_greedy=True)
    assert [g for _, g in got] == [g for _, g in expected]
    assert [v for v, _ in got] == pytest.approx([v for v, _ in expected], rel=1e-5, abs=1e-5)
    # a greedy continuation is recognised as such
    greedy = local.generate_ids([ids_p[0]], method="ce", temperature=0.0, max_new_tokens=4)[0].token_ids
    assert remote.score_ids([ids_p[0]], [greedy], with_greedy=True)[0][1] is True
    text = "class Stack:\n    def push(self, item):\n        self.items.append(item)\n" * 3
    assert remote.score_rolling([text], max_length=32) == pytest.approx(local.score_rolling([text], max_length=32),
                                                                          rel=1e-5)


def test_named_actors_hold_the_members(remote):
    for m, name in enumerate(remote.actor_names):
        assert name.startswith(f"me-member-{m}-")
        assert ray.get(ray.get_actor(name).ping.remote()) > 0  # a user can look them up by name


def test_hf_engine_native_bf16_logits_on_the_wire(cluster):
    """The hf engine's logits are the members' bf16: CE mixes exactly what the local run mixes."""
    local = Ensemble.from_pretrained(demo_members(), engine="hf")
    # num_cpus=0: the module's other two actors hold the cluster's 2 CPUs
    with Ensemble.from_pretrained(demo_members(), engine="hf", placement="ray",
                                  ray_options={"torch_threads": 1, "num_cpus": 0, "load_timeout_s": 120}) as remote:
        assert remote.engine == "hf"
        for method in ("ce", "me"):
            kwargs = dict(method=method, max_new_tokens=10, seed=SEEDS, stop=STOP)
            _same(remote.generate(PROMPTS, **kwargs), local.generate(PROMPTS, **kwargs))
        names = remote.actor_names
    for name in names:  # close() killed them: their names no longer resolve
        deadline = time.monotonic() + 10
        while _named_actor_exists(name) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _named_actor_exists(name), name
    with pytest.raises(RuntimeError, match="was closed"):
        remote.generate(PROMPTS, max_new_tokens=2)


def _named_actor_exists(name: str) -> bool:
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True


def test_lost_actor_gives_a_clear_error_then_works_again(local, remote):
    kwargs = dict(method="ce", max_new_tokens=NEW_TOKENS, seed=SEEDS, stop=STOP)
    pid = ray.get(remote.actors()[1].ping.remote())
    remote._test_step_hook = lambda t: os.kill(pid, signal.SIGKILL) if t == 3 else None
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"member 1 \(.*prose\) is lost: its Ray actor 'me-member-1-"):
            remote.generate(PROMPTS, **kwargs)
    finally:
        remote._test_step_hook = None
    assert time.monotonic() - start < remote.timeout_s
    old = remote.actor_names[1]
    _same(remote.generate(PROMPTS, **kwargs), local.generate(PROMPTS, **kwargs))  # a fresh actor
    assert remote.actor_names[1] != old


def test_silent_actor_times_out_then_works_again(local, remote):
    """An actor that stops answering (a hung process: SIGSTOP) costs timeout_s, not a hang."""
    kwargs = dict(method="me", max_new_tokens=NEW_TOKENS, seed=SEEDS)
    pids = [ray.get(a.ping.remote()) for a in remote.actors()]
    remote._test_step_hook = lambda t: [os.kill(p, signal.SIGSTOP) for p in pids] if t == 2 else None
    timeout, remote.timeout_s = remote.timeout_s, 3.0
    start = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match=r"member \d \(.*\) did not answer step 3 of generate within "
                                               r"timeout_s = 3 s"):
            remote.generate(PROMPTS, **kwargs)
        assert time.monotonic() - start < 3.0 + 5.0
    finally:
        remote._test_step_hook = None
        remote.timeout_s = timeout
        for p in pids:  # the one not blamed is still stopped: let it go on
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
    _same(remote.generate(PROMPTS, **kwargs), local.generate(PROMPTS, **kwargs))


def test_bad_arguments_fail_before_any_actor_starts(remote):
    with pytest.raises(ValueError, match="placement must be one of"):
        Ensemble.from_pretrained(demo_members(), placement="slurm")
    with pytest.raises(ValueError, match="unknown ray_options"):
        Ensemble.from_pretrained(demo_members(), placement="ray", ray_options={"gpus": 1})
    with pytest.raises(ValueError, match="ce_wire_dtype"):
        Ensemble.from_pretrained(demo_members(), placement="ray", ray_options={"ce_wire_dtype": "int8"})
    for options, message in (({"timeout_s": 0}, "timeout_s"), ({"load_timeout_s": float("inf")}, "load_timeout_s"),
                             ({"run_ahead": -1}, "run_ahead"), ({"torch_threads": 0}, "torch_threads"),
                             ({"per_member": [{}]}, "per_member"), ({"per_member": [{}, {"gpus": 1}]}, "per_member"),
                             ({"num_gpus": -1}, "num_gpus")):
        with pytest.raises(ValueError, match=message):
            Ensemble.from_pretrained(demo_members(), placement="ray", ray_options=options)
    with pytest.raises(ValueError, match="only for placement='ray'"):
        Ensemble.from_pretrained(demo_members(), ray_options={"num_gpus": 1})
    with pytest.raises(ValueError, match="draft_tokens > 0 .* placement='ray'"):
        remote.generate(PROMPTS, method="ce", draft_tokens=2)
    with pytest.raises(ValueError, match="method must be one of"):
        remote.generate(PROMPTS, method="moe")
    assert remote.generate(PROMPTS[:1], max_new_tokens=2, seed=0)[0].token_ids  # still usable


def test_float16_log_probs_round_as_documented():
    """ce_wire_dtype="float16": each log-probability is off by at most |log p| * 2**-11 (the bound
    the module docstring states), and the driver's mixture of them is computed in fp32."""
    from me_runtime.ray_placement import _from_wire, _to_wire

    logits = torch.randn(4, 4096, generator=torch.Generator().manual_seed(0)) * 6
    logp = torch.log_softmax(logits, dim=-1)
    back = _from_wire(_to_wire(logp.to(torch.float16))).float()
    assert back.dtype == torch.float32
    assert ((back - logp).abs() <= logp.abs() * 2.0**-11 + 1e-12).all()
    bf16 = _from_wire(_to_wire(logits.to(torch.bfloat16)))
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, logits.to(torch.bfloat16))


def test_lm_eval_adapter_on_ray_members(local, remote):
    """lm-eval's EnsembleLM over placement="ray" answers as over the local Ensemble."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from me_runtime.harness import EnsembleLM

    lms = [EnsembleLM(ens, batch_size=2) for ens in (local, remote)]
    pairs = [("The ship", " sailed"), ("def parse(line):", "\n    return line"), ("I", " am")]
    ll = [lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
          for lm in lms]
    for (a, ga), (b, gb) in zip(*ll):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5) and ga == gb
    gen = [lm.generate_until([Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 8}), i)
                              for i, c in enumerate(["The ship", "import os"])], disable_tqdm=True) for lm in lms]
    assert gen[0] == gen[1]


def test_cli_runs_with_ray_placement(cluster, capsys):
    from me_runtime.cli import main

    # num_cpus 0: the module's RayEnsemble holds the cluster's two CPUs
    options = '{"num_cpus": 0, "timeout_s": 30, "load_timeout_s": 120, "torch_threads": 1}'
    assert main(["--placement", "ray", "--ray-options", options, "--max-new-tokens", "6", "--seed", "2",
                 "--no-trace"]) == 0
    out = capsys.readouterr().out
    assert "--- me (6 tokens" in out and "Ray actors me-member-0-" in out


def test_an_actor_no_node_can_host_is_refused_at_once(cluster):
    """Asking for GPUs the (CPU-only) cluster does not have: a ValueError naming the member before
    any actor starts, not a wait for load_timeout_s."""
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"member 0 .*no node of the Ray cluster can host its actor.*GPU"):
        Ensemble.from_pretrained(demo_members(), placement="ray", ray_options={"num_gpus": 1, "num_cpus": 0})
    assert time.perf_counter() - start < 30
