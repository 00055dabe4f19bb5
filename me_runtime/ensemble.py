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

import inspect
import math
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import torch

import me_kernels

from .decode import SamplingParams, decode
from .stopping import StopChecker, eos_token_ids, normalize_stop

METHODS = ("me", "ce", "single")
SELECTIONS = ("independent", "shared")
_SEED_LIMIT = 2**63


@dataclass
class Generation:
    """One request's output.

    text: the decoded new tokens (special tokens skipped), cut before the first stop string
        when finish_reason is "stop"; None when the Ensemble has no tokenizer.
    token_ids: every generated token id, including the EOS token or the tokens that spell the
        stop string.
    members: for each generated token, the member that produced it (-1 for CE).
    finish_reason: "eos" | "stop" | "length".
    """

    text: str | None
    token_ids: list[int]
    members: list[int]
    finish_reason: str


def _vocab_size(model: torch.nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(config.vocab_size)


def _check_weights(weights, num_members: int) -> list[float]:
    if weights is None:
        return [1.0 / num_members] * num_members
    if isinstance(weights, torch.Tensor):
        weights = weights.detach().cpu().tolist()
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a sequence of {num_members} numbers, got {type(weights).__name__}")
    if len(weights) != num_members:
        raise ValueError(f"weights has {len(weights)} entries but the ensemble has {num_members} members")
    values = []
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"weights[{i}] must be a number, got {type(w).__name__}")
        if math.isnan(w) or math.isinf(w) or w < 0:
            raise ValueError(f"weights[{i}] = {w} must be finite and >= 0")
        values.append(float(w))
    total = sum(values)
    if total <= 0:
        raise ValueError("weights must not be all zero")
    return [w / total for w in values]


def _check_sampling(temperature, top_k, top_p, min_p) -> SamplingParams:
    # One rule per argument, shared with me_kernels (temperature=inf is accepted: the limit,
    # uniform over the kept set).
    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)


def _check_seeds(seed, count: int) -> list[int]:
    if seed is None:
        base = secrets.randbelow(_SEED_LIMIT - count)
        return [base + i for i in range(count)]
    if isinstance(seed, bool):
        raise TypeError("seed must be None, an int or a list of ints, got bool")
    if isinstance(seed, int):
        seeds = [seed + i for i in range(count)]
    elif isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"seed has {len(seed)} entries but there are {count} prompts")
        if any(isinstance(s, bool) or not isinstance(s, int) for s in seed):
            raise TypeError("seed list entries must be ints")
        seeds = list(seed)
    else:
        raise TypeError(f"seed must be None, an int or a list of ints, got {type(seed).__name__}")
    for s in seeds:
        if not 0 <= s < _SEED_LIMIT:
            raise ValueError(f"seeds must be in [0, 2**63), got {s} (request i uses seed + i)")
    return seeds


