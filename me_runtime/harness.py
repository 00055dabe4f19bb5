"""Evaluate an Ensemble with lm-evaluation-harness: `EnsembleLM`, registered as "me-ensemble".

    from lm_eval import simple_evaluate
    from me_runtime import Ensemble, demo_members
    from me_runtime.harness import EnsembleLM

    lm = EnsembleLM(Ensemble.from_pretrained(demo_members()), method="me", batch_size=8)
    simple_evaluate(model=lm, tasks=["arc_easy"])

or from the command line, with lm-eval's own CLI (`me-eval` is `lm_eval` with this model
registered; lm-eval splits model_args at commas, so lists use "|"):

    me-eval --model me-ensemble --model_args members=PATH_A|PATH_B,weights=0.5|0.5,method=me \\
        --tasks arc_easy --batch_size 8

What each request type computes:
  * loglikelihood: the exact mixture log-likelihood sum_t log sum_m w_m p_m(x_t | prefix) of the
    continuation (the same for ME and CE: both sample from that mixture), and is_greedy = every
    continuation token is the mixture's argmax given the true prefix. Context and continuation
    are tokenized as lm-eval's Hugging Face model does (`TemplateLM._encode_pair`: trailing
    spaces of the context move to the continuation, the joined text is encoded and split at the
    context's length; an empty context becomes the prefix token, BOS else EOS).
  * loglikelihood_rolling: the exact mixture log-likelihood of the whole text after the prefix
    token, in disjoint windows of `max_length` tokens (Ensemble.score_rolling_ids).
  * generate_until: Ensemble.generate_ids with the request's `until` as stop strings (cut from
    the returned text), `max_gen_toks`, `temperature`, `top_k`, `top_p`, `min_p`. Greedy
    requests (do_sample=False or temperature=0, lm-eval's default) decode the argmax of the
    MIXTURE (CE greedy) whatever `method` is: ME's temperature-0 rule would take the argmax of
    one drawn member, which is not the ensemble's greedy output. Sampled requests use `method`,
    `selection` and `draft_tokens` as given; request i of a call samples with seed `seed + i`,
    so results do not depend on batching or sorting.

Members with different tokenizers (Ensemble(models, tokenizer=[...])): generate_until works (each
context is given to Ensemble.generate as text, so every member encodes it with its own tokenizer
and keeps its own last tokens when it is too long); loglikelihood, loglikelihood_rolling and chat
templates raise a ValueError saying why (the mixture likelihood of a text is not defined under the
text exchange; lm-eval renders a chat with one template). Member 0's tokenizer serves lm-eval's
own needs (EOS id, lengths for batching).

Requests are sorted longest first (a batch's first request is its longest, so a batch too big
fails at once rather than at the end) and answered in their original order. batch_size is the
number of forward rows per batch: requests, or for loglikelihood_rolling the texts' windows.
batch_size="auto" takes, per batch, as many rows as keep rows x longest sequence (context +
continuation, context + max_gen_toks, or a window) within AUTO_BATCH_TOKENS positions, at most
max_batch_size rows; the engines further split a batch's scoring forwards to bound the memory
of the logits.

Contexts longer than the members' context are cut from the left like lm-eval's Hugging Face
model does: a loglikelihood request keeps its last `max_length` tokens (the whole continuation
and as much context as fits), a generate_until request keeps the last
`max_length - max_gen_toks` context tokens.

lm-eval is an optional dependency (`pip install ".[eval]"`); nothing else in the package
imports this module.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the optional extra is missing
    raise ImportError(
        'me_runtime.harness needs lm-evaluation-harness: install the extra with pip install ".[eval]" '
        "(or pip install 'lm-eval>=0.4.8')"
    ) from exc
import torch
from tqdm import tqdm

from .arguments import check_drafting, check_sampling
from .ensemble import ENGINES, SELECTIONS, Ensemble
from .windows import rolling_windows

logger = logging.getLogger(__name__)

# Methods a harness run can use: the loglikelihoods are the mixture's for both; a single member
# is weights with one non-zero entry (e.g. weights=1|0).
HARNESS_METHODS = ("me", "ce")
# batch_size="auto": rows x longest sequence per batch (and per forward of the scoring engines).
AUTO_BATCH_TOKENS = 16384
AUTO_MAX_BATCH = 256
# Used only when no member's config gives a context length (lm-eval's HF model's default too).
DEFAULT_MAX_LENGTH = 2048
DEFAULT_MAX_GEN_TOKS = 256

# model_args that build the Ensemble (the rest go to EnsembleLM).
LOAD_ARGS = ("members", "weights", "dtype", "device", "engine", "max_seq_len", "trust_remote_code", "placement")
LM_ARGS = ("method", "selection", "batch_size", "max_batch_size", "max_length", "max_gen_toks", "seed",
           "draft_tokens", "draft_member", "top_k", "top_p", "min_p")
# generate_until gen_kwargs understood (lm-eval's aliases of max_gen_toks included).
MAX_TOKENS_ALIASES = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
GEN_KWARGS = ("until", "do_sample", "temperature", "top_k", "top_p", "min_p", *MAX_TOKENS_ALIASES)


def _check_positive_int(name: str, value, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _split_list(value) -> list:
    """A model_args list: "a|b|c" -> ["a", "b", "c"]; a single value (lm-eval may have turned it
    into a number already) -> [value]."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [part.strip() for part in value.split("|") if part.strip()]
    return [value]


