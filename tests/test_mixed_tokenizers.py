"""Members with different tokenizers (me_runtime/vocabularies.py, me_runtime/mixed.py).

The process is written down in me_runtime/mixed.py: members exchange the byte strings ("pieces")
of sampled tokens; member m reads the prompt in its own encoding, then its spelling of every
emitted piece. Here an independent statement of it (plain full forwards, float64) gives the exact
distribution over piece sequences by enumeration, and ME's and CE's samples are tested against
that one distribution; the maps between tokens and pieces are checked byte for byte.
"""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from me_runtime import Ensemble
from me_runtime.vocabularies import END, UnionVocabulary, eos_ids_of, token_bytes

from _sampling_testlib import chi2_check, exact_probs
from tiny_models import byte_level_tokenizer, char_tokenizer, sentencepiece_style_tokenizer, tiny_member

ENGINES = ["hf", "stacked"]
WEIGHTS = [0.6, 0.4]
TEXTS = ["the cat sat on the mat", "def add(a, b):\n    return a + b", "naïve café, déjà vu", "emoji 🙂 and 日本",
         "  leading spaces", "x", "tab\tand\nnewline", "über", "\u00e9t\u00e9"]


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


@pytest.fixture(scope="module")
def tokenizers():
    return [byte_level_tokenizer(), sentencepiece_style_tokenizer()]


def _quiet(model, token_ids):
    """Make tokens all but impossible (their logits far below the others)."""
    with torch.no_grad():
        for t in token_ids:
            model.lm_head.weight[t].zero_()
            if model.lm_head.bias is not None:
                model.lm_head.bias[t] = -1e4
    return model


@pytest.fixture(scope="module")
def members(tokenizers):
    a, b = tokenizers
    return [tiny_member("llama", len(a), seed=3, sharpness=30.0, eos_token_id=a.eos_token_id),
            tiny_member("llama", len(b), seed=4, sharpness=30.0, eos_token_id=b.eos_token_id)]


def _ensemble(members, tokenizers, engine, weights=WEIGHTS):
    return Ensemble(members, tokenizer=tokenizers, weights=weights, engine=engine)


# ------------------------------------------------------------------------------- pieces and maps


def test_token_bytes_spell_the_tokenizers_own_encodings(tokenizers):
    for tok in tokenizers:
        table = token_bytes(tok, len(tok))
        for text in TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            spelled = b"".join(table[i] for i in ids)
            # a SentencePiece-style tokenizer spells its dummy prefix as a space
            assert spelled in (text.encode(), b" " + text.encode()), (text, spelled)
        for i in tok.all_special_ids:
            assert table[i] is None


def test_leading_space_spellings_are_one_piece(tokenizers, members):
    vocab = _ensemble(members, tokenizers, "stacked").union_vocabulary
    a, b = tokenizers
    ga, sb = a.convert_tokens_to_ids("\u0120the"), b.convert_tokens_to_ids("\u2581the")
    assert ga is not None and sb is not None
    ua, ub = vocab.to_union[0][ga].item(), vocab.to_union[1][sb].item()
    assert ua == ub and vocab.pieces[ua] == b" the"
    # byte tokens are pieces of one byte: <0xC3> and the byte-level "Ã" are one piece
    assert vocab.to_union[1][b.convert_tokens_to_ids("<0xC3>")].item() == vocab.to_union[0][a.convert_tokens_to_ids("\u00c3")].item()