class Ensemble:
    """A mixture of Hugging Face causal LMs sharing one vocabulary.

    Args:
        models: loaded causal LMs (AutoModelForCausalLM-like: forward(input_ids, attention_mask,
            position_ids, past_key_values, use_cache) -> .logits, .past_key_values). Members may
            sit on different devices; sampling happens on the first member's device.
        tokenizer: shared tokenizer, or None for token-id use (generate_ids / score_ids).
        weights: mixture weights, one per member, non-negative, not all zero (normalised);
            uniform by default.
    """

    def __init__(self, models: Sequence[torch.nn.Module], tokenizer=None, weights=None):
        if isinstance(models, torch.nn.Module):
            models = [models]
        if not isinstance(models, (list, tuple)) or not models:
            raise ValueError("models must be a non-empty list of causal LMs")
        for i, model in enumerate(models):
            if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
                raise TypeError(f"models[{i}] must be a Hugging Face causal LM, got {type(model).__name__}")
        vocab = [_vocab_size(m) for m in models]
        if len(set(vocab)) != 1:
            raise ValueError(
                f"members' vocabularies differ (output sizes {vocab}); heterogeneous vocabularies are "
                "not supported yet: every member must share one tokenizer and vocabulary"
            )
        self.models = list(models)
        for model in self.models:
            model.eval()
        self.tokenizer = tokenizer
        self.vocab_size = vocab[0]
        self._weights = _check_weights(weights, len(self.models))
        self.device = next(self.models[0].parameters()).device
        self.eos_token_ids = eos_token_ids(self.models, tokenizer)
        self._keeps_logits = all("logits_to_keep" in inspect.signature(m.forward).parameters for m in self.models)

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
    ) -> Ensemble:
        """Load members with AutoModelForCausalLM (safetensors only) and the shared tokenizer.

        Args:
            paths: one local folder or hub id per member.
            weights: mixture weights (see Ensemble).
            dtype: torch dtype or its name ("bfloat16", "float16", "float32", "auto") for every
                member; None keeps transformers' default.
            device: one device for all members, or a list with one device per member.
            trust_remote_code: run custom modelling code from the checkpoints (off unless asked).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [os.fspath(p) for p in paths]
        if not paths:
            raise ValueError("paths must name at least one model")
        _check_weights(weights, len(paths))  # fail before loading anything
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
        if known and any(t.get_vocab() != known[0].get_vocab() for t in known[1:]):
            raise ValueError(
                "members' tokenizers have different vocabularies; heterogeneous vocabularies are not "
                "supported yet"
            )
        models = []
        for path, dev in zip(paths, devices):
            kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
            if dtype is not None:
                kwargs["dtype"] = dtype
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            if dev is not None:
                model = model.to(dev)
            models.append(model)
        return cls(models, tokenizer=known[0] if known else None, weights=weights)

    # ---------------------------------------------------------------- properties
    @property
    def num_members(self) -> int:
        return len(self.models)

    @property
    def weights(self) -> list[float]:
        """The normalised mixture weights."""
        return list(self._weights)

    def _weights_tensor(self) -> torch.Tensor:
        return torch.tensor(self._weights, dtype=torch.float32, device=self.device)

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: str | Sequence[str], **options) -> list[Generation]:
        """Generate a continuation for each text prompt.

        Args:
            prompts: a list of non-empty strings (a single string is treated as a list of one).
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
        Returns:
            one Generation per prompt, in order.
        """
        if self.tokenizer is None:
            raise ValueError("generate() needs a tokenizer; use generate_ids() for token-id prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise TypeError(f"prompts[{i}] must be a string, got {type(p).__name__}")
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
        input_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
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
    ) -> list[Generation]:
        """Like generate(), for prompts given as lists of token ids (no tokenizer needed, except
        for `stop` strings). Generation.text is None without a tokenizer."""
        prompts = self._check_ids(input_ids, "input_ids", allow_empty=False)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if isinstance(member, bool) or not isinstance(member, int):
            raise TypeError(f"member must be an int, got {type(member).__name__}")
        if not 0 <= member < self.num_members:
            raise ValueError(f"member must be in [0, {self.num_members}), got {member}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = _check_sampling(temperature, top_k, top_p, min_p)
        seeds = _check_seeds(seed, len(prompts))
        stop_checker = StopChecker(self.tokenizer, normalize_stop(stop))

        with torch.inference_mode():
            results = decode(
                self.models,
                self._weights_tensor(),
                prompts,
                seeds,
                method=method,
                selection=selection,
                member=member,
                params=params,
                max_new_tokens=max_new_tokens,
                eos_ids=self.eos_token_ids,
                stop_checker=stop_checker,
                progress=progress,
            )
        generations = []
        for res in results:
            text = None
            if self.tokenizer is not None:
                text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
                if res.finish_reason == "stop":
                    text = stop_checker.truncate(text)
            generations.append(Generation(text, res.token_ids, res.members, res.finish_reason))
        return generations

    # ---------------------------------------------------------------- scoring
    def score(self, prompts: Sequence[str], continuations: Sequence[str]) -> list[float]:
        """Exact log-likelihood (natural log) of each continuation given its prompt under the
        mixture: sum over the continuation's tokens of log sum_m w_m p_m(token | prefix).

        The prompt is encoded with the tokenizer's special tokens (BOS), the continuation
        without, and the two are concatenated. An empty continuation scores 0.0.
        """
        if self.tokenizer is None:
            raise ValueError("score() needs a tokenizer; use score_ids() for token ids")
        for name, texts in (("prompts", prompts), ("continuations", continuations)):
            if not isinstance(texts, (list, tuple)):
                raise TypeError(f"{name} must be a list of strings")
            for i, s in enumerate(texts):
                if not isinstance(s, str):
                    raise TypeError(f"{name}[{i}] must be a string, got {type(s).__name__}")
        if len(prompts) != len(continuations):
            raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
        for i, p in enumerate(prompts):
            if not p:
                raise ValueError(f"prompts[{i}] is empty")
        prompt_ids = [self.tokenizer(p)["input_ids"] for p in prompts]
        cont_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
        return self.score_ids(prompt_ids, cont_ids)

    def score_ids(
        self, prompt_ids: Sequence[Sequence[int]], continuation_ids: Sequence[Sequence[int]]
    ) -> list[float]:
        """score() for token ids: prompts non-empty, continuations possibly empty."""
        prompts = self._check_ids(prompt_ids, "prompt_ids", allow_empty=False)
        conts = self._check_ids(continuation_ids, "continuation_ids", allow_empty=True, allow_no_rows=True)
        if len(prompts) != len(conts):
            raise ValueError(f"{len(prompts)} prompts but {len(conts)} continuations")
        scores = [0.0] * len(prompts)
        order = [i for i in range(len(prompts)) if conts[i]]
        weights = self._weights_tensor()
        with torch.inference_mode():
            for chunk in self._score_chunks(order, prompts, conts):
                for i, value in zip(chunk, self._score_chunk([prompts[i] for i in chunk], [conts[i] for i in chunk], weights)):
                    scores[i] = value
        return scores

    def _score_chunks(self, order, prompts, conts, max_tokens=16384, max_logit_bytes=1 << 30):
        """Split rows into chunks whose forward holds at most max_tokens (padded) tokens and
        whose kept logits, all members together, take at most max_logit_bytes."""

        def too_big(rows, width, cmax):
            positions = cmax + 1 if self._keeps_logits else width
            logit_bytes = rows * positions * self.vocab_size * 4 * (self.num_members + 1)
            return rows * width > max_tokens or logit_bytes > max_logit_bytes

        chunk, width, cmax = [], 0, 0
        for i in order:
            row_width, row_cont = len(prompts[i]) + len(conts[i]), len(conts[i])
            if chunk and too_big(len(chunk) + 1, max(width, row_width), max(cmax, row_cont)):
                yield chunk
                chunk, width, cmax = [], 0, 0
            chunk.append(i)
            width, cmax = max(width, row_width), max(cmax, row_cont)
        if chunk:
            yield chunk

    def _score_chunk(self, prompts, conts, weights) -> list[float]:
        seqs = [list(p) + list(c) for p, c in zip(prompts, conts)]
        width = max(len(s) for s in seqs)
        cmax = max(len(c) for c in conts)
        pad = [width - len(s) for s in seqs]
        ids = torch.tensor([[0] * n + s for n, s in zip(pad, seqs)], dtype=torch.long)
        mask = (torch.arange(width)[None, :] >= torch.tensor(pad)[:, None]).long()
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        member_logits = []
        for model in self.models:
            dev = next(model.parameters()).device
            kwargs = {"logits_to_keep": cmax + 1} if self._keeps_logits else {}
            out = model(
                input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=positions.to(dev), use_cache=False, **kwargs
            )
            # the logits at the cmax positions that predict the last cmax tokens
            member_logits.append(out.logits[:, -cmax - 1 : -1, :].to(self.device))
        rows = len(seqs)
        stacked = torch.stack(member_logits).reshape(self.num_members, rows * cmax, -1)
        logmix = me_kernels.mixture_logprobs(stacked, weights).reshape(rows, cmax, -1)
        targets = ids[:, width - cmax :].to(self.device)
        token_lp = logmix.gather(2, targets[:, :, None]).squeeze(2).double()
        valid = torch.arange(cmax, device=self.device)[None, :] >= torch.tensor(
            [cmax - len(c) for c in conts], device=self.device
        )[:, None]
        return token_lp.masked_fill(~valid, 0.0).sum(1).tolist()

    # ---------------------------------------------------------------- helpers
    def _check_ids(self, sequences, name: str, *, allow_empty: bool, allow_no_rows: bool = False) -> list[list[int]]:
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        if not isinstance(sequences, (list, tuple)) or (not sequences and not allow_no_rows):
            raise ValueError(f"{name} must be a non-empty list of token-id lists")
        out = []
        for i, seq in enumerate(sequences):
            if isinstance(seq, torch.Tensor):
                seq = seq.tolist()
            if not isinstance(seq, (list, tuple)):
                raise TypeError(f"{name}[{i}] must be a list of ints, got {type(seq).__name__}")
            if not seq and not allow_empty:
                raise ValueError(f"{name}[{i}] is empty")
            for tok in seq:
                if isinstance(tok, bool) or not isinstance(tok, int):
                    raise TypeError(f"{name}[{i}] must hold ints, got {type(tok).__name__}")
                if not 0 <= tok < self.vocab_size:
                    raise ValueError(f"{name}[{i}] holds token id {tok}, outside [0, {self.vocab_size})")
            out.append(list(seq))
        return out

    def __repr__(self) -> str:
        names = [type(m).__name__ for m in self.models]
        return f"Ensemble(members={names}, weights={[round(w, 4) for w in self._weights]}, device={self.device})"