def _parse_weights(value) -> list[float]:
    weights = []
    for part in _split_list(value):
        try:
            weights.append(float(part))
        except (TypeError, ValueError):
            raise ValueError(
                f"weights must be numbers separated by '|' (e.g. weights=0.5|0.5), got {value!r}"
            ) from None
    return weights


def _sorted_batches(lengths: Sequence[int], batch_size, max_batch_size: int,
                    rows: Sequence[int] | None = None) -> list[list[int]]:
    """Indices sorted longest first (stable), cut into batches of at most batch_size forward rows
    (item i brings rows[i] of them, 1 by default; a batch holds at least one item), or for
    "auto" of as many rows as keep rows x the batch's first (longest) length within
    AUTO_BATCH_TOKENS, at most max_batch_size."""
    rows = [1] * len(lengths) if rows is None else rows
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, batch, used, budget = [], [], 0, 0
    for i in order:
        if batch and used + rows[i] > budget:
            batches.append(batch)
            batch, used = [], 0
        if not batch:
            if batch_size == "auto":
                budget = max(1, min(max_batch_size, AUTO_BATCH_TOKENS // max(1, lengths[i])))
            else:
                budget = batch_size
        batch.append(i)
        used += rows[i]
    if batch:
        batches.append(batch)
    return batches


@register_model("me-ensemble")
class EnsembleLM(TemplateLM):
    """An Ensemble as an lm-evaluation-harness model (see the module docstring).

    Args:
        ensemble: a me_runtime.Ensemble with a tokenizer (shared by all members), or with one
            tokenizer per member (generate_until only: see the module docstring).
        method: "me" or "ce": how sampled generate_until requests are decoded. Loglikelihoods are
            the exact mixture's and greedy generation is the mixture's argmax for both.
        selection: "independent" | "shared" (see Ensemble.generate), for method "me".
        batch_size: forward rows per batch (requests; the texts' windows for
            loglikelihood_rolling), an int >= 1, or "auto" (see the module docstring).
        max_batch_size: the cap of batch_size="auto" (default AUTO_MAX_BATCH).
        max_length: most tokens a request may span (context + continuation, or context +
            max_gen_toks); default the Ensemble's max_seq_len (the members' context), else 2048.
        max_gen_toks: generate_until's default number of new tokens (a request's own
            max_gen_toks wins); default min(256, max_length // 2).
        seed: request i of a generate_until call samples with seed + i.
        draft_tokens, draft_member: CE by drafting (method "ce"; see Ensemble.generate), also
            used for greedy requests with method "ce".
        top_k, top_p, min_p: defaults for sampled requests that do not set them.
    """

    def __init__(
        self,
        ensemble: Ensemble,
        *,
        method: str = "me",
        selection: str = "independent",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int | None = None,
        seed: int = 0,
        draft_tokens: int = 0,
        draft_member: int | None = None,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
    ):
        super().__init__()
        # an Ensemble, or its placement="ray" counterpart (checked by name: ray stays unimported)
        if not isinstance(ensemble, Ensemble) and type(ensemble).__module__ != "me_runtime.ray_placement":
            raise TypeError(f"ensemble must be a me_runtime.Ensemble, got {type(ensemble).__name__}")
        self.mixed = getattr(ensemble, "tokenizers", None) is not None
        if self.mixed and draft_tokens:
            raise ValueError("draft_tokens needs members that share one vocabulary; these members have different "
                             "tokenizers")
        if ensemble.tokenizer is None and not self.mixed:
            raise ValueError("EnsembleLM needs an Ensemble with a tokenizer (lm-eval requests are text)")
        if method not in HARNESS_METHODS:
            raise ValueError(
                f"method must be one of {HARNESS_METHODS}, got {method!r} (a single member: weights with one "
                "non-zero entry, e.g. weights=1|0)"
            )
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if isinstance(batch_size, str) and batch_size.strip().lower() == "auto":
            batch_size = "auto"
        elif isinstance(batch_size, str) and batch_size.strip().isdigit():
            batch_size = int(batch_size)
        elif isinstance(batch_size, str):
            raise ValueError(f"batch_size must be an int >= 1 or 'auto', got {batch_size!r}")
        if batch_size != "auto":
            _check_positive_int("batch_size", batch_size)
        if max_batch_size is None:
            max_batch_size = AUTO_MAX_BATCH
        _check_positive_int("max_batch_size", max_batch_size)
        if max_length is None:
            max_length = ensemble.max_seq_len or DEFAULT_MAX_LENGTH
        _check_positive_int("max_length", max_length, minimum=2)
        if ensemble.max_seq_len is not None and max_length > ensemble.max_seq_len:
            raise ValueError(f"max_length = {max_length} exceeds the Ensemble's max_seq_len = {ensemble.max_seq_len}")
        if max_gen_toks is None:
            max_gen_toks = min(DEFAULT_MAX_GEN_TOKS, max_length // 2)
        _check_positive_int("max_gen_toks", max_gen_toks, minimum=0)
        if max_gen_toks >= max_length:
            raise ValueError(
                f"max_gen_toks = {max_gen_toks} leaves no room for a context within max_length = {max_length}"
            )
        _check_positive_int("seed", seed, minimum=0)
        self.ensemble = ensemble
        # members with different tokenizers: member 0's serves lm-eval's own needs (lengths, EOS);
        # generation encodes each prompt with every member's tokenizer (Ensemble.generate)
        self.tokenizer = ensemble.tokenizers[0] if self.mixed else ensemble.tokenizer
        self.method, self.selection = method, selection
        self.batch_size, self.max_batch_size = batch_size, max_batch_size
        self.max_length, self.max_gen_toks = max_length, max_gen_toks
        self.seed = seed
        self.draft = dict(draft_tokens=draft_tokens, draft_member=draft_member)
        self.sampling_defaults = dict(top_k=top_k, top_p=top_p, min_p=min_p)
        # Checked now rather than at the first sampled request, with the Ensemble's own rules.
        check_drafting(draft_tokens, draft_member, method, ensemble.num_members)
        check_sampling(1.0, top_k, top_p, min_p)

    # ---------------------------------------------------------------- construction from model_args
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EnsembleLM:
        """Build from lm-eval's --model_args: `members=PATH_A|PATH_B,weights=0.5|0.5,method=me,...`
        (see LOAD_ARGS and LM_ARGS). lm-eval's own --batch_size / --device fill in what
        model_args leaves unset."""
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> EnsembleLM:
        """create_from_arg_string() for a dict of model_args. Every argument is checked before
        any member is loaded."""
        args = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is None or key in args:
                continue
            if key == "device" and str(value).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's CLI passes --device's default (CUDA) when none was given: on a machine
                # without CUDA run on the CPU, as lm-eval's HF model does (model_args' device is
                # taken as given).
                logger.warning("me-ensemble: device %r requested by lm-eval but CUDA is not available; "
                               "using the CPU", value)
                continue
            args[key] = value
        unknown = sorted(set(args) - set(LOAD_ARGS) - set(LM_ARGS))
        if unknown:
            raise ValueError(f"unknown model_args {unknown}; known: {sorted(LOAD_ARGS + LM_ARGS)}")
        if "members" not in args:
            raise ValueError("model_args needs members=PATH_A|PATH_B (one local folder or hub id per member)")
        members = [str(m) for m in _split_list(args.pop("members"))]
        if not members:
            raise ValueError("members names no model (use members=PATH_A|PATH_B)")
        weights = args.pop("weights", None)
        if weights is not None:
            weights = _parse_weights(weights)
            if len(weights) != len(members):
                raise ValueError(f"weights has {len(weights)} entries but members has {len(members)}: {members}")
        method = args.get("method", "me")
        if method not in HARNESS_METHODS:
            raise ValueError(f"method must be one of {HARNESS_METHODS}, got {method!r}")
        if args.get("selection", "independent") not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {args['selection']!r}")
        engine = args.pop("engine", "auto")
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        device = args.pop("device", None)
        if isinstance(device, str) and "|" in device:
            device = _split_list(device)
        ensemble = Ensemble.from_pretrained(
            members, weights, dtype=args.pop("dtype", None), device=device, engine=engine,
            max_seq_len=args.pop("max_seq_len", None), trust_remote_code=bool(args.pop("trust_remote_code", False)),
            placement=args.pop("placement", "local"),
        )
        return cls(ensemble, **args)

    # ---------------------------------------------------------------- tokenizer
    @property
    def eot_token_id(self) -> int:
        if self.tokenizer.eos_token_id is not None:
            return int(self.tokenizer.eos_token_id)
        return min(self.ensemble.eos_token_ids)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context stands for: BOS, else EOS (as lm-eval's HF model)."""
        if self.tokenizer.bos_token_id is not None:
            return int(self.tokenizer.bos_token_id)
        return self.eot_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def device(self):
        return self.ensemble.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """The tokenizer's encoding; add_special_tokens=None: the tokenizer's default, except for a
        string that already starts with the prefix (BOS) token's text."""
        if add_special_tokens is None:
            bos = self.tokenizer.decode([self.prefix_token_id])
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens, verbose=False)["input_ids"]

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _refuse_mixed(self, what: str) -> None:
        if self.mixed:
            raise ValueError(
                f"{what} needs members that share one tokenizer: with different tokenizers the mixture likelihood "
                "of a continuation is not defined (Ensemble.score explains why); generate_until tasks work"
            )

    def _template(self, chat_template=True):
        if self.mixed:
            raise ValueError(
                "chat templates with members of different tokenizers: lm-eval renders a chat into one string with "
                "one template, which would show the other members foreign markers; run without "
                "--apply_chat_template, or use Ensemble.generate with conversations (each member renders its own)"
            )
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(
                f"member 0's tokenizer ({self.tokenizer.name_or_path}) has no chat template; run without "
                "--apply_chat_template, or use instruct members whose tokenizer has one"
            )
        if isinstance(template, dict):  # named templates
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ValueError(f"chat template {name!r} not among the tokenizer's: {sorted(template)}")
            template = template[name]
        return template

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The chat template of member 0's tokenizer (all members share it), None when not asked for."""
        if chat_template is False or chat_template is None:
            return None
        return self._template(chat_template)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The chat rendered with member 0's tokenizer's chat template (ValueError without one)."""
        template = self._template()
        return self.tokenizer.apply_chat_template(
            chat_history, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    # ---------------------------------------------------------------- batching
    def _run_batches(self, lengths: Sequence[int], run: Callable[[list[int]], list], *, desc: str,
                     disable_tqdm: bool, rows: Sequence[int] | None = None) -> list:
        """run(indices) over longest-first batches; the results in the original order."""
        results: list = [None] * len(lengths)
        with tqdm(total=len(lengths), desc=desc, disable=disable_tqdm or self.rank != 0) as bar:
            for batch in _sorted_batches(lengths, self.batch_size, self.max_batch_size, rows):
                for i, value in zip(batch, run(batch)):
                    results[i] = value
                bar.update(len(batch))
        return results

    # ---------------------------------------------------------------- loglikelihood
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._refuse_mixed("loglikelihood")
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation), context_ids, continuation_ids) from TemplateLM's
        loglikelihood -> (exact mixture log-likelihood, is_greedy) for each."""
        contexts, continuations = [], []
        for _, context_ids, continuation_ids in requests:
            continuation_ids = list(continuation_ids)
            context_ids = list(context_ids) or [self.prefix_token_id]
            room = self.max_length - len(continuation_ids)
            if room < 1:
                raise ValueError(
                    f"a continuation of {len(continuation_ids)} tokens leaves no context within max_length = "
                    f"{self.max_length}"
                )
            contexts.append(context_ids[-room:])  # left truncation, as lm-eval's HF model
            continuations.append(continuation_ids)

        def run(batch):
            return self.ensemble.score_ids([contexts[i] for i in batch], [continuations[i] for i in batch],
                                           with_greedy=True)

        lengths = [len(c) + len(x) for c, x in zip(contexts, continuations)]
        results = self._run_batches(lengths, run, desc="Running loglikelihood requests", disable_tqdm=disable_tqdm)
        results = [(float(lp), bool(greedy)) for lp, greedy in results]
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        self._refuse_mixed("loglikelihood_rolling")
        """The exact mixture log-likelihood of each whole text (encoded without special tokens),
        scored after the prefix token in disjoint windows of max_length tokens."""
        texts = [request.args[0] for request in requests]
        ids = [self.tok_encode(text, add_special_tokens=False) for text in texts]

        def run(batch):
            scored = [i for i in batch if ids[i]]
            values = dict.fromkeys(batch, 0.0)  # an empty text has log-likelihood 0
            if scored:
                totals = self.ensemble.score_rolling_ids([ids[i] for i in scored], max_length=self.max_length,
                                                         prefix_token_id=self.prefix_token_id)
                values.update(zip(scored, totals))
            return [values[i] for i in batch]

        # a text is scored in windows (one forward row each): batch_size counts windows, as in
        # lm-eval's HF model, and texts are sorted by their longest window
        windows = [len(rolling_windows(len(x), self.max_length)) if x else 0 for x in ids]
        lengths = [min(len(x) + 1, self.max_length) for x in ids]
        results = self._run_batches(lengths, run, desc="Running loglikelihood_rolling requests",
                                    disable_tqdm=disable_tqdm, rows=windows)
        for text, total in zip(texts, results):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return results

    # ---------------------------------------------------------------- generation
    def _generation_options(self, gen_kwargs: dict) -> tuple[dict, list[str], int]:
        """lm-eval gen_kwargs -> (Ensemble.generate_ids options but seed, stop strings, max_gen_toks)."""
        if not isinstance(gen_kwargs, dict):
            raise TypeError(f"generate_until expects a dict of gen_kwargs, got {type(gen_kwargs).__name__}")
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown:
            raise ValueError(f"generate_until: gen_kwargs {unknown} are not supported; supported: {sorted(GEN_KWARGS)}")
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        until = [s for s in until if s]  # lm-eval may pass "" (an empty EOS text): nothing to stop at
        max_gen_toks = next((gen_kwargs[k] for k in MAX_TOKENS_ALIASES if gen_kwargs.get(k) is not None),
                            self.max_gen_toks)
        max_gen_toks = _check_positive_int("max_gen_toks", int(max_gen_toks), minimum=0)
        if max_gen_toks >= self.max_length:
            raise ValueError(f"max_gen_toks = {max_gen_toks} leaves no room for a context within max_length = "
                             f"{self.max_length}")
        do_sample = gen_kwargs.get("do_sample")
        temperature = gen_kwargs.get("temperature")
        if temperature is None:  # sampling without a temperature: Hugging Face's default, 1
            temperature = 1.0 if do_sample else 0.0
        temperature = float(temperature)
        if do_sample is False or temperature == 0.0:
            # greedy = the mixture's argmax (CE greedy), whatever the method
            options = dict(method="ce", temperature=0.0, **self.draft)
        else:
            options = dict(method=self.method, selection=self.selection, temperature=temperature)
            for key, default in self.sampling_defaults.items():
                options[key] = gen_kwargs.get(key, default)
            if self.method == "ce":
                options.update(self.draft)
        return options, until, max_gen_toks

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text of each (context, gen_kwargs) request, cut before the first `until`
        string; requests with equal gen_kwargs are batched together."""
        results: list = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            key = json.dumps(request.args[1], sort_keys=True, default=repr)
            groups.setdefault(key, []).append(i)
        with tqdm(total=len(requests), desc="Running generate_until requests",
                  disable=disable_tqdm or self.rank != 0) as bar:
            for members in groups.values():
                options, until, max_gen_toks = self._generation_options(requests[members[0]].args[1])
                room = self.max_length - max_gen_toks
                prompts = []
                for i in members:
                    ids = self.tok_encode(requests[i].args[0]) or [self.prefix_token_id]
                    prompts.append(ids[-room:])  # left truncation, as lm-eval's HF model
                lengths = [len(p) + max_gen_toks for p in prompts]
                for batch in _sorted_batches(lengths, self.batch_size, self.max_batch_size):
                    if self.mixed:  # text prompts: every member encodes (and left-truncates) its own
                        outs = self.ensemble.generate(
                            [requests[members[j]].args[0] for j in batch], max_new_tokens=max_gen_toks,
                            stop=until or None, seed=[self.seed + members[j] for j in batch], truncate="left",
                            **options,
                        )
                    else:
                        outs = self.ensemble.generate_ids(
                            [prompts[j] for j in batch], max_new_tokens=max_gen_toks, stop=until or None,
                            seed=[self.seed + members[j] for j in batch], **options,
                        )
                    for j, out in zip(batch, outs):
                        text = out.text
                        for stop in until:  # as lm-eval's HF model: cut at the first of each stop string
                            text = text.split(stop)[0]
                        i = members[j]
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(batch))
        return results


def main() -> None:
    """`me-eval`: lm-eval's command line with the "me-ensemble" model registered (same flags)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = ["EnsembleLM", "main", "AUTO_BATCH_TOKENS"]

if __name__ == "__main__":  # python -m me_runtime.harness
    main()
