"""No deprecated transformers / torch calls: everything the runtime does (generation on both
engines, CE by drafting with cache rollback, scoring, rolling scores), with every Python warning
recorded and transformers' own logger captured (it reports many deprecations with
logger.warning_once, not with warnings.warn). pyproject.toml's filterwarnings also turns a
DeprecationWarning / FutureWarning raised from our packages into an error in every test."""
from __future__ import annotations

import logging
import warnings

import pytest
import torch

from me_runtime import Ensemble

from tiny_models import char_tokenizer, tiny_member


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.mark.parametrize("engine", ["hf", "stacked"])
def test_runtime_makes_no_deprecated_call(engine, caplog):
    tok = char_tokenizer()
    members = [tiny_member("llama", len(tok), seed=1), tiny_member("qwen2", len(tok), seed=2)]
    ens = Ensemble(members, tok, engine=engine)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
        warnings.simplefilter("always")
        ens.generate(["ab cd", "e"], method="me", max_new_tokens=6, seed=0)
        ens.generate(["ab cd", "e"], method="ce", max_new_tokens=6, seed=0, top_p=0.9)
        ens.generate(["ab cd", "e"], method="ce", max_new_tokens=6, seed=0, draft_tokens=3, draft_adaptive=False)
        ens.score(["ab"], [" cd"])
        ens.score_rolling(["abc def ghi"], max_length=6)
    ours = [w for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))
            and "torch/jit" not in str(w.filename)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    deprecated = [r.getMessage() for r in caplog.records if "deprecat" in r.getMessage().lower()]
    assert not deprecated, deprecated
    assert torch.is_grad_enabled()  # the calls leave no global state behind