def test_union_vocabulary_maps_and_spellings(tokenizers, members):
    vocab = _ensemble(members, tokenizers, "stacked").union_vocabulary
    assert len(set(vocab.pieces)) == vocab.size and vocab.pieces[END] == b""
    for m, tok in enumerate(tokenizers):
        table = token_bytes(tok, len(tok))
        to_union = vocab.to_union[m].tolist()
        eos = eos_ids_of(members[m], tok)
        for t, u in enumerate(to_union):
            if t in eos:
                assert u == END
            elif table[t] is None:
                assert u == -1 and vocab.sample_mask[m][t]
            else:
                assert vocab.pieces[u] == table[t] and not vocab.sample_mask[m][t]
        # every piece spelled faithfully, in one token when the member has a token with its bytes
        own = {}
        for t, piece in enumerate(table):
            if piece is not None and t not in eos:
                own.setdefault(piece, []).append(t)
        for u in range(1, vocab.size):
            ids = vocab.spell(m, torch.tensor([u]), vocab.spelling_lengths[m][u])[0].tolist()
            assert b"".join(table[i] for i in ids) == vocab.pieces[u]
            if vocab.pieces[u] in own:
                assert len(ids) == 1 and ids[0] in own[vocab.pieces[u]]
                if len(own[vocab.pieces[u]]) > 1:  # a text token preferred over a byte-fallback token
                    assert not tok.convert_ids_to_tokens(ids[0]).startswith("<0x")
        assert vocab.spelling_lengths[m][END] == 0


def test_union_logits_is_the_members_piece_distribution(tokenizers, members):
    """softmax over the union of a member's union_logits = its token distribution summed per piece
    (duplicates combined), with its never-sampled tokens removed."""
    vocab = _ensemble(members, tokenizers, "stacked").union_vocabulary
    gen = torch.Generator().manual_seed(0)
    for m, tok in enumerate(tokenizers):
        logits = torch.randn(3, len(tok), generator=gen) * 4
        got = torch.softmax(vocab.union_logits(m, vocab.masked_logits(m, logits)).double(), -1)
        p = torch.softmax(logits.double().masked_fill(vocab.sample_mask[m], float("-inf")), -1)
        want = torch.zeros(3, vocab.size, dtype=torch.float64)
        idx = vocab.to_union[m].clamp(min=0)
        want.index_add_(1, idx, p)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


# ------------------------------------------------------------------------------- the process, exactly


def _contexts(ens, prompt, history):
    """Each member's token context for a prompt and emitted union ids (the process's definition)."""
    vocab = ens.union_vocabulary
    out = []
    for m, tok in enumerate(ens.tokenizers):
        ids = tok(prompt)["input_ids"]
        for u in history:
            ids += vocab.spell(m, torch.tensor([u]), max(vocab.spelling_lengths[m][u], 1))[0, : vocab.spelling_lengths[m][u]].tolist()
        out.append(ids)
    return out


@torch.no_grad()
def reference_next_piece(ens, prompt, history, *, method="me", weights=WEIGHTS, **transform):
    """float64 [U]: the exact next-piece distribution after `history`, from plain full forwards.
    ME: sum_m w_m (member m's transformed token distribution summed per piece); CE: the transform
    applied to the union mixture."""
    vocab = ens.union_vocabulary
    dists = []
    for m, ids in enumerate(_contexts(ens, prompt, history)):
        logits = ens.models[m](input_ids=torch.tensor([ids])).logits[0, -1].double()
        logits = logits.masked_fill(vocab.sample_mask[m], float("-inf"))
        p = torch.from_numpy(exact_probs(logits.numpy(), **(transform if method == "me" else {})))
        piece = torch.zeros(vocab.size, dtype=torch.float64).index_add_(0, vocab.to_union[m].clamp(min=0), p)
        dists.append(piece)
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    mix = sum(wi * d for wi, d in zip(w, dists))
    if method == "ce" and transform:
        mix = torch.from_numpy(exact_probs(torch.log(mix).numpy(), **transform))
    return mix


def test_contexts_are_faithful_encodings_of_the_shared_text(tokenizers, members):
    ens = _ensemble(members, tokenizers, "stacked")
    vocab = ens.union_vocabulary
    rng = random.Random(0)
    for _ in range(20):
        history = [rng.randrange(1, vocab.size) for _ in range(8)]
        text = b"".join(vocab.pieces[u] for u in history)
        for m, ids in enumerate(_contexts(ens, "the cat", history)):
            table = token_bytes(tokenizers[m], len(tokenizers[m]))
            prompt_len = len(tokenizers[m]("the cat")["input_ids"])
            assert b"".join(table[i] for i in ids[prompt_len:]) == text


