"""Members beyond one process: each member in a named Ray actor, the driver runs the step loop.

    ens = Ensemble.from_pretrained([path_a, path_b], placement="ray", ray_options={"num_gpus": 1})
    outs = ens.generate(prompts, method="me", seed=0)     # the same tokens as placement="local"
    ens.close()                                          # or `with ...:`; kills the actors

This is the only module of the package that imports ray; `Ensemble.from_pretrained` imports it
only when placement="ray" is asked for.

Who does what:

* Each member lives in a named actor ("me-member-<i>-<8 hex>", `RayEnsemble.actor_names`) that
  loads the member itself (`from_pretrained` on its node: the driver never holds weights, only the
  tokenizer), holds its KV cache and runs a one-member engine ("stacked" or "hf", as locally) over
  its own copy of the batch (`decode.Batch`), and the package's sampling kernels.
* The driver holds every request's token history, runs the stop checks (EOS, stop strings,
  max_new_tokens: `decode.record_tokens`, exactly as locally) and decides which actors run a step.
  A step launches every running actor's call before it waits for any (one `ray.get` of all the
  replies, under one deadline), so the members of a step run in parallel.

What crosses the wire per step (B active requests, V the vocabulary; `last_call_stats` counts the
calls):

* ME ("independent"): one call to each member that some row drew for the step. It carries the
  tokens generated since that actor's previous call for every active row (B x k ids: k >= 1
  steps, the catch-up; the hf engine's forward reads every row, so every row's tokens go) and the
  indices of the rows that chose it; the actor catches up, samples those rows' tokens with
  `me_kernels.me_step` (seed and offset t of each row, so the numbers are those of the local run)
  and draws their members for the next step: it returns N token ids and N members. No
  distribution leaves the actor.
* ME ("shared") and "single": one call (the drawn member's / `member`'s actor), which samples
  every row (and, for "shared", draws the batch's next member from the first request's seed, as
  locally).
* Running ahead (`run_ahead`, default 16): a call that serves every active row alone goes on to
  the next step in the actor while every row draws the same member again and no row sampled EOS
  (always, for "single"), up to run_ahead steps: exactly what the next calls would compute (each
  step's randomness is keyed by (seed, step)), without their round trips. Rows that a stop string
  ends on the driver simply drop the tokens their actor ran ahead. run_ahead=0 keeps exactly one
  call per step and running member.
* CE: a call to every actor, which returns its next-token logits [B, V] of every row; the driver
  stacks them into fp32 [M, B, V] and samples with `me_kernels.mixture_sample` (the request seeds
  and offsets of the local run). By default the logits travel in the engine's own dtype (what the
  local run mixes: the same tokens); `ray_options={"ce_wire_dtype": "float16"}` sends each member's
  log-probabilities log_softmax(logits) in float16 instead (half the bytes of fp32 logits; the
  mixture is still computed in fp32). That rounds each log-probability to 11 significant bits:
  |error| <= |log p| * 2**-11, so a probability p is off by a factor of at most exp(|log p| / 2048)
  (0.03% for p = 0.5, 0.34% for p = 1e-3); tokens then match the local run except where a draw
  falls within that margin of a boundary.
* Scoring: each actor returns only the log-probability of every continuation token under its
  member (float32, one number per token); the driver mixes them in float64:
  log sum_m w_m p_m(token | prefix). `score_ids(..., with_greedy=True)` needs the mixture's argmax,
  so then the actors return their full log-probabilities at the scored positions and the driver
  mixes them with `me_kernels.mixture_logprobs`, as the local engines do.

A lost actor (its process or node died, or it did not answer within `timeout_s`): the call raises
a RuntimeError naming the member (index and path) within the deadline; the actor is killed and the
next call of the RayEnsemble creates a fresh one (loading the member again), so the RayEnsemble
stays usable. Not available with placement="ray" (a ValueError says so): CE by drafting
(draft_tokens > 0) and members with different tokenizers.
"""
from __future__ import annotations

import math
import os
import time
import uuid
import warnings
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

import me_kernels

from .arguments import (METHODS, SELECTIONS, check_drafting, check_fits, check_generation, check_token_ids,
                        truncate_prompts, check_max_batch_size, check_max_seq_len, check_prompts, check_sampling,
                        check_seeds, check_texts, check_weights, device_map_of, encode_prompt, vocab_size)
from .decode import Batch, RequestResult, StepTokens, record_tokens
from .generation import Generation
from .hf_engine import HFEngine, continuation_logits, padded_rows
from .stopping import StopChecker, eos_token_ids, normalize_stop
from .windows import default_max_length, default_prefix_token_id, rolling_pairs

ENGINES = ("auto", "stacked", "hf")
# ray_options keys: how the driver talks to the actors ...
DRIVER_OPTIONS = ("timeout_s", "load_timeout_s", "ce_wire_dtype", "namespace", "torch_threads", "run_ahead",
                  "per_member")
# ... and what each actor is created with (ray's actor options; "per_member" overrides them per member)
ACTOR_OPTIONS = ("num_cpus", "num_gpus", "resources", "memory", "runtime_env", "scheduling_strategy",
                 "accelerator_type", "max_restarts")
WIRE_DTYPES = (None, "float16")
DEFAULT_TIMEOUT_S = 60.0  # a step (or a scoring call) that takes longer counts as a lost actor
DEFAULT_LOAD_TIMEOUT_S = 900.0  # creating an actor and loading its member
DEFAULT_RUN_AHEAD = 16  # most steps one ME / single call may run past its own (see MemberWorker.step)


