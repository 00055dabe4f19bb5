"""`Ensemble`: Hugging Face causal LMs combined as a mixture, generated from by ME / CE / single.

    ens = Ensemble.from_pretrained(["path/a", "path/b"], weights=[0.5, 0.5], dtype="bfloat16", device="cuda")
    outs = ens.generate(["def fib(n):"], method="me", max_new_tokens=64, seed=0)
    print(outs[0].text, outs[0].members)
    ens.score(["The cat"], [" sat on the mat."])   # exact mixture log-likelihoods

Every argument is checked before any model runs, so a bad call raises a clear ValueError /
TypeError and leaves the Ensemble as it was; generate() keeps no state between calls, so an
interrupted call leaves it usable too.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import torch


from .arguments import (METHODS, SELECTIONS, check_drafting, check_fits, check_generation, check_token_ids,
                        truncate_prompts, check_max_batch_size, check_max_seq_len, check_prompts, check_sampling, check_seeds,
                        check_texts, check_weights, device_map_of, encode_prompt, vocab_size)
from .decode import decode
from .drafting import decode_drafting
from .generation import Generation  # its own module: ray_placement returns it without importing this one
from .hf_engine import HFEngine
from .memory import estimate as estimate_call_memory
from .mixed import EngineMembers, StackedMembers, decode_mixed
from .stacked_engine import StackedEngine, check_supported
from .stopping import ByteStopChecker, StopChecker, eos_token_ids, normalize_stop
from .vocabularies import UnionVocabulary, eos_ids_of
from .windows import default_max_length, default_prefix_token_id, rolling_pairs

ENGINES = ("auto", "stacked", "hf")
PLACEMENTS = ("local", "ray")


def _engine_kind(engine: str, models, max_seq_len: int | None) -> str:
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "auto":
        supported = max_seq_len is not None and all(r is None for r in check_supported(models))
        return "stacked" if supported else "hf"
    if engine == "stacked" and max_seq_len is None:
        raise ValueError("engine='stacked' needs max_seq_len (no member's config gives a context length)")
    return engine


def _build_engine(kind: str, models, device, vocab_size: int, max_seq_len: int | None):
    if kind == "stacked":
        return StackedEngine(models, device, vocab_size, max_seq_len)
    return HFEngine(models, device, vocab_size)


def _same_vocabulary(tokenizers) -> bool:
    first = tokenizers[0].get_vocab()
    return all(t is tokenizers[0] or t.get_vocab() == first for t in tokenizers[1:])


class Ensemble:
    """A mixture of Hugging Face causal LMs, sharing one vocabulary or each with its own tokenizer.

    Args:
        models: loaded causal LMs (AutoModelForCausalLM-like: forward(input_ids, attention_mask,
            position_ids, past_key_values, use_cache) -> .logits, .past_key_values). Members may
            sit on different devices; sampling happens on the first member's device.
        tokenizer: shared tokenizer, or None for token-id use (generate_ids / score_ids), or a
            list with one tokenizer per member. Members whose tokenizers differ exchange text
            (see "Members with different tokenizers" below); a list of tokenizers with one
            vocabulary is the shared case.
        weights: mixture weights, one per member, non-negative, not all zero (normalised);
            uniform by default.
        engine: "stacked" (the package's own decoder for Llama / Mistral / Qwen2 / Qwen3 members:
            members of one shape are stacked and every step is one grouped-GEMM forward for all
            rows, whatever member each row chose; preallocated KV caches), "hf" (each member's
            Hugging Face forward; any causal LM) or "auto" ("stacked" when every member is
            supported, else "hf"). Both give the same distributions and, up to float rounding at
            exact ties, the same tokens for the same seeds.
        max_seq_len: the longest sequence (prompt + new tokens) a request may reach: the stacked
            engine's cache capacity. Default: the smallest context length (max_position_embeddings)
            among the members (no limit when no member's config gives one; the stacked engine then
            needs it). A request that would not fit is refused before any work with a ValueError
            that names the numbers and the member whose context sets the limit.

    Members with different tokenizers (me_runtime/mixed.py, me_runtime/vocabularies.py): the
    members exchange the byte string of each sampled token (a "piece"); every member reads the
    prompt in its own encoding, then its own spelling of every emitted piece. ME samples a token
    from the drawn member and emits its piece; CE mixes the members' distributions over pieces
    (a union vocabulary) and samples a piece; so both emit the same distribution at temperature 1.
    generate() works as with one tokenizer (Generation.token_ids then holds union-vocabulary ids,
    `union_vocabulary.pieces[i]` their bytes; a member's EOS ends the request); generate_ids(),
    score_ids(), score() and CE by drafting need one vocabulary and raise a ValueError.
    """

    def __init__(self, models: Sequence[torch.nn.Module], tokenizer=None, weights=None, *, engine: str = "auto",
                 max_seq_len: int | None = None):
        if isinstance(models, torch.nn.Module):
            models = [models]
        if not isinstance(models, (list, tuple)) or not models:
            raise ValueError("models must be a non-empty list of causal LMs")
        for i, model in enumerate(models):
            if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
                raise TypeError(f"models[{i}] must be a Hugging Face causal LM, got {type(model).__name__}")
        vocab = [vocab_size(m) for m in models]
        tokenizers = None
        if isinstance(tokenizer, (list, tuple)):
            if len(tokenizer) != len(models):
                raise ValueError(f"tokenizer has {len(tokenizer)} entries but there are {len(models)} members")
            for i, tok in enumerate(tokenizer):
                if tok is None or not callable(getattr(tok, "get_vocab", None)):
                    raise TypeError(f"tokenizer[{i}] must be a Hugging Face tokenizer, got {type(tok).__name__}")
            tokenizers = list(tokenizer)
            tokenizer = tokenizers[0]
            if len(set(vocab)) == 1 and _same_vocabulary(tokenizers):
                tokenizers = None  # one vocabulary: the shared case
        if tokenizers is None and len(set(vocab)) != 1:
            raise ValueError(
                f"members' vocabularies differ (output sizes {vocab}): pass one tokenizer per member "
                "(tokenizer=[...]) so they can exchange text"
            )
        self.models = list(models)
        for model in self.models:
            model.eval()
        self._weights = check_weights(weights, len(self.models))
        self.device = next(self.models[0].parameters()).device
        self.max_seq_len, self._limit_reason = check_max_seq_len(max_seq_len, self.models)
        kind = _engine_kind(engine, self.models, self.max_seq_len)
        self.tokenizers = tokenizers
        self.union_vocabulary: UnionVocabulary | None = None
        if tokenizers is None:  # one vocabulary
            self.tokenizer = tokenizer
            self.vocab_size = vocab[0]
            self.eos_token_ids = eos_token_ids(self.models, tokenizer)
            self._engine = _build_engine(kind, self.models, self.device, self.vocab_size, self.max_seq_len)
            self._member_engines = None
        else:  # members with different tokenizers: one engine per member, a union vocabulary
            self.tokenizer = None
            self.vocab_size = None
            self.eos_token_ids = frozenset()
            self.union_vocabulary = UnionVocabulary(
                tokenizers, vocab, [eos_ids_of(m, t) for m, t in zip(self.models, tokenizers)], self.device)
            if kind == "stacked":  # one engine: rows of every member in one grouped forward per layer
                engine = StackedEngine(self.models, self.device, max(vocab), self.max_seq_len, pad_vocab=True)
                self._member_engines = [engine]
                self._mixed_members = StackedMembers(engine, len(self.models))
            else:
                self._member_engines = [HFEngine([m], self.device, v) for m, v in zip(self.models, vocab)]
                self._mixed_members = EngineMembers(self._member_engines, vocab)
            for i, eng in enumerate(self._member_engines):
                if not eng.per_row_positions:  # each member's rows grow by different token counts
                    raise ValueError(
                        f"member {i} cannot read token streams whose rows grow by different numbers of tokens on "
                        f"the {kind} engine (sliding-window or recurrent layers past their window), which members "
                        "with different tokenizers need; use engine='stacked' if it supports the member"
                    )
            self._engine = self._member_engines[0]

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_pretrained(
        cls,
        paths: Sequence[str | os.PathLike],
        weights=None,
        *,
        dtype=None,
        device=None,
        trust_remote_code: bool = False,
        engine: str = "auto",
        max_seq_len: int | None = None,
        placement: str = "local",
        ray_options: dict | None = None,
    ) -> Ensemble:
        """Load members with AutoModelForCausalLM (safetensors only) and their tokenizers (one
        shared tokenizer when their vocabularies agree, else one per member: see Ensemble).

        Args:
            paths: one local folder or hub id per member.
            weights: mixture weights (see Ensemble).
            dtype: torch dtype or its name ("bfloat16", "float16", "float32", "auto") for every
                member; None keeps transformers' default.
            device: one device for all members, or a list with one device per member. A member
                too large for one GPU: "auto" (or "balanced", "balanced_low_0", "sequential") or a
                dict device map {module name: device} shards it with accelerate's device maps
                (`pip install ".[multigpu]"`); a member sharded over several devices runs on the
                "hf" engine (engine="auto" picks it; engine="stacked" is a ValueError), and its
                logits are moved explicitly to the sampling device (member 0's first parameter's).
            trust_remote_code: run custom modelling code from the checkpoints (off unless asked).
            engine, max_seq_len: see Ensemble.
            placement: "local" (this process) or "ray": each member in a named Ray actor, the
                driver runs the step loop; returns a me_runtime.ray_placement.RayEnsemble with
                Ensemble's generation and scoring API (`pip install ".[ray]"`).
            ray_options: placement="ray" only: see RayEnsemble.from_pretrained.
        """
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if placement == "ray":
            try:
                from .ray_placement import RayEnsemble
            except ImportError as e:
                raise ImportError(f'placement="ray" needs ray: pip install ".[ray]" ({e})') from e
            return RayEnsemble.from_pretrained(paths, weights, dtype=dtype, device=device,
                                               trust_remote_code=trust_remote_code, engine=engine,
                                               max_seq_len=max_seq_len, ray_options=ray_options)
        if ray_options is not None:
            raise ValueError("ray_options is only for placement='ray'")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("paths must name at least one model")
        check_weights(weights, len(paths))  # fail before loading anything
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if max_seq_len is not None:
            check_max_seq_len(max_seq_len, [])  # type and range, before loading anything
        devices = list(device) if isinstance(device, (list, tuple)) else [device] * len(paths)
        if len(devices) != len(paths):
            raise ValueError(f"device has {len(devices)} entries but there are {len(paths)} paths")
        if isinstance(dtype, str) and dtype != "auto":
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
            dtype = getattr(torch, dtype)

        tokenizers = []
        for path in paths:
            try:
                tokenizers.append(AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code))
            except (OSError, ValueError):
                tokenizers.append(None)
        known = [t for t in tokenizers if t is not None]
        mixed = known and not _same_vocabulary(known)
        if mixed and len(known) != len(paths):  # fail before loading any weights
            missing = [p for p, t in zip(paths, tokenizers) if t is None]
            raise ValueError(f"members' tokenizers differ, so every member needs its own, but {missing} has none")
        models = []
        for path, dev in zip(paths, devices):
            kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            device_map = device_map_of(dev)
            if device_map is not None:  # accelerate places (shards) the member as it loads
                kwargs["device_map"] = device_map
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if dev is not None and device_map is None:
                model = model.to(dev)
            models.append(model)
        tokenizer = tokenizers if mixed else (known[0] if known else None)
        return cls(models, tokenizer=tokenizer, weights=weights, engine=engine, max_seq_len=max_seq_len)

    # ---------------------------------------------------------------- properties
    @property
    def num_members(self) -> int:
        return len(self.models)

    @property
    def engine(self) -> str:
        """The engine in use: "stacked" or "hf"."""
        return self._engine.name

    def memory_bytes(self) -> dict[str, int | None]:
        """{"weights": bytes of the members' parameters, each storage counted once (the stacked
        engine's stacked tensors ARE the members' parameters: nothing is held twice),
        "kv_cache": bytes of the stacked engine's preallocated caches of the last call (None on
        the hf engine, whose caches grow per call and are freed after it)}."""
        storages = {}
        for model in self.models:
            for p in model.parameters():
                st = p.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        engines = self._member_engines or [self._engine]
        cache = sum(e.cache_bytes for e in engines) if self.engine == "stacked" else None
        return {"weights": sum(storages.values()), "kv_cache": cache}

    def estimate_memory(self, batch_size: int, prompt_len: int, max_new_tokens: int, *, method: str = "me",
                        draft_tokens: int = 0) -> dict[str, int]:
        """Bytes a generate call would allocate beyond the weights, estimated before any work
        (me_runtime/memory.py): {"kv_cache", "logits", "activations", "total"}, for batch_size
        requests whose longest prompt has prompt_len tokens. generate checks it against a CUDA
        device's free memory and refuses a call that cannot fit (pass max_batch_size)."""
        from .stacked_engine import CHUNK_TOKENS

        if self.tokenizers is not None:  # one engine per member, plus CE's [M, B, U] union logits
            parts = [estimate_call_memory([model], engine=self.engine, device=self.device, vocab_size=len(to_union),
                                          batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                          method=method, max_seq_len=self.max_seq_len, chunk_tokens=CHUNK_TOKENS)
                     for model, to_union in zip(self.models, self.union_vocabulary.to_union)]
            total = {key: sum(p[key] for p in parts) for key in parts[0]}
            if method == "ce":
                union = 4 * self.num_members * batch_size * self.union_vocabulary.size
                total["logits"] += union
                total["total"] += union
            return total
        return estimate_call_memory(self.models, engine=self.engine, device=self.device, vocab_size=self.vocab_size,
                                    batch_size=batch_size, prompt_len=prompt_len, max_new_tokens=max_new_tokens,
                                    method=method, draft_tokens=draft_tokens, max_seq_len=self.max_seq_len,
                                    chunk_tokens=CHUNK_TOKENS,
                                    groups=self._engine.group_members if self.engine == "stacked" else None)

    def _check_memory(self, prompts: list[list[int]], max_new_tokens: int, method: str, draft_tokens: int,
                      max_batch_size: int | None) -> None:
        """On a CUDA device: refuse, before any work, a call whose estimated memory exceeds the free
        memory (with a 10% margin), naming the numbers and a max_batch_size that fits."""
        if self.device.type != "cuda":
            return
        free, _ = torch.cuda.mem_get_info(self.device)  # once per call, before the decode loop
        free += self._engine.cache_bytes if self.engine == "stacked" else 0  # reused or freed by the call
        self._refuse_if_too_big(prompts, max_new_tokens, method, draft_tokens, max_batch_size, free)

    def _refuse_if_too_big(self, prompts, max_new_tokens: int, method: str, draft_tokens: int,
                           max_batch_size: int | None, free: int) -> None:
        batch = min(len(prompts), max_batch_size or len(prompts))
        prompt_len = max(len(p) for p in prompts)

        def need(b: int) -> int:
            return self.estimate_memory(b, prompt_len, max_new_tokens, method=method, draft_tokens=draft_tokens)["total"]

        if need(batch) * 1.1 <= free:
            return
        fits = 0
        while fits < batch and need(fits + 1) * 1.1 <= free:
            fits += 1
        hint = f"max_batch_size={fits} fits" if fits else "not even one request fits: shorten max_new_tokens"
        raise ValueError(f"generate: {batch} requests of up to {prompt_len} + {max_new_tokens} tokens need about "
                         f"{need(batch) / 2**30:.2f} GiB beyond the weights but {free / 2**30:.2f} GiB are free on "
                         f"{self.device}; {hint}")

    @property
    def weights(self) -> list[float]:
        """The normalised mixture weights."""
        return list(self._weights)

    def _weights_tensor(self) -> torch.Tensor:
        return torch.tensor(self._weights, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts, **options) -> list[Generation]:
        """Generate a continuation for each text prompt or conversation.

        Args:
            prompts: a list of non-empty strings (a single string is treated as a list of one),
                or of conversations: a conversation is a list of {"role": ..., "content": ...}
                messages (a single conversation is treated as a list of one), which each member
                renders with its own tokenizer's chat template (add_generation_prompt=True); with
                a shared tokenizer that is one rendering for all. ValueError when a member's
                tokenizer has no chat template. Strings and conversations may be mixed.
            method: "me" (one member per step, drawn from the weights), "ce" (every member, the
                mixture sampled), or "single" (member `member` alone).
            max_new_tokens: >= 0.
            temperature, top_k, top_p, min_p: Hugging Face semantics, in that order. ME applies
                them to the chosen member's distribution, CE to the mixture (identical at
                temperature 1 without truncation).
            seed: None (random), an int (request i uses seed + i) or one int per prompt.
            stop: a string or list of strings that end a request when generated.
            selection: "independent" (each request draws its member every step) or "shared"
                (one draw per step for the whole batch; each request's distribution is still
                exact, requests are correlated).
            member: the member used by method="single".
            progress: show a tqdm progress bar.
            draft_tokens: method "ce" only: k >= 0. k > 0 samples CE's exact distribution (every
                transform; CE's greedy tokens at temperature 0) by drafting up to k tokens per
                round with ME and verifying them with every member in one forward (see
                me_runtime.drafting); the number drafted per round adapts to the measured
                acceptance and costs (0 when drafting does not pay). k = 0: plain CE steps.
                The tokens of a request do not depend on k > 0, on the batch or on the rounds.
            draft_member: None (each draft position's member drawn from the weights, as ME
                does) or the member that drafts every token.
            draft_adaptive: True (default): draft 0..draft_tokens tokens per round, as the
                measured acceptance and costs say pays best; False: always draft_tokens (fewer
                only near max_new_tokens).
            truncate: None (default): a request whose prompt + max_new_tokens exceeds max_seq_len
                (the members' context) is refused with a ValueError naming the member and the
                numbers. "left": such a prompt keeps only its last max_seq_len - max_new_tokens
                tokens (what a sliding context would show the members), like lm-eval's HF model.
            max_batch_size: None (one batch), or the most requests decoded at once: larger inputs
                run in consecutive batches of that size (the same tokens: a request's tokens do
                not depend on its batch; except with selection="shared", whose one draw per step
                follows each batch's first request). On a CUDA device a call whose estimated memory
                (estimate_memory) exceeds the free memory is refused before any work, with a
                max_batch_size that fits.
        Returns:
            one Generation per prompt, in order.
        """
        if self.tokenizer is None and self.tokenizers is None:
            raise ValueError("generate() needs a tokenizer; use generate_ids() for token-id prompts")
        prompts = check_prompts(prompts)
        if self.tokenizers is not None:
            return self._generate_mixed(prompts, **options)
        input_ids = [encode_prompt(self.tokenizer, p, "the tokenizer") for p in prompts]
        return self.generate_ids(input_ids, **options)

    def _generate_mixed(
        self, prompts: list, *, method: str = "me", max_new_tokens: int = 128, temperature: float = 1.0,
        top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed=None, stop=None, selection: str = "independent",
        member: int = 0, progress: bool = False, draft_tokens: int = 0, draft_member: int | None = None,
        draft_adaptive: bool = True, truncate: str | None = None, max_batch_size: int | None = None,
    ) -> list[Generation]:
        """generate() for members with different tokenizers (me_runtime/mixed.py)."""
        self._check_method(method, selection, member, max_new_tokens)
        check_drafting(draft_tokens, draft_member, method, self.num_members)
        if draft_tokens > 0:
            raise ValueError("draft_tokens > 0 (CE by drafting) needs members that share one vocabulary; these "
                             "members have different tokenizers (use method='ce' without drafting)")
        if not isinstance(draft_adaptive, bool):
            raise TypeError(f"draft_adaptive must be a bool, got {type(draft_adaptive).__name__}")
        max_batch_size = check_max_batch_size(max_batch_size)
        params = check_sampling(temperature, top_k, top_p, min_p)
        seeds = check_seeds(seed, len(prompts))
        vocab = self.union_vocabulary
        stop_checker = ByteStopChecker(normalize_stop(stop), max(len(p) for p in vocab.pieces))
        member_prompts = []  # [member][request] token ids
        for m, tok in enumerate(self.tokenizers):
            ids = [encode_prompt(tok, p, f"member {m}'s tokenizer") for p in prompts]
            ids = self._truncate(ids, max_new_tokens, truncate)
            self._check_fits([len(p) + max_new_tokens for p in ids], f"generate (member {m}'s tokens)")
            member_prompts.append(ids)
        longest = max(member_prompts, key=lambda ids: max(len(p) for p in ids))
        self._check_memory(longest, max_new_tokens, method, 0, max_batch_size)
        step = max_batch_size or len(prompts)
        results = []
        with torch.inference_mode():
            for lo in range(0, len(prompts), step):
                results += decode_mixed(self._mixed_members, vocab, self._weights_tensor(),
                                        [ids[lo : lo + step] for ids in member_prompts], seeds[lo : lo + step],
                                        method=method, selection=selection, member=member, params=params,
                                        max_new_tokens=max_new_tokens, stop_checker=stop_checker,
                                        max_seq_len=self.max_seq_len, progress=progress)
        generations = []
        for res in results:
            # Bytes to text: a piece sequence may end inside a UTF-8 character (U+FFFD then).
            text = bytes(res.data).decode("utf-8", errors="replace")
            if res.finish_reason == "stop":
                text = stop_checker.truncate(text)
            generations.append(Generation(text, res.token_ids, res.members, res.finish_reason))
        return generations

    def _check_method(self, method: str, selection: str, member: int, max_new_tokens: int) -> None:
        check_generation(method, selection, member, max_new_tokens, self.num_members)

    def _refuse_mixed(self, what: str) -> None:
        if self.tokenizers is not None:
            raise ValueError(
                f"{what} needs members that share one vocabulary; these members have different tokenizers "
                "(use generate() with text prompts)"
            )

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
        """Like generate(), for prompts given as lists of token ids (no tokenizer needed, except
        for `stop` strings). Generation.text is None without a tokenizer."""
        self._refuse_mixed("generate_ids()")
        prompts = self._check_ids(input_ids, "input_ids", allow_empty=False)
        self._check_method(method, selection, member, max_new_tokens)
        check_drafting(draft_tokens, draft_member, method, self.num_members)
        max_batch_size = check_max_batch_size(max_batch_size)
        prompts = self._truncate(prompts, max_new_tokens, truncate)
        if not isinstance(draft_adaptive, bool):
            raise TypeError(f"draft_adaptive must be a bool, got {type(draft_adaptive).__name__}")
        params = check_sampling(temperature, top_k, top_p, min_p)
        seeds = check_seeds(seed, len(prompts))
        self._check_fits([len(p) + max_new_tokens for p in prompts], "generate")
        stop_checker = StopChecker(self.tokenizer, normalize_stop(stop))

        self._check_memory(prompts, max_new_tokens, method, draft_tokens, max_batch_size)

        common = dict(params=params, max_new_tokens=max_new_tokens, eos_ids=self.eos_token_ids,
                      stop_checker=stop_checker, progress=progress)
        step = max_batch_size or len(prompts)
        results = []
        with torch.inference_mode():
            for lo in range(0, len(prompts), step):
                chunk, chunk_seeds = prompts[lo : lo + step], seeds[lo : lo + step]
                if draft_tokens > 0:
                    results += decode_drafting(self._engine, self._weights_tensor(), chunk, chunk_seeds,
                                               draft_tokens=draft_tokens, draft_member=draft_member,
                                               adaptive=draft_adaptive, **common)
                else:
                    results += decode(self._engine, self._weights_tensor(), chunk, chunk_seeds, method=method,
                                      selection=selection, member=member, **common)
        generations = []
        for res in results:
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
                if res.finish_reason == "stop":
                    text = stop_checker.truncate(text)
            generations.append(Generation(text, res.token_ids, res.members, res.finish_reason, res.drafted,
                                          res.accepted))
        return generations

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Exact log-likelihood (natural log) of each continuation given its prompt under the
        mixture: sum over the continuation's tokens of log sum_m w_m p_m(token | prefix).

        The prompt is encoded with the tokenizer's special tokens (BOS), the continuation
        without, and the two are concatenated. An empty continuation scores 0.0.
        """
        if self.tokenizers is not None:
            raise ValueError(
                "score() is not available for members with different tokenizers: under the text exchange the "
                "mixture's probability of a continuation is a sum over every way of splitting it into pieces, "
                "each way giving the members different contexts (exponentially many), and no single "
                "tokenization's likelihood is that probability; score with members that share a vocabulary"
            )
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer; use score_ids() for token ids")
        prompts = check_texts(prompts, "prompts")
        continuations = check_texts(continuations, "continuations", allow_empty_texts=True)
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return self.score_ids(prompt_ids, cont_ids)

    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]], *,
        with_greedy: bool = False,
    ) -> list[float] | list[tuple[float, bool]]:
        """score() for token ids: prompts non-empty, continuations possibly empty.

        with_greedy: return (log-likelihood, is_greedy) pairs instead of floats, where is_greedy
            says that every continuation token is the mixture's argmax given the true prefix
            (the lowest token id on ties, as temperature-0 CE sampling picks), i.e. that greedy
            CE decoding from the prompt would produce the continuation. An empty continuation
            is greedy. This is what lm-evaluation-harness' loglikelihood returns.
        """
        self._refuse_mixed("score_ids()")
        if not isinstance(with_greedy, bool):
            raise TypeError(f"with_greedy must be a bool, got {type(with_greedy).__name__}")
        prompts = self._check_ids(prompt_ids, "prompt_ids", allow_empty=False)
        conts = self._check_ids(continuation_ids, "continuation_ids", allow_empty=True, allow_no_rows=True)
        if len(prompts) != len(conts):
            raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
        self._check_fits([len(p) + len(c) for p, c in zip(prompts, conts)], "score_ids")
        scores: list = [(0.0, True) if with_greedy else 0.0] * len(prompts)
        order = [i for i in range(len(prompts)) if conts[i]]
        if order:
            with torch.inference_mode():
                values = self._engine.score([prompts[i] for i in order], [conts[i] for i in order],
                                            self._weights_tensor(), with_greedy=with_greedy)
            for i, value in zip(order, values):
                scores[i] = value
        return scores

    def score_rolling_ids(
        self,
        token_ids: Sequence[Sequence[int]],
        *,
        max_length: int | None = None,
        prefix_token_id: int | None = None,
        min_context: int = 1,
    ) -> list[float]:
        """Exact mixture log-likelihood (natural log) of each whole sequence, however long.

        Every token is scored once, the first one after ``prefix_token_id``. Sequences longer
        than a window are cut into windows of at most ``max_length`` tokens, each scored with
        score_ids() (one batched call for all windows of all sequences) given as much of the
        preceding text as fits; see me_runtime.windows for the exact windows.

        Args:
            token_ids: a list of non-empty token-id lists.
            max_length: most tokens one forward sees (>= 2); default the smallest
                max_position_embeddings among the members.
            prefix_token_id: the token the first one is conditioned on; default the BOS token of
                the tokenizer, else of the members' generation config / config.
            min_context: least number of preceding tokens for the first scored token of every
                window after the first, in [1, max_length - 1]; 1 (the default) gives disjoint
                windows as lm-evaluation-harness' loglikelihood_rolling, max_length // 2 the
                half-overlapping sliding window.
        Returns:
            one float per sequence: sum over its tokens of log sum_m w_m p_m(token | context).
        """
        self._refuse_mixed("score_rolling_ids()")
        sequences = self._check_ids(token_ids, "token_ids", allow_empty=False)
        if max_length is None:  # the members' context, within max_seq_len
            max_length = self.max_seq_len if self.max_seq_len is not None else default_max_length(self.models)
        elif self.max_seq_len is not None and isinstance(max_length, int) and max_length > self.max_seq_len:
            raise ValueError(f"max_length = {max_length} exceeds the Ensemble's max_seq_len: {self._limit_reason}")
        if prefix_token_id is None:
            prefix_token_id = default_prefix_token_id(self.models, self.tokenizer)
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
        """score_rolling_ids() for strings: each non-empty text is encoded without special tokens
        and scored whole after the tokenizer's BOS token."""
        self._refuse_mixed("score_rolling()")
        if self.tokenizer is None:
            raise ValueError("score_rolling() needs a tokenizer; use score_rolling_ids() for token ids")
        texts = check_texts(texts, "texts")
        # verbose=False: texts longer than the tokenizer's model_max_length are expected here.
        ids = [self.tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"] for t in texts]
        return self.score_rolling_ids(ids, max_length=max_length, min_context=min_context)

    # ---------------------------------------------------------------- helpers
    def _truncate(self, prompts: list[list[int]], max_new_tokens: int, truncate) -> list[list[int]]:
        return truncate_prompts(prompts, max_new_tokens, truncate, self.max_seq_len, self._limit_reason)

    def _check_fits(self, lengths: list[int], what: str) -> None:
        check_fits(lengths, what, self.max_seq_len, self._limit_reason)

    def _check_ids(self, sequences, name: str, *, allow_empty: bool, allow_no_rows: bool = False) -> list[list[int]]:
        return check_token_ids(sequences, name, self.vocab_size, allow_empty=allow_empty, allow_no_rows=allow_no_rows)

    def __repr__(self) -> str:
        names = [type(m).__name__ for m in self.models]
        mixed = ", tokenizers='per member'" if self.tokenizers is not None else ""
        return (f"Ensemble(members={names}, weights={[round(w, 4) for w in self._weights]}, device={self.device}, "
                f"engine={self.engine!r}{mixed})")