@pytest.mark.parametrize("engine", ENGINES)
def test_me_and_ce_emit_the_enumerated_two_piece_distribution(tokenizers, members, engine):
    """The exact distribution of the first two pieces, enumerated from the process's definition
    (plain forwards), against 3000 ME draws and 3000 CE draws (chi-square, one batch each)."""
    ens = _ensemble(members, tokenizers, engine)
    prompt = "the cat"
    first = reference_next_piece(ens, prompt, [])
    probs, index = [], {}
    tail = 0.0
    for u1, p1 in enumerate(first.tolist()):
        if p1 == 0:
            continue
        if u1 == END:
            index[(END,)] = len(probs)
            probs.append(p1)
        elif p1 < 1e-4:
            tail += p1
        else:
            second = reference_next_piece(ens, prompt, [u1])
            for u2, p2 in enumerate(second.tolist()):
                if p2 > 0:
                    index[(u1, u2)] = len(probs)
                    probs.append(p1 * p2)
    probs.append(tail)
    assert abs(sum(probs) - 1) < 1e-9
    n = 3000
    for method in ("me", "ce"):
        outs = ens.generate([prompt] * n, method=method, max_new_tokens=2, seed=list(range(n)))
        cats = [index.get(tuple(o.token_ids), len(probs) - 1) for o in outs]
        for o in outs:  # sequences under a tail first piece must really start with one
            if tuple(o.token_ids) not in index:
                assert first[o.token_ids[0]].item() < 1e-4
        chi2_check(cats, np.array(probs), f"{method} two-piece sequences ({engine})")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method,transform", [("ce", dict(temperature=0.7, top_p=0.8)), ("me", dict(top_k=3)),
                                              ("ce", dict(min_p=0.2)), ("me", dict(temperature=1.5, top_p=0.9))])
def test_transforms_apply_to_the_member_me_and_the_union_mixture_ce(tokenizers, members, engine, method, transform):
    ens = _ensemble(members, tokenizers, engine)
    history_prompt = "def add(a, b):"
    want = reference_next_piece(ens, history_prompt, [], method=method, **transform)
    n = 3000
    outs = ens.generate([history_prompt] * n, method=method, max_new_tokens=1, seed=list(range(n)), **transform)
    chi2_check([o.token_ids[0] for o in outs], want.numpy(), f"{method} {transform} ({engine})")


# ------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("engine", ENGINES)
def test_all_weight_on_member_0_is_member_0_alone(tokenizers, members, engine):
    """ME with weights [1, 0] emits member 0's own tokens: the same text as member 0 decoding
    alone (its special tokens made impossible: the mixed process never samples them)."""
    a = tokenizers[0]
    alone_model = _quiet(tiny_member("llama", len(a), seed=3, sharpness=30.0, eos_token_id=a.eos_token_id), [a.bos_token_id])
    mixed = Ensemble([alone_model, members[1]], tokenizer=tokenizers, weights=[1.0, 0.0], engine=engine)
    alone = Ensemble([alone_model], tokenizer=a, engine=engine)
    prompts = ["the cat", "def add(a, b):\n", "naïve"]
    for kw in (dict(), dict(top_p=0.9, temperature=0.8)):
        got = mixed.generate(prompts, method="me", max_new_tokens=10, seed=[5, 6, 7], **kw)
        want = alone.generate(prompts, method="me", max_new_tokens=10, seed=[5, 6, 7], **kw)
        table = token_bytes(a, len(a))
        for g, w in zip(got, want):
            assert g.members == [0] * len(g.members)
            want_bytes = b"".join(table[t] for t in w.token_ids if table[t] is not None)
            got_bytes = b"".join(mixed.union_vocabulary.pieces[u] for u in g.token_ids)
            assert got_bytes == want_bytes and g.finish_reason == w.finish_reason


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["me", "ce", "single"])
def test_batch_invariance(tokenizers, members, engine, method):
    ens = _ensemble(members, tokenizers, engine)
    prompts = ["the cat sat", "x", "def add(a, b):\n    return", "naïve café"]
    batch = ens.generate(prompts, method=method, max_new_tokens=12, seed=[11, 12, 13, 14], member=1)
    for i, p in enumerate(prompts):
        alone = ens.generate([p], method=method, max_new_tokens=12, seed=[11 + i], member=1)[0]
        assert (alone.token_ids, alone.members, alone.text) == (batch[i].token_ids, batch[i].members, batch[i].text)
    chunked = ens.generate(prompts, method=method, max_new_tokens=12, seed=[11, 12, 13, 14], member=1, max_batch_size=3)
    assert [g.token_ids for g in chunked] == [g.token_ids for g in batch]