# ====================================================================================== wire
def _to_wire(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """A CPU numpy view of a tensor for Ray's zero-copy serialisation; bf16 (no numpy dtype)
    travels as its int16 bit pattern."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), "bfloat16"
    return t.numpy(), str(t.dtype).removeprefix("torch.")


def _from_wire(payload: tuple[np.ndarray, str]) -> torch.Tensor:
    array, dtype = payload
    with warnings.catch_warnings():
        # Ray hands out read-only buffers (zero-copy); they are only read here, never written
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


# ====================================================================================== actor side
class MemberWorker:
    """One member in one process: its weights, its KV cache (a one-member engine over the active
    requests of the current generate call) and the sampling kernels. Created by RayEnsemble as a
    Ray actor (ray.remote(MemberWorker)); a plain object otherwise (the tests call it directly)."""

    def __init__(self, index: int, path: str, *, dtype=None, device=None, engine: str = "auto",
                 max_seq_len: int | None = None, trust_remote_code: bool = False, torch_threads: int | None = None):
        from transformers import AutoModelForCausalLM

        from .stacked_engine import StackedEngine, check_supported

        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        self.index, self.path = index, path
        kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
        if dtype is not None:
            kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        device_map = device_map_of(device)
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if device is not None and device_map is None:
            model = model.to(device)
        model.eval()
        self.model = model
        self.device = next(model.parameters()).device  # the sampling device of this member
        self.vocab_size = vocab_size(model)
        self.max_seq_len, _ = check_max_seq_len(max_seq_len, [model])
        reason = check_supported([model])[0]
        if engine == "stacked" and reason is not None:
            raise ValueError(f"engine='stacked' cannot run member {index} ({path}): {reason}")
        if engine == "stacked" or (engine == "auto" and reason is None and self.max_seq_len is not None):
            self.engine = StackedEngine([model], self.device, self.vocab_size, self.max_seq_len)
        else:
            self.engine = HFEngine([model], self.device, self.vocab_size)
        self.job = None  # the current generate call's state (SimpleNamespace), see begin()
        self.busy_s = 0.0

    def info(self) -> dict:
        """What the driver needs to know of the member (sent once, after loading)."""
        return {"config": self.model.config, "generation_config": getattr(self.model, "generation_config", None),
                "vocab_size": self.vocab_size, "engine": self.engine.name, "device": str(self.device),
                "pid": os.getpid(), "node": _node_id()}

    def ping(self) -> int:
        return os.getpid()

    # ---------------------------------------------------------------- generation
    def _begin(self, job_id: int, setup: dict) -> None:
        self.end()
        batch = Batch(setup["prompts"], setup["seeds"], setup["max_new_tokens"], self.device)
        batch.request_ids = list(setup["request_ids"])
        self.engine.begin(batch)
        self.job = SimpleNamespace(id=job_id, batch=batch, seen=0, sample_kwargs=setup["sample_kwargs"],
                                   weights=torch.tensor(setup["weights"], dtype=torch.float32, device=self.device),
                                   wire_dtype=setup["wire_dtype"], eos_ids=frozenset(setup["eos_ids"]),
                                   batch_seed=batch.seeds[:1].clone())
        # (the actor's batch starts with the requests still active; "shared" draws need the
        # generate call's first request's seed, whichever requests remain)
        self.job.batch_seed.fill_(setup["batch_seed"])

    def step(self, job_id: int, t: int, setup: dict | None, active: list[int] | None, new_tokens: list[list[int]],
             rows: list[int] | None, mode: str, run_ahead: int = 0):
        """Step t of generate call `job_id`.

        setup: the call's requests, on the actor's first step of the call (else None): prompts
            (token-id lists of the requests still active), their request ids and seeds,
            max_new_tokens, sampling kwargs, the mixture weights, the CE wire dtype.
        active: the request ids still active, when some finished since this actor's last call
            (else None).
        new_tokens: B lists of k ints: generated tokens t - k .. t - 1 of every active row (t - k =
            the step of this actor's previous call, or 0), in the order of `active`. (Small int
            arrays travel as lists: Ray serialises them faster than numpy arrays.)
        rows: the rows (indices into the active requests) this member samples (mode "me"); None:
            every row.
        mode: "me" (ME, independent selection), "shared" (ME, shared selection), "single": returns
            (runs, next): runs = K lists of the N rows' tokens (steps t .. t + K - 1), next = the
            rows' members for step t + K ("me"), [the batch's member] ("shared") or None; "logits"
            (CE) -> the next-token logits [B, V] of every row (native dtype, or log-probabilities
            in the wire dtype; a numpy array and its dtype).
        run_ahead: at most this many steps past t in the same call (K <= run_ahead + 1), taken
            only while this member serves every active row and every row drew it again (and no
            row sampled EOS): what the driver would otherwise ask in the next calls, with the
            same numbers (each step's randomness is keyed by (seed, step)).
        """
        start = time.perf_counter()
        try:
            return self._step(job_id, t, setup, active, new_tokens, rows, mode, run_ahead)
        finally:
            self.busy_s += time.perf_counter() - start

    def busy_seconds(self) -> float:
        """Seconds spent inside step() since the actor started (the bench compares it with the
        driver's wall time to find the transport's share)."""
        return self.busy_s

    def _step(self, job_id, t, setup, active, new_tokens, rows, mode, run_ahead):
        if setup is not None:
            self._begin(job_id, setup)
        job = self.job
        if job is None or job.id != job_id:
            raise RuntimeError(f"member {self.index}: step {t} of call {job_id} without its setup (the actor was "
                               f"restarted?)")
        batch = job.batch
        if active is not None and list(active) != batch.request_ids:
            keep_ids = set(active)
            keep = [r for r, req in enumerate(batch.request_ids) if req in keep_ids]
            keep_dev = torch.tensor(keep, dtype=torch.long, device=self.device)
            batch.keep(keep, keep_dev)
            self.engine.retire(keep, keep_dev)
        count = len(new_tokens[0]) if new_tokens else 0
        if count != t - job.seen or len(new_tokens) != batch.size:
            raise RuntimeError(f"member {self.index}: step {t} received {len(new_tokens)} rows of tokens "
                               f"{job.seen}..{job.seen + count}")
        if count:
            batch.generated[:, job.seen : t] = torch.tensor(new_tokens, dtype=torch.long, device=self.device)
        job.seen = t
        with torch.inference_mode():
            if mode == "logits":
                logits = self.engine.all_member_logits(batch, t)[0]
                if job.wire_dtype is not None:
                    logits = torch.log_softmax(logits.float(), dim=-1).to(getattr(torch, job.wire_dtype))
                return _to_wire(logits)
            if rows is None:
                rows = list(range(batch.size))
                rows_dev = torch.arange(batch.size, device=self.device)
            else:
                rows_dev = torch.tensor(rows, dtype=torch.long, device=self.device)
            seeds = batch.seeds.index_select(0, rows_dev)
            runs = []
            while True:
                step_t = t + len(runs)
                logits = self.engine.rows_logits(batch, step_t, 0, rows_dev, rows)
                if mode == "me":
                    tokens, members = me_kernels.me_step(logits, job.weights, seed=seeds, offset=step_t,
                                                         **job.sample_kwargs)
                    host = torch.stack([tokens, members.to(torch.long)]).tolist()  # one device -> host copy
                    toks, nxt = host
                elif mode == "shared":  # the batch's next member: drawn from the first request's seed
                    tokens = me_kernels.sample(logits, seed=seeds, offset=step_t, **job.sample_kwargs)
                    member = me_kernels.select_members(job.weights, seed=job.batch_seed, offset=step_t + 1, batch=1)
                    host = torch.cat([tokens, member.to(torch.long)]).tolist()
                    toks, nxt = host[:-1], host[-1:]
                else:  # "single"
                    tokens = me_kernels.sample(logits, seed=seeds, offset=step_t, **job.sample_kwargs)
                    toks, nxt = tokens.tolist(), None
                runs.append(toks)
                # Run ahead to step t + 1 only when the driver would call this actor alone, for
                # every row, with nothing else to tell it: each row drew this member again and no
                # row ended by EOS (stop strings end rows on the driver, which then drops what
                # this actor produced past them: the rows are independent, so nothing else changes).
                if len(runs) > run_ahead or len(rows) != batch.size or any(x in job.eos_ids for x in toks):
                    break
                if nxt is not None and any(x != self.index for x in nxt):
                    break
                batch.generated[:, step_t] = tokens  # this actor's own token, read at the next step
                job.seen = step_t + 1
            return runs, nxt

    def end(self) -> None:
        """Release the current call's state (caches)."""
        if self.job is not None:
            self.engine.end()
            self.job = None

    # ---------------------------------------------------------------- scoring
    def token_logprobs(self, prompts: list[list[int]], conts: list[list[int]], full: bool):
        """This member's log-probability of every continuation token given the true prefix, all
        rows' tokens concatenated in order (float32 [sum of len(cont)]), computed as the local
        engine computes it (the stacked engine's scoring forward, or the hf engine's padded
        forward); full=True: the whole log-probability row at each of those positions
        ([sum of len(cont), V], for the mixture's argmax)."""
        per_row: list = [None] * len(prompts)
        with torch.inference_mode():
            if self.engine.name == "stacked":
                one = torch.ones(1, dtype=torch.float32, device=self.device)
                lengths = [len(p) + len(c) for p, c in zip(prompts, conts)]
                for idx in self.engine._score_chunks(lengths):
                    parts = [[] for _ in idx]
                    for logp, targets, valid in self.engine.scored_positions(
                            [prompts[i] for i in idx], [conts[i] for i in idx], one):
                        picked = logp if full else logp.gather(2, targets[:, :, None]).squeeze(2)
                        for j in range(len(idx)):
                            parts[j].append(picked[j][valid[j]])
                    for j, i in enumerate(idx):
                        per_row[i] = torch.cat(parts[j])
            else:
                for idx in self.engine._score_chunks(prompts, conts):
                    rows = self._hf_logprobs([prompts[i] for i in idx], [conts[i] for i in idx], full)
                    for i, row in zip(idx, rows):
                        per_row[i] = row
        return _to_wire(torch.cat(per_row).float())

    def _hf_logprobs(self, prompts, conts, full: bool) -> list[torch.Tensor]:
        """The hf engine's scoring forward (hf_engine.padded_rows / continuation_logits), per row
        its continuation's log-probabilities (full: whole rows)."""
        ids, mask, positions = padded_rows(prompts, conts)
        cmax = max(len(c) for c in conts)
        logp = torch.log_softmax(continuation_logits(self.model, ids, mask, positions, cmax).float(), dim=-1)
        rows = []
        for r, cont in enumerate(conts):
            row = logp[r, cmax - len(cont) :]
            if not full:
                row = row.gather(1, torch.tensor(cont, dtype=torch.long, device=self.device)[:, None]).squeeze(1)
            rows.append(row)
        return rows


def _node_id() -> str | None:
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # not inside Ray (a MemberWorker used directly)
        return None


# ====================================================================================== driver side
class RayEnsemble:
    """Ensemble's generation and scoring API over members that live in Ray actors (one actor per
    member). Build it with `Ensemble.from_pretrained(paths, placement="ray", ray_options=...)`; see
    the module docstring for what runs where and what crosses the wire.

    Public: generate, generate_ids, score, score_ids, score_rolling, score_rolling_ids (the
    arguments and results of Ensemble's), num_members, weights, tokenizer, vocab_size,
    max_seq_len, eos_token_ids, engine, actor_names, last_call_stats, close() (also a context
    manager).

    last_call_stats: after each generate call, {"method", "calls_per_step": [int] (remote calls
    the driver made at each step; 0 for a step an earlier call ran ahead to), "members_per_step":
    [[member, ...]] (whose actors it called),
    "end_calls": int (the fire-and-forget calls that free the actors' caches after the call)}; after
    scoring, {"method": "score", "calls": int}.
    """

    def __init__(self, paths: list[str], weights, *, tokenizer, infos: list[dict], actors: list, actor_names: list[str],
                 member_kwargs: dict, actor_options: list[dict], timeout_s: float, load_timeout_s: float,
                 wire_dtype: str | None, namespace: str | None, max_seq_len: int | None,
                 run_ahead: int = DEFAULT_RUN_AHEAD):
        self.paths = paths
        self._weights = check_weights(weights, len(paths))
        self.tokenizer = tokenizer
        self.tokenizers = None  # members share one vocabulary (checked before the actors load)
        self._infos = infos
        self._actors = actors
        self.actor_names = actor_names
        self._member_kwargs = member_kwargs
        self._actor_options = actor_options
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.wire_dtype = wire_dtype
        self.run_ahead = run_ahead
        self.namespace = namespace
        # stand-ins with what the shared helpers read of a model: .config and .generation_config
        self.members = [SimpleNamespace(config=i["config"], generation_config=i["generation_config"]) for i in infos]
        sizes = [i["vocab_size"] for i in infos]
        if len(set(sizes)) != 1:
            self.close()
            raise ValueError(f"members' vocabularies differ (output sizes {sizes}); placement='ray' needs members "
                             "that share one vocabulary")
        self.vocab_size = sizes[0]
        self.max_seq_len, self._limit_reason = check_max_seq_len(max_seq_len, self.members)
        self.eos_token_ids = eos_token_ids(self.members, tokenizer)
        self.last_call_stats: dict = {}
        self._job = 0
        self._test_step_hook = None  # tests: called as hook(t) after each step's replies
        self._closed = False
        self.sampling_device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(cls, paths: Sequence[str], weights=None, *, dtype=None, device=None,
                        trust_remote_code: bool = False, engine: str = "auto", max_seq_len: int | None = None,
                        ray_options: dict | None = None) -> "RayEnsemble":
        """Create one named actor per member (each loads its member with from_pretrained on its
        node) and load the shared tokenizer on the driver. Arguments as Ensemble.from_pretrained;
        `device` (one for all, or one per member) is the device inside each actor: default "cuda"
        when the actor has num_gpus >= 1 ("auto", i.e. sharded with accelerate, when it has more
        than one), else the CPU.

        ray_options (all optional): timeout_s (default 60: a step or scoring call that takes
        longer counts as a lost actor), load_timeout_s (default 900: creating an actor and loading
        its member), ce_wire_dtype (None: the engine's logits, exact; "float16": log-probabilities
        in half precision, see the module docstring), namespace (the actors' Ray namespace),
        torch_threads (torch.set_num_threads in each actor); Ray actor options for every actor:
        num_cpus (default 1), num_gpus (default 0), resources, memory, runtime_env,
        scheduling_strategy, accelerator_type, max_restarts; and per_member: a list with one dict
        of actor options per member, overriding the shared ones.
        """
        from transformers import AutoTokenizer

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("paths must name at least one model")
        check_weights(weights, len(paths))
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if max_seq_len is not None:
            check_max_seq_len(max_seq_len, [])
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(paths)
        if len(devices) != len(paths):
            raise ValueError(f"device has {len(devices)} entries but there are {len(paths)} paths")
        if isinstance(dtype, str) and dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
        options = _check_ray_options(ray_options, len(paths))
        wire_dtype = options["ce_wire_dtype"]

        tokenizers = []
        for path in paths:
            try:
                tokenizers.append(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
            except (OSError, ValueError):  # no tokenizer here (or the path exists only on the actors' nodes)
                tokenizers.append(None)
        known = [t for t in tokenizers if t is not None]
        if known and any(t.get_vocab() != known[0].get_vocab() for t in known[1:]):
            raise ValueError("members' tokenizers differ: placement='ray' needs members that share one vocabulary "
                             "(members with different tokenizers run with placement='local')")

        if not ray.is_initialized():
            ray.init()  # RAY_ADDRESS or a local cluster; call ray.init yourself to choose
        member_kwargs = []
        for i, (path, dev) in enumerate(zip(paths, devices)):
            gpus = options["actor"][i].get("num_gpus", 0) or 0
            if dev is None and gpus > 0:
                dev = "auto" if gpus > 1 else "cuda"
            member_kwargs.append({"dtype": dtype, "device": dev, "engine": engine, "max_seq_len": max_seq_len,
                                  "trust_remote_code": trust_remote_code, "torch_threads": options["torch_threads"]})
        for i in range(len(paths)):  # before any actor starts: a request no node can meet waits forever
            _check_placeable(i, paths[i], options["actor"][i])
        actors, names = [None] * len(paths), [""] * len(paths)
        pending = {i: _create_actor(i, paths[i], member_kwargs[i], options["actor"][i], options["namespace"])
                   for i in range(len(paths))}
        infos = [None] * len(paths)
        try:
            for i, info in _wait_loaded(pending, paths, options["load_timeout_s"]).items():
                infos[i] = info
        except BaseException:
            for handle, _ in pending.values():
                _kill(handle)
            raise
        for i, (handle, name) in pending.items():
            actors[i], names[i] = handle, name
        return cls(paths, weights, tokenizer=known[0] if known else None, infos=infos, actors=actors,
                   actor_names=names, member_kwargs=member_kwargs, actor_options=options["actor"],
                   timeout_s=options["timeout_s"], load_timeout_s=options["load_timeout_s"], wire_dtype=wire_dtype,
                   namespace=options["namespace"], max_seq_len=max_seq_len, run_ahead=options["run_ahead"])

    # ---------------------------------------------------------------- actors
    @property
    def device(self) -> torch.device:
        """Where the driver mixes and samples (CE); the members run in their actors."""
        return self.sampling_device

    @property
    def num_members(self) -> int:
        return len(self.paths)

    @property
    def weights(self) -> list[float]:
        """The normalised mixture weights."""
        return list(self._weights)

    @property
    def engine(self) -> str:
        """The engine member 0's actor runs ("stacked" or "hf")."""
        return self._infos[0]["engine"]

    def actors(self) -> list:
        """The members' actor handles (None for a member lost and not yet re-created)."""
        return list(self._actors)

    def close(self) -> None:
        """Kill every member's actor (their weights and caches go with them)."""
        for m, handle in enumerate(self._actors):
            if handle is not None:
                _kill(handle)
            self._actors[m] = None
        self._closed = True

    def __enter__(self) -> "RayEnsemble":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _ensure_actors(self) -> None:
        """Re-create the actors of members lost in an earlier call (see the module docstring)."""
        if self._closed:
            raise RuntimeError("this RayEnsemble was closed (its actors are gone); build a new one")
        lost = [m for m, handle in enumerate(self._actors) if handle is None]
        if not lost:
            return
        pending = {m: _create_actor(m, self.paths[m], self._member_kwargs[m], self._actor_options[m], self.namespace)
                   for m in lost}
        try:
            loaded = _wait_loaded(pending, self.paths, self.load_timeout_s)
        except BaseException:
            for handle, _ in pending.values():
                _kill(handle)
            raise
        for m, (handle, name) in pending.items():
            self._actors[m], self.actor_names[m] = handle, name
            self._infos[m] = loaded[m]

    def _lose(self, m: int) -> None:
        handle, self._actors[m] = self._actors[m], None
        if handle is not None:
            _kill(handle)

    def _gather(self, refs: list, members: list[int], what: str) -> list:
        """Every reply of one round of calls (already launched), waiting at most timeout_s in all.
        A dead or silent actor raises a RuntimeError naming its member; that actor is killed and
        re-created by the next call."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError, RayTaskError):
            pass  # find out which member, below
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        ready = set(ready)
        for ref, m in zip(refs, members):  # a dead actor's reply is "ready": report it first
            if ref not in ready:
                continue
            try:
                ray.get(ref, timeout=0)
            except RayActorError as e:
                self._lose(m)
                raise RuntimeError(
                    f"member {m} ({self.paths[m]}) is lost: its Ray actor {self.actor_names[m]!r} died during {what} "
                    f"({type(e).__name__}). This call's results are lost; the next call of this RayEnsemble starts a "
                    f"fresh actor for the member (loading it again)") from e
            except RayTaskError as e:
                raise RuntimeError(f"member {m} ({self.paths[m]}) failed in its actor during {what}: {e}") from e
        for ref, m in zip(refs, members):
            if ref not in ready:
                self._lose(m)
                raise RuntimeError(
                    f"member {m} ({self.paths[m]}) did not answer {what} within timeout_s = {self.timeout_s:g} s: its "
                    f"Ray actor {self.actor_names[m]!r} was killed and the next call of this RayEnsemble starts a fresh "
                    f"one (loading the member again); raise ray_options['timeout_s'] if a step of this member can take "
                    f"longer")
        return ray.get(refs)  # (not reached: the first get failed for a reason found above)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, **options) -> list[Generation]:
        """Ensemble.generate (same arguments and results; draft_tokens must be 0)."""
        if self.tokenizer is None:
            raise ValueError("generate() needs a tokenizer; use generate_ids() for token-id prompts")
        prompts = check_prompts(prompts)
        input_ids = [encode_prompt(self.tokenizer, p, "the tokenizer") for p in prompts]
        return self.generate_ids(input_ids, **options)

    def generate_ids(
        self,
        input_ids: Sequence[Sequence[int]],
        *,
        method: str = "me",
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        seed=None,
        stop=None,
        selection: str = "independent",
        member: int = 0,
        progress: bool = False,
        draft_tokens: int = 0,
        draft_member: int | None = None,
        draft_adaptive: bool = True,
        truncate: str | None = None,
        max_batch_size: int | None = None,
    ) -> list[Generation]:
        """Ensemble.generate_ids over the actors (same arguments and results, the same tokens as
        placement="local" for the same seeds). draft_tokens > 0 raises a ValueError."""
        prompts = self._check_ids(input_ids, "input_ids", allow_empty=False)
        self._check_method(method, selection, member, max_new_tokens)
        check_drafting(draft_tokens, draft_member, method, self.num_members)
        if draft_tokens > 0:
            raise ValueError("draft_tokens > 0 (CE by drafting) is not available with placement='ray': verifying "
                             "drafts needs every member's distribution at every drafted position on one device "
                             "(use placement='local', or method='ce' without drafting)")
        if not isinstance(draft_adaptive, bool):
            raise TypeError(f"draft_adaptive must be a bool, got {type(draft_adaptive).__name__}")
        max_batch_size = check_max_batch_size(max_batch_size)
        prompts = self._truncate(prompts, max_new_tokens, truncate)
        params = check_sampling(temperature, top_k, top_p, min_p)
        seeds = check_seeds(seed, len(prompts))
        self._check_fits([len(p) + max_new_tokens for p in prompts], "generate")
        stop_checker = StopChecker(self.tokenizer, normalize_stop(stop))
        self._ensure_actors()

        step = max_batch_size or len(prompts)
        results: list[RequestResult] = []
        stats = {"method": method, "calls_per_step": [], "members_per_step": [], "end_calls": 0}
        self.last_call_stats = stats
        for lo in range(0, len(prompts), step):
            results += self._decode(prompts[lo : lo + step], seeds[lo : lo + step], stats, method=method,
                                    selection=selection, member=member, params=params, max_new_tokens=max_new_tokens,
                                    stop_checker=stop_checker, progress=progress)
        generations = []
        for res in results:
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
                if res.finish_reason == "stop":
                    text = stop_checker.truncate(text)
            generations.append(Generation(text, res.token_ids, res.members, res.finish_reason))
        return generations

    def _decode(self, prompts: list[list[int]], seeds: list[int], stats: dict, *, method: str, selection: str,
                member: int, params, max_new_tokens: int, stop_checker: StopChecker,
                progress: bool) -> list[RequestResult]:
        """decode.decode's loop with the members in actors (see the module docstring)."""
        from tqdm.auto import tqdm

        results = [RequestResult() for _ in prompts]
        if max_new_tokens == 0:
            return results
        self._job += 1
        job = self._job
        batch = Batch(prompts, seeds, max_new_tokens, torch.device("cpu"))  # the driver's token history
        # The driver's own draws (the members of step 0, CE's mixture) run where the local run's
        # would: on a GPU when the driver has one (the kernels), else with the CPU ops.
        device = self.sampling_device
        weights = torch.tensor(self._weights, dtype=torch.float32, device=device)
        shared = method == "me" and selection == "shared"
        batch_seed = batch.seeds[:1].to(device)  # "shared": every draw from the first request's seed
        sample_kwargs = params.kwargs()
        seen: dict[int, int] = {}  # member -> step of its actor's last call (it holds every token before it)
        told_version: dict[int, int] = {}  # member -> the version of the active set its actor holds
        version = 0
        members_host: list[int] = []
        if method == "me":
            first = (me_kernels.select_members(weights, seed=batch_seed, offset=0, batch=1).expand(batch.size) if shared
                     else me_kernels.select_members(weights, seed=batch.seeds.to(device), offset=0, batch=batch.size))
            members_host = first.tolist()
            self._check_members(members_host, -1)

        def call(m: int, t: int, rows: list[int] | None, mode: str):
            setup = active = None
            if m not in seen:  # the actor's first step of this call: the active requests
                setup = {"prompts": [prompts[r] for r in batch.request_ids], "request_ids": list(batch.request_ids),
                         "seeds": [seeds[r] for r in batch.request_ids], "max_new_tokens": max_new_tokens,
                         "sample_kwargs": sample_kwargs, "weights": list(self._weights), "wire_dtype": self.wire_dtype,
                         "eos_ids": sorted(self.eos_token_ids), "batch_seed": seeds[0]}
                seen[m], told_version[m] = 0, version
            elif told_version[m] != version:
                active, told_version[m] = list(batch.request_ids), version
            new_tokens = batch.generated[:, seen[m] : t].tolist()
            seen[m] = t
            run_ahead = min(self.run_ahead, max_new_tokens - 1 - t) if mode != "logits" else 0
            return self._actors[m].step.remote(job, t, setup, active, new_tokens, rows, mode, run_ahead)

        def retire(finished: list[int]) -> None:
            nonlocal version, members_host
            done = set(finished)
            keep = [r for r in range(batch.size) if r not in done]
            batch.keep(keep, torch.tensor(keep, dtype=torch.long))
            if method == "me":  # the members drawn for the next step, of the rows kept
                members_host = [members_host[r] for r in keep]
            version += 1

        bar = tqdm(total=max_new_tokens, disable=not progress, desc=f"generate ({method}, ray)", unit="tok")
        try:
            t = 0
            while t < max_new_tokens:
                if method == "ce":
                    plan, mode = {m: None for m in range(self.num_members)}, "logits"
                elif method == "single":
                    plan, mode = {member: None}, "single"
                elif shared:
                    plan, mode = {members_host[0]: None}, "shared"
                else:
                    plan, mode = {}, "me"
                    for row, m in enumerate(members_host):
                        plan.setdefault(m, []).append(row)
                running = sorted(plan)
                # every running actor's call is launched before any reply is awaited
                refs = [call(m, t, plan[m], mode) for m in running]
                replies = self._gather(refs, running, f"step {t} of generate")
                stats["calls_per_step"].append(len(refs))
                stats["members_per_step"].append(running)

                if method == "ce":
                    logits = [_from_wire(r) for r in replies]
                    stacked = torch.stack(logits if self.wire_dtype is None else [x.float() for x in logits])
                    # (on a GPU driver: one host -> device copy of the stacked logits per step)
                    tokens = me_kernels.mixture_sample(stacked.to(device), weights, seed=batch.seeds.to(device),
                                                       offset=t, **sample_kwargs)
                    steps = [(tokens.tolist(), [-1] * batch.size)]
                    next_by_request = None
                else:
                    # each call's rows as request ids (rows may retire during a run of steps)
                    steps, next_by_request = [], {}
                    runs = [reply[0] for reply in replies]
                    calls_rows = [[batch.request_ids[r] for r in (plan[m] if plan[m] is not None else range(batch.size))]
                                  for m in running]
                    for j in range(len(runs[0])):  # K > 1 only for a call that served every row alone
                        by_request = {}
                        for run, requests in zip(runs, calls_rows):
                            by_request.update(zip(requests, run[j]))
                        steps.append(by_request)
                    for m, (run, nxt), requests in zip(running, replies, calls_rows):
                        seen[m] += len(run) - 1  # the actor read its own tokens of the run
                        if mode == "me":
                            next_by_request.update(zip(requests, nxt))
                        elif mode == "shared":
                            next_by_request = nxt[0]
                    producers = {req: m for m, requests in zip(running, calls_rows) for req in requests}
                for j, step_out in enumerate(steps):
                    if method == "ce":
                        tokens_host, members_now = step_out
                    else:
                        tokens_host = [step_out[req] for req in batch.request_ids]
                        members_now = [producers[req] for req in batch.request_ids]
                    tokens = torch.tensor(tokens_host, dtype=torch.long)
                    batch.generated[:, t] = tokens
                    bar.update(1)
                    finished = record_tokens(results, batch, StepTokens(tokens, tokens_host, members_now), t,
                                             max_new_tokens=max_new_tokens, eos_ids=self.eos_token_ids,
                                             stop_checker=stop_checker)
                    if self._test_step_hook is not None:
                        self._test_step_hook(t)
                    t += 1
                    if j > 0:  # a step the previous call ran ahead to: no call of its own
                        stats["calls_per_step"].append(0)
                        stats["members_per_step"].append([])
                    if len(finished) == batch.size:
                        return results
                    if finished:
                        retire(finished)
                if mode == "me":
                    members_host = [next_by_request[req] for req in batch.request_ids]
                    self._check_members(members_host, t - 1)
                elif mode == "shared":
                    members_host = [next_by_request] * batch.size
                    self._check_members(members_host, t - 1)
        finally:
            bar.close()
            for m in seen:  # free the actors' caches; nothing waits for these replies
                if self._actors[m] is not None:
                    self._actors[m].end.remote()
                    stats["end_calls"] += 1
        return results

    def _check_members(self, members_host: list[int], t: int) -> None:
        if min(members_host) < 0:  # the kernels' signal for an invalid weight row
            raise RuntimeError(f"step {t + 1}: no member could be drawn from the weights {self._weights}")

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Ensemble.score (the same numbers as placement="local", up to float rounding)."""
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer; use score_ids() for token ids")
        prompts = check_texts(prompts, "prompts")
        continuations = check_texts(continuations, "continuations", allow_empty_texts=True)
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return self.score_ids(prompt_ids, cont_ids)

    def score_ids(self, prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]], *,
                  with_greedy: bool = False) -> list[float] | list[tuple[float, bool]]:
        """Ensemble.score_ids: each actor returns its member's log-probability of every
        continuation token (with_greedy: its logits at the scored positions), the driver mixes."""
        if not isinstance(with_greedy, bool):
            raise TypeError(f"with_greedy must be a bool, got {type(with_greedy).__name__}")
        prompts = self._check_ids(prompt_ids, "prompt_ids", allow_empty=False)
        conts = self._check_ids(continuation_ids, "continuation_ids", allow_empty=True, allow_no_rows=True)
        if len(prompts) != len(conts):
            raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
        self._check_fits([len(p) + len(c) for p, c in zip(prompts, conts)], "score_ids")
        scores: list = [(0.0, True) if with_greedy else 0.0] * len(prompts)
        order = [i for i in range(len(prompts)) if conts[i]]
        if not order:
            return scores
        self._ensure_actors()
        log_w = torch.tensor(self._weights, dtype=torch.float64).log()[:, None]
        weights = torch.tensor(self._weights, dtype=torch.float32)
        calls = 0
        # full log-probabilities travel only for with_greedy: chunks of at most 256 MiB of them per member
        per_chunk = max(1, (256 << 20) // (4 * self.vocab_size)) if with_greedy else None
        for chunk in _token_chunks(order, conts, per_chunk):
            p, c = [prompts[i] for i in chunk], [conts[i] for i in chunk]
            refs = [actor.token_logprobs.remote(p, c, with_greedy) for actor in self._actors]
            replies = self._gather(refs, list(range(self.num_members)), "score_ids")
            calls += len(refs)
            targets = torch.tensor([tok for cont in c for tok in cont], dtype=torch.long)
            if with_greedy:
                logmix = me_kernels.mixture_logprobs(torch.stack([_from_wire(r) for r in replies]), weights)
                token_lp = logmix.gather(1, targets[:, None]).squeeze(1).double()
                hits = logmix.argmax(1) == targets  # the lowest id on ties, as temperature-0 sampling
            else:
                token_lp = torch.logsumexp(torch.stack([_from_wire(r).double() for r in replies]) + log_w, dim=0)
            lo = 0
            for i, cont in zip(chunk, c):
                value = float(token_lp[lo : lo + len(cont)].sum())
                scores[i] = (value, bool(hits[lo : lo + len(cont)].all())) if with_greedy else value
                lo += len(cont)
        self.last_call_stats = {"method": "score", "calls": calls}
        return scores

    def score_rolling_ids(self, token_ids: Sequence[Sequence[int]], *, max_length: int | None = None,
                          prefix_token_id: int | None = None, min_context: int = 1) -> list[float]:
        """Ensemble.score_rolling_ids (windows of at most max_length tokens, built on score_ids)."""
        sequences = self._check_ids(token_ids, "token_ids", allow_empty=False)
        if max_length is None:
            max_length = self.max_seq_len if self.max_seq_len is not None else default_max_length(self.members)
        elif self.max_seq_len is not None and isinstance(max_length, int) and max_length > self.max_seq_len:
            raise ValueError(f"max_length = {max_length} exceeds the Ensemble's max_seq_len: {self._limit_reason}")
        if prefix_token_id is None:
            prefix_token_id = default_prefix_token_id(self.members, self.tokenizer)
        elif isinstance(prefix_token_id, bool) or not isinstance(prefix_token_id, int):
            raise TypeError(f"prefix_token_id must be an int, got {type(prefix_token_id).__name__}")
        if not 0 <= prefix_token_id < self.vocab_size:
            raise ValueError(f"prefix_token_id must be in [0, {self.vocab_size}), got {prefix_token_id}")
        owners, contexts, continuations = [], [], []
        for i, seq in enumerate(sequences):
            for context, continuation in rolling_pairs(seq, prefix_token_id, max_length, min_context=min_context):
                owners.append(i)
                contexts.append(context)
                continuations.append(continuation)
        totals = [0.0] * len(sequences)
        for i, value in zip(owners, self.score_ids(contexts, continuations)):
            totals[i] += value
        return totals

    def score_rolling(self, texts: Sequence[str], *, max_length: int | None = None, min_context: int = 1) -> list[float]:
        """Ensemble.score_rolling."""
        if self.tokenizer is None:
            raise ValueError("score_rolling() needs a tokenizer; use score_rolling_ids() for token ids")
        texts = check_texts(texts, "texts")
        ids = [self.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
        return self.score_rolling_ids(ids, max_length=max_length, min_context=min_context)

    # ---------------------------------------------------------------- argument checks (as Ensemble's)
    def _check_method(self, method: str, selection: str, member: int, max_new_tokens: int) -> None:
        check_generation(method, selection, member, max_new_tokens, self.num_members)

    def _truncate(self, prompts: list[list[int]], max_new_tokens: int, truncate) -> list[list[int]]:
        return truncate_prompts(prompts, max_new_tokens, truncate, self.max_seq_len, self._limit_reason)

    def _check_fits(self, lengths: list[int], what: str) -> None:
        check_fits(lengths, what, self.max_seq_len, self._limit_reason)

    def _check_ids(self, sequences, name: str, *, allow_empty: bool, allow_no_rows: bool = False) -> list[list[int]]:
        return check_token_ids(sequences, name, self.vocab_size, allow_empty=allow_empty, allow_no_rows=allow_no_rows)

    def __repr__(self) -> str:
        return (f"RayEnsemble(members={self.paths}, weights={[round(w, 4) for w in self._weights]}, "
                f"actors={self.actor_names})")


# ====================================================================================== helpers


def _check_placeable(index: int, path: str, actor_options: dict) -> None:
    """ValueError when no alive node of the cluster has the CPUs, GPUs, memory and custom resources
    member `index`'s actor asks for (Ray would keep such an actor pending, not fail it)."""
    wanted = {"CPU": actor_options.get("num_cpus", 0) or 0, "GPU": actor_options.get("num_gpus", 0) or 0,
              "memory": actor_options.get("memory", 0) or 0, **(actor_options.get("resources") or {})}
    wanted = {k: v for k, v in wanted.items() if v}
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if not wanted or not nodes or any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return
    largest = {k: max(node.get(k, 0) for node in nodes) for k in wanted}
    raise ValueError(
        f"member {index} ({path}): no node of the Ray cluster can host its actor: it asks for {wanted}, the "
        f"largest node offers {largest} (set ray_options num_gpus / num_cpus / resources, per_member, or join "
        "nodes that have them)"
    )
def _check_ray_options(ray_options, num_members: int) -> dict:
    """Validate ray_options before anything loads; returns the driver options and one dict of
    actor options per member."""
    if ray_options is None:
        ray_options = {}
    if not isinstance(ray_options, dict):
        raise TypeError(f"ray_options must be a dict, got {type(ray_options).__name__}")
    unknown = set(ray_options) - set(DRIVER_OPTIONS) - set(ACTOR_OPTIONS)
    if unknown:
        raise ValueError(f"unknown ray_options {sorted(unknown)}; known: {sorted(DRIVER_OPTIONS + ACTOR_OPTIONS)}")
    out = {}
    for key, default in (("timeout_s", DEFAULT_TIMEOUT_S), ("load_timeout_s", DEFAULT_LOAD_TIMEOUT_S)):
        value = ray_options.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
            raise ValueError(f"ray_options[{key!r}] must be a positive number of seconds, got {value!r}")
        out[key] = float(value)
    wire = ray_options.get("ce_wire_dtype")
    if wire not in WIRE_DTYPES:
        raise ValueError(f"ray_options['ce_wire_dtype'] must be one of {WIRE_DTYPES}, got {wire!r}")
    out["ce_wire_dtype"] = wire
    threads = ray_options.get("torch_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"ray_options['torch_threads'] must be None or an int >= 1, got {threads!r}")
    out["torch_threads"] = threads
    run_ahead = ray_options.get("run_ahead", DEFAULT_RUN_AHEAD)
    if isinstance(run_ahead, bool) or not isinstance(run_ahead, int) or run_ahead < 0:
        raise ValueError(f"ray_options['run_ahead'] must be an int >= 0, got {run_ahead!r}")
    out["run_ahead"] = run_ahead
    out["namespace"] = ray_options.get("namespace")
    shared = {k: v for k, v in ray_options.items() if k in ACTOR_OPTIONS}
    shared.setdefault("num_cpus", 1)
    per_member = ray_options.get("per_member")
    if per_member is None:
        per_member = [{}] * num_members
    if not isinstance(per_member, (list, tuple)) or len(per_member) != num_members:
        raise ValueError(f"ray_options['per_member'] must be a list of {num_members} dicts (one per member)")
    out["actor"] = []
    for i, extra in enumerate(per_member):
        if not isinstance(extra, dict) or set(extra) - set(ACTOR_OPTIONS):
            raise ValueError(f"ray_options['per_member'][{i}] must be a dict of actor options {ACTOR_OPTIONS}, got {extra!r}")
        merged = {**shared, **extra}
        for key in ("num_cpus", "num_gpus"):
            value = merged.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"ray_options {key} of member {i} must be a number >= 0, got {value!r}")
        out["actor"].append(merged)
    return out


def _create_actor(index: int, path: str, member_kwargs: dict, actor_options: dict, namespace: str | None):
    """(handle, name) of a new named actor loading member `index` (returns at once)."""
    name = f"me-member-{index}-{uuid.uuid4().hex[:8]}"
    options = dict(actor_options, name=name)
    if namespace is not None:
        options["namespace"] = namespace
    handle = ray.remote(MemberWorker).options(**options).remote(index, path, **member_kwargs)
    return handle, name


def _wait_loaded(pending: dict, paths: list[str], timeout_s: float) -> dict:
    """{member: info} once every pending actor has loaded its member; a RuntimeError naming the
    member when one fails or takes longer than timeout_s."""
    members = sorted(pending)
    refs = [pending[m][0].info.remote() for m in members]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    ready = set(ready)
    infos = {}
    for ref, m in zip(refs, members):
        name = pending[m][1]
        if ref not in ready:
            raise RuntimeError(f"member {m} ({paths[m]}): its actor {name!r} was not created and loaded within "
                               f"load_timeout_s = {timeout_s:g} s (does the cluster have a node with the resources "
                               f"asked for? raise ray_options['load_timeout_s'] for a slow load)")
        try:
            infos[m] = ray.get(ref)
        except (RayActorError, RayTaskError) as e:
            raise RuntimeError(f"member {m} ({paths[m]}) could not be loaded in its actor {name!r}: {e}") from e
    return infos


def _kill(handle) -> None:
    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already gone
        pass


def _token_chunks(order: list[int], conts: list[list[int]], max_tokens: int | None):
    """Consecutive groups of the rows in `order` holding at most max_tokens continuation tokens
    (at least one row each); one group when max_tokens is None."""
    if max_tokens is None:
        yield order
        return
    chunk, count = [], 0
    for i in order:
        if chunk and count + len(conts[i]) > max_tokens:
            yield chunk
            chunk, count = [], 0
        chunk.append(i)
        count += len(conts[i])
    if chunk:
        yield chunk