def test_engines_agree(tokenizers, members):
    # the stacked engine runs both members in one group (vocabularies 300 and 320, padded)
    assert _ensemble(members, tokenizers, "stacked")._engine.group_members == [[0, 1]]
    prompts = ["the cat sat", "def add(a, b):\n", "über"]
    for method in ("me", "ce"):
        outs = [_ensemble(members, tokenizers, e).generate(prompts, method=method, max_new_tokens=10, seed=3)
                for e in ENGINES]
        assert [g.token_ids for g in outs[0]] == [g.token_ids for g in outs[1]]


@pytest.mark.parametrize("engine", ENGINES)
def test_text_is_the_emitted_pieces_and_each_context_spells_it(tokenizers, members, engine):
    ens = _ensemble(members, tokenizers, engine)
    outs = ens.generate(["the cat", "emoji 🙂"], method="me", max_new_tokens=16, seed=0)
    for o in outs:
        data = b"".join(ens.union_vocabulary.pieces[u] for u in o.token_ids)
        assert o.text == data.decode("utf-8", errors="replace")
        assert set(o.members) <= {0, 1}


@pytest.mark.parametrize("engine", ENGINES)
def test_stop_string_across_members(tokenizers, members, engine):
    """A stop string spanning pieces of two different members ends the request there."""
    ens = _ensemble(members, tokenizers, engine)
    vocab = ens.union_vocabulary
    for seed in range(40):
        out = ens.generate(["the cat"], method="me", max_new_tokens=16, seed=seed)[0]
        for i in range(len(out.members) - 1):
            a, b = vocab.pieces[out.token_ids[i]], vocab.pieces[out.token_ids[i + 1]]
            if out.members[i] == out.members[i + 1] or not a or not b:
                continue
            try:
                stop = (a[-1:] + b[:1]).decode("utf-8")
            except UnicodeDecodeError:
                continue
            data = b"".join(vocab.pieces[u] for u in out.token_ids)
            first = data.find(stop.encode())
            if first < len(b"".join(vocab.pieces[u] for u in out.token_ids[:i])):
                continue  # it appears earlier: not the boundary under test
            stopped = ens.generate(["the cat"], method="me", max_new_tokens=16, seed=seed, stop=stop)[0]
            assert stopped.finish_reason == "stop"
            assert stopped.token_ids == out.token_ids[: i + 2]
            assert stopped.text == data[:first].decode("utf-8", errors="replace")
            return
    pytest.fail("no generation had a piece boundary between two members to test")


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("method", ["me", "ce"])
def test_eos_of_either_member_ends_the_request(tokenizers, engine, method):
    a, b = tokenizers
    ma = tiny_member("llama", len(a), seed=3, sharpness=30.0, eos_token_id=a.eos_token_id)
    mb = tiny_member("llama", len(b), seed=4, sharpness=30.0, eos_token_id=b.eos_token_id)
    with torch.no_grad():  # member 1 says EOS (its id 2; member 0's EOS is id 1) almost surely
        mb.lm_head.weight[b.eos_token_id] = mb.lm_head.weight.abs().max() * 50 * torch.sign(mb.lm_head.weight[0] + 1e-9)
    ens = Ensemble([ma, mb], tokenizer=tokenizers, weights=[0.5, 0.5], engine=engine)
    outs = ens.generate(["the cat"] * 16, method=method, max_new_tokens=20, seed=list(range(16)))
    ended = [o for o in outs if o.finish_reason == "eos"]
    assert ended, "no request ended with EOS"
    for o in ended:
        assert o.token_ids[-1] == END and END not in o.token_ids[:-1]
        if method == "me":
            assert o.members[-1] == 1  # only member 1 is likely to say EOS
    for o in outs:
        if o.finish_reason != "eos":
            assert len(o.token_ids) == 20 and END not in o.token_ids


def test_member_context_full_ends_with_length(tokenizers, members):
    """A request also ends ("length") when a member's context cannot take the next piece's
    spelling: the piece is emitted, every member's context before it fits."""
    ens = Ensemble(members, tokenizer=tokenizers, weights=WEIGHTS, engine="stacked", max_seq_len=12)
    outs = ens.generate(["the cat"] * 40, method="ce", max_new_tokens=8, seed=list(range(40)), temperature=1.5)
    early = 0
    for o in outs:
        if o.finish_reason != "length":
            continue
        assert all(len(ids) <= 12 for ids in _contexts(ens, "the cat", o.token_ids[:-1]))
        if len(o.token_ids) < 8:
            early += 1
            assert max(len(ids) for ids in _contexts(ens, "the cat", o.token_ids)) > 12
    assert early > 0, "no request filled a member's context before max_new_tokens"


# ------------------------------------------------------------------------------- chat templates


TEMPLATE_A = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
TEMPLATE_B = "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}"


def test_each_member_renders_the_conversation_with_its_own_template(members, monkeypatch):
    import me_runtime.ensemble as ensemble_module

    a, b = byte_level_tokenizer(), sentencepiece_style_tokenizer()
    a.chat_template, b.chat_template = TEMPLATE_A, TEMPLATE_B
    chat = [{"role": "user", "content": "hello there"}]
    rendered = [t.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for t in (a, b)]
    assert rendered[0] != rendered[1]
    seen = []
    real = ensemble_module.decode_mixed

    def spy(engines, vocab, weights, prompts, *args, **kwargs):
        seen.append(prompts)
        return real(engines, vocab, weights, prompts, *args, **kwargs)

    monkeypatch.setattr(ensemble_module, "decode_mixed", spy)
    ens = Ensemble(members, tokenizer=[a, b], weights=WEIGHTS, engine="stacked")
    outs = ens.generate([chat, "plain"], method="me", max_new_tokens=4, seed=1)
    assert len(outs) == 2 and all(len(o.token_ids) >= 1 for o in outs)
    for m, tok in enumerate((a, b)):
        # the template's text holds its special tokens: none are added again
        assert seen[0][m][0] == tok(rendered[m], add_special_tokens=False)["input_ids"]
        assert seen[0][m][1] == tok("plain")["input_ids"]
    b.chat_template = None
    with pytest.raises(ValueError, match="member 1's tokenizer has none"):
        Ensemble(members, tokenizer=[a, b], engine="stacked").generate(chat)


def test_shared_tokenizer_conversation_equals_its_rendering(members, tokenizers):
    a = byte_level_tokenizer()
    a.chat_template = TEMPLATE_A
    model = members[0]
    ens = Ensemble([model], tokenizer=a, engine="stacked")
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat?"}]
    ids = a(a.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    got = ens.generate([chat, "plain text"], max_new_tokens=6, seed=[2, 3])
    assert got[0].token_ids == ens.generate_ids([ids], max_new_tokens=6, seed=2)[0].token_ids
    assert got[1].token_ids == ens.generate(["plain text"], max_new_tokens=6, seed=3)[0].token_ids
    with pytest.raises(ValueError, match="chat template"):
        Ensemble([model], tokenizer=byte_level_tokenizer(), engine="stacked").generate(chat)
    with pytest.raises(ValueError, match="role"):
        ens.generate([[{"content": "no role"}]])


# ------------------------------------------------------------------------------- errors


def test_errors(tokenizers, members):
    ens = _ensemble(members, tokenizers, "stacked")
    for call, what in [(lambda: ens.generate_ids([[1, 2]]), "generate_ids"),
                       (lambda: ens.score_ids([[1]], [[2]]), "score_ids"),
                       (lambda: ens.score(["a"], ["b"]), "score"),
                       (lambda: ens.score_rolling(["a"]), "score_rolling"),
                       (lambda: ens.score_rolling_ids([[1, 2]]), "score_rolling_ids"),
                       (lambda: ens.generate(["a"], method="ce", draft_tokens=2), "draft")]:
        with pytest.raises(ValueError, match="different tokenizers|vocabulary"):
            call()
    with pytest.raises(ValueError, match="entries"):
        Ensemble(members, tokenizer=[tokenizers[0]])
    with pytest.raises(ValueError, match="one tokenizer per member"):
        Ensemble(members, tokenizer=tokenizers[0])
    with pytest.raises(TypeError, match=r"tokenizer\[1\]"):
        Ensemble(members, tokenizer=[tokenizers[0], None])
    # a tokenizer whose tokens' bytes cannot be read (word level, no byte tokens)
    chars = char_tokenizer()
    with pytest.raises(ValueError, match="byte"):
        Ensemble([members[0], tiny_member("llama", len(chars), seed=1)], tokenizer=[tokenizers[0], chars])
    # the arguments are checked as with one vocabulary
    with pytest.raises(ValueError, match="method"):
        ens.generate(["a"], method="mix")
    with pytest.raises(ValueError, match="max_new_tokens|positions|context"):
        ens.generate(["a"], max_new_tokens=10_000)


def test_a_member_that_cannot_spell_every_byte_is_named(members):
    """A byte-level BPE trained without the full byte alphabet cannot spell the bytes a byte-fallback
    member may emit."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["the cat sat on the mat"] * 4, trainers.BpeTrainer(vocab_size=40, special_tokens=["</s>"],
                                                                                 show_progress=False))
    partial = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    sp = sentencepiece_style_tokenizer()
    with pytest.raises(ValueError, match="member 0's tokenizer cannot spell the byte"):
        Ensemble([tiny_member("llama", len(partial), seed=0), tiny_member("llama", len(sp), seed=1)],
                 tokenizer=[partial, sp])


def test_one_vocabulary_given_per_member_is_the_shared_case(members, tokenizers):
    a = tokenizers[0]
    m2 = tiny_member("llama", len(a), seed=9)
    ens = Ensemble([members[0], m2], tokenizer=[a, byte_level_tokenizer()])
    assert ens.tokenizers is None and ens.tokenizer is a and ens.union_vocabulary is None
    assert ens.generate_ids([[5, 6]], max_new_tokens=2, seed=0)


def test_from_pretrained_loads_members_with_different_tokenizers(tmp_path, tokenizers, members):
    paths = []
    for i, (model, tok) in enumerate(zip(members, tokenizers)):
        path = tmp_path / f"m{i}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        paths.append(str(path))
    ens = Ensemble.from_pretrained(paths, weights=WEIGHTS, engine="stacked")
    assert ens.tokenizers is not None and ens.union_vocabulary.size > 1
    direct = _ensemble(members, tokenizers, "stacked")
    for method in ("me", "ce"):
        got = ens.generate(["the cat"], method=method, max_new_tokens=8, seed=4)[0]
        want = direct.generate(["the cat"], method=method, max_new_tokens=8, seed=4)[0]
        assert got.text == want.text


@pytest.mark.triton_kernels
def test_mixed_on_the_triton_kernels(tokenizers, members, monkeypatch):
    """The decode loop on the interpreted Triton kernels (CI's TRITON_INTERPRET=1) gives the
    compiled CPU kernels' pieces."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs under TRITON_INTERPRET=1 (CI)")
    ens = _ensemble(members, tokenizers, "stacked")
    prompts = ["the cat", "naïve"]
    interpreted = {m: [g.token_ids for g in ens.generate(prompts, method=m, max_new_tokens=4, seed=1)] for m in ("me", "ce")}
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    compiled = {m: [g.token_ids for g in ens.generate(prompts, method=m, max_new_tokens=4, seed=1)] for m in ("me", "ce")}
    assert interpreted == compiled


@pytest.mark.parametrize("engine", ENGINES)
def test_shared_selection_draws_one_member_per_step_for_the_batch(tokenizers, members, engine):
    ens = _ensemble(members, tokenizers, engine)
    outs = ens.generate(["the cat", "x", "naïve café"], method="me", selection="shared", max_new_tokens=10, seed=[1, 2, 3])
    steps = min(len(o.members) for o in outs)
    for t in range(steps):
        assert len({o.members[t] for o in outs}) == 1
    assert len({m for o in outs for m in o.members}) == 2  # both members drawn over the steps
    # the first request's draws follow its own seed, as with one vocabulary
    alone = ens.generate(["the cat"], method="me", selection="shared", max_new_tokens=10, seed=[1])[0]
    assert alone.members[:steps] == outs[0].members[:steps]


def test_the_exchange_device_work_has_no_host_sync(tokenizers, members):
    """A step's device part for mixed tokenizers (masking, the union projection, CE's mixture draw,
    the token -> piece map and every member's spelling append) compiles with fullgraph=True: no
    data-dependent shape, no host synchronisation (the step's one host transfer is outside)."""
    import me_kernels

    vocab = _ensemble(members, tokenizers, "stacked").union_vocabulary
    weights = torch.tensor(WEIGHTS)

    def step(logits_a, logits_b, seeds, gen, buf):
        union_logits = torch.stack([vocab.union_logits(0, vocab.masked_logits(0, logits_a)),
                                    vocab.union_logits(1, vocab.masked_logits(1, logits_b))])
        union = me_kernels.mixture_sample(union_logits, weights, seed=seeds, offset=3)
        tokens = me_kernels.sample(vocab.masked_logits(1, logits_b), seed=seeds, offset=3)
        union_me = vocab.to_union[1][tokens.clamp(min=0)]
        spelled = vocab.spell(0, union.clamp(min=0), vocab.longest_spelling[0])
        cols = gen[:, None] + torch.arange(spelled.shape[1])[None, :]
        buf = buf.scatter(1, cols, spelled)
        offsets = vocab.spelling_offsets[0]
        return union, union_me, buf, gen + offsets[union.clamp(min=0) + 1] - offsets[union.clamp(min=0)]

    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(4, len(tokenizers[0]), generator=gen), torch.randn(4, len(tokenizers[1]), generator=gen),
            torch.arange(4), torch.tensor([0, 2, 1, 5]), torch.zeros(4, 64, dtype=torch.long))
    eager = step(*args)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
    for e, c in zip(eager, compiled):
        assert torch.equal(e, c)


def test_hf_members_without_ragged_rows_are_refused_at_construction(tokenizers):
    """A sliding-window member on the hf engine cannot take rows of different lengths past its
    window: refused when the Ensemble is built, not in the middle of a generation."""
    from tiny_models import other_architecture_members

    a, b = tokenizers
    window = other_architecture_members("mistral-sliding-window", count=1, vocab_size=len(a))[0]
    with pytest.raises(ValueError, match="member 0 cannot read token streams"):
        Ensemble([window, tiny_member("llama", len(b), seed=1)], tokenizer=[a, b], engine="hf")


@pytest.mark.parametrize("method", ["me", "ce"])
def test_other_architecture_member_on_the_hf_engine(tokenizers, method):
    """A GPT-2 member (learned positions, the hf engine's ragged rows) with a Llama member of
    another tokenizer: each request's pieces are the same alone and in a batch."""
    from tiny_models import other_architecture_members

    a, b = tokenizers
    gpt2 = other_architecture_members("gpt2-learned-positions", count=1, vocab_size=len(a))[0]
    ens = Ensemble([gpt2, tiny_member("llama", len(b), seed=1, sharpness=30.0)], tokenizer=[a, b], engine="auto")
    assert ens.engine == "hf"
    prompts = ["the cat sat", "naïve café 🙂", "x"]
    batch = ens.generate(prompts, method=method, max_new_tokens=10, seed=[4, 5, 6])
    for i, p in enumerate(prompts):
        assert ens.generate([p], method=method, max_new_tokens=10, seed=[4 + i])[0].token_ids == batch[i].token_ids


def test_lm_eval_generate_until_with_mixed_tokenizers(tokenizers, members):
    """lm-eval's generate_until runs on members with different tokenizers (each member encodes the
    context itself); greedy requests are CE's greedy pieces; likelihood requests and chat templates
    are refused with the reason."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from me_runtime.harness import EnsembleLM

    ens = _ensemble(members, tokenizers, "stacked")
    lm = EnsembleLM(ens, batch_size=2)
    contexts = ["the cat sat", "def add(a, b):", "naïve café"]
    gen_kwargs = {"until": ["\n\n"], "max_gen_toks": 8}
    got = lm.generate_until([Instance("generate_until", {}, (c, gen_kwargs), i) for i, c in enumerate(contexts)],
                            disable_tqdm=True)
    want = ens.generate(contexts, method="ce", temperature=0.0, max_new_tokens=8, stop=["\n\n"], seed=0)
    assert got == [w.text.split("\n\n")[0] for w in want]
    sampled = {"until": [], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    got = lm.generate_until([Instance("generate_until", {}, (c, sampled), i) for i, c in enumerate(contexts)],
                            disable_tqdm=True)
    want = ens.generate(contexts, method="me", max_new_tokens=6, seed=[0, 1, 2])
    assert got == [w.text for w in want]
    with pytest.raises(ValueError, match="share one tokenizer"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("the", " cat"), 0)])
    with pytest.raises(ValueError, match="share one tokenizer"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the cat",), 0)])
    with pytest.raises(ValueError, match="chat templates"):
        lm.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="draft_tokens"):
        EnsembleLM(ens, method="ce", draft_tokens=2)


def test_cuda_graph_path_with_mixed_tokenizers(tokenizers, members, eager_cuda_graphs):
    """The stacked engine's CUDA-graph logic (bucketed rows and slots, padded no-op rows, caches kept
    across calls; eager replays on the CPU) with every member's stream in one M x B batch whose rows
    share slots: the same pieces as the plain path."""
    graphed = _ensemble(members, tokenizers, "stacked")
    graphed._engine.cuda_graphs = True
    plain = _ensemble(members, tokenizers, "stacked")
    prompts = ["the cat sat on", "x", "def add(a, b):\n    return", "naïve", "über alles"]
    for method in ("me", "ce", "single"):
        for batch in (prompts, prompts[:2], prompts):
            seeds = list(range(1, len(batch) + 1))
            a = graphed.generate(batch, method=method, max_new_tokens=12, seed=seeds, member=1)
            b = plain.generate(batch, method=method, max_new_tokens=12, seed=seeds, member=1)
            assert [(g.token_ids, g.members, g.finish_reason) for g in a] == [
                (g.token_ids, g.members, g.finish_reason) for g in b]
    engine = graphed._engine
    assert engine.forwards and engine.forwards[0] is not None and len(engine.forwards[0].graphs) > 2
