"""Train the demo members (code, prose, blend) on CPU and write them as Hugging Face folders.

    nice python -m scripts.demo.train --out me_runtime/demo/members --seed 0   # from the repository root
    nice python -m scripts.demo.train --out me_runtime/demo/members --seed 0 --members blend \
        --tokenizer metaspace --vocab-size 3072 --threads 1

Steps (all deterministic for a given seed, corpus, thread count and torch version):
  1. gather the corpora and their held-out split (scripts/demo/corpus.py);
  2. train one tokenizer on equal amounts of training code and prose, shared by every member of
     the run: ``--tokenizer bytelevel`` (the default) is a GPT-2-style byte-level BPE, the one
     code and prose share (identical vocabularies are what a token-level ensemble needs);
     ``--tokenizer metaspace`` is a SentencePiece-style BPE with byte fallback as Llama-2 /
     Mistral ship it, the one blend has (so that mixed-tokenizer ensembles can be tested);
  3. train each member on its corpus (code: Python code; prose: English books; blend: equal
     bytes of both, scripts/demo/corpus.py blend_corpus) at the same time in one process each
     with one torch thread (``--no-parallel`` trains them one after the other): the same
     LlamaForCausalLM shape, AdamW with linear warmup + cosine decay, gradient clipping, bf16
     autocast on CPU, packed 512-token windows in a seeded random order;
  4. write ``<out>/<member>`` (bf16 safetensors, config, generation config, tokenizer files,
     training.json with the settings, losses and times).

Measured for code and prose with the defaults on a shared 2-core machine (load 2-4 from other
jobs, this run at nice 10): 17 min 55 s wall in total, 1,177 CPU-seconds (EVAL.md). Reruns with
the same seed, thread count and torch version give bit-identical weights. The blend run's time
is in EVAL.md too.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from . import MEMBER_NAMES, MEMBERS_DIR
from . import corpus as corpus_lib

# Specials of the shared byte-level tokenizer (code, prose): <pad>/<s>/</s> = 0/1/2.
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
# Specials of the SentencePiece-style tokenizer (blend), in Llama-2's order: <unk>/<s>/</s> =
# 0/1/2 and no padding token. <s> and </s> keep the ids 1 and 2, so the training stream, the
# model config and generation use the same BOS/EOS ids with either kind; id 0 means different
# things in the two kinds, on purpose (a mixed-tokenizer ensemble must not compare ids).
METASPACE_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
METASPACE_REPLACEMENT = "\u2581"  # "▁", SentencePiece's visible space
BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]  # byte fallback pieces, ids 3..258
# Like SentencePiece's character_coverage (Llama-2 used 0.99995): the rarest characters stay out
# of the alphabet and are encoded as their UTF-8 bytes.
METASPACE_CHARACTER_COVERAGE = 0.99995
TOKENIZER_KINDS = ("bytelevel", "metaspace")


def pad_id_of(kind: str) -> int | None:
    """The padding token id of a tokenizer kind (the Llama-style one has none, like Llama-2)."""
    return PAD_ID if kind == "bytelevel" else None


def _log(msg: str) -> None:
    print(f"[train] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ tokenizer


def train_tokenizer(texts, vocab_size: int, kind: str = "bytelevel"):
    """Train the tokenizer of ``kind`` ("bytelevel" or "metaspace") with ``vocab_size`` entries
    on ``texts`` (a sequence of str); see train_bytelevel_tokenizer / train_metaspace_tokenizer."""
    if kind == "bytelevel":
        return train_bytelevel_tokenizer(texts, vocab_size)
    if kind == "metaspace":
        return train_metaspace_tokenizer(texts, vocab_size)
    raise ValueError(f"tokenizer kind must be one of {TOKENIZER_KINDS}, got {kind!r}")


def train_bytelevel_tokenizer(texts, vocab_size: int):
    """Byte-level BPE over ``texts`` (an iterable of str) with <pad>/<s>/</s> as ids 0/1/2.
    Encoding prepends <s> (documents start with it in training); decoding is byte-exact."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    return tok


def _alphabet_size(texts, coverage: float) -> int:
    """How many of the most frequent characters of ``texts`` it takes to cover ``coverage`` of
    all their characters (spaces count as the "▁" they become)."""
    counts = Counter()
    for text in texts:
        counts.update(text.replace(" ", METASPACE_REPLACEMENT))
    total, covered = sum(counts.values()), 0
    for size, (_, n) in enumerate(counts.most_common(), start=1):
        covered += n
        if covered >= coverage * total:
            return size
    return len(counts)


def train_metaspace_tokenizer(texts, vocab_size: int):
    """SentencePiece-style BPE as Llama-2 / Mistral ship it in tokenizer.json, trained on ``texts``
    (a sequence of str) with ``tokenizers``:

    * normalizer Prepend("▁") and pre-tokenizer Metaspace("▁", split before each "▁"): every
      text gets one "▁" in front and its spaces become "▁", as Llama-2's SentencePiece model does
      (add_dummy_prefix). Mistral's Metaspace(prepend_scheme="first") alone would skip the "▁"
      when the text already starts with a space, so " x" would encode like "x" and decode to
      "x": texts starting with spaces (indented code) would not round-trip;
    * BPE with byte_fallback: the vocabulary is <unk>, <s>, </s> (ids 0, 1, 2), the 256 byte
      tokens <0x00>..<0xFF> (ids 3..258), then the learned pieces; a character outside the
      alphabet is encoded as the byte tokens of its UTF-8 form, so <unk> never appears;
    * decoder Replace("▁", " "), ByteFallback, Fuse, Strip(left 1): decode(encode(t)) == t for
      every text without a literal "▁" (that one decodes to a space, as in Llama-2). Decoding a
      piece cut from the middle of a text drops its first space, as Llama-2's tokenizer does;
    * encoding prepends <s>, like the byte-level tokenizer.
    """
    from tokenizers import (AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                            trainers)

    n_fixed = len(METASPACE_SPECIAL_TOKENS) + len(BYTE_TOKENS)
    if vocab_size <= n_fixed:
        raise ValueError(f"a metaspace vocabulary needs more than {n_fixed} entries, got {vocab_size}")
    texts = list(texts)
    normalizer = normalizers.Prepend(METASPACE_REPLACEMENT)
    # The normalizer already put the "▁" in front; split=True keeps merges inside one word (with
    # its leading "▁"), as SentencePiece does.
    pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE_REPLACEMENT, prepend_scheme="never", split=True)
    # The trainer learns the specials, the alphabet and the merges; the byte tokens are put into
    # the vocabulary afterwards (ids right after the specials, where Llama-2 has them), which is
    # why it is asked for 256 entries fewer.
    draft = Tokenizer(models.BPE(unk_token="<unk>"))
    draft.normalizer, draft.pre_tokenizer = normalizer, pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        min_frequency=2,
        special_tokens=METASPACE_SPECIAL_TOKENS,
        limit_alphabet=_alphabet_size(texts, METASPACE_CHARACTER_COVERAGE),
        show_progress=False,
    )
    draft.train_from_iterator(texts, trainer=trainer)
    trained = json.loads(draft.to_str())["model"]
    learned = sorted(((i, t) for t, i in trained["vocab"].items() if t not in METASPACE_SPECIAL_TOKENS))
    clash = set(BYTE_TOKENS) & {t for _, t in learned}
    assert not clash, f"learned pieces spelled like byte tokens: {sorted(clash)}"
    vocab = {t: i for i, t in enumerate(METASPACE_SPECIAL_TOKENS + BYTE_TOKENS + [t for _, t in learned])}
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in METASPACE_SPECIAL_TOKENS])
    tok.normalizer, tok.pre_tokenizer = normalizer, pre_tokenizer
    tok.decoder = decoders.Sequence([
        decoders.Replace(METASPACE_REPLACEMENT, " "),
        decoders.ByteFallback(),
        decoders.Fuse(),
        decoders.Strip(content=" ", left=1, right=0),  # the "▁" prepended to the text
    ])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert tok.get_vocab_size() == len(vocab) <= vocab_size
    assert [tok.token_to_id(t) for t in METASPACE_SPECIAL_TOKENS] == [0, BOS_ID, EOS_ID]
    assert tok.token_to_id("<0x00>") == len(METASPACE_SPECIAL_TOKENS)
    return tok


def hf_tokenizer(tok, context: int, kind: str = "bytelevel"):
    """The ``tokenizers`` object wrapped for transformers (saved as tokenizer.json + config)."""
    from transformers import PreTrainedTokenizerFast

    specials = ({"pad_token": "<pad>"} if kind == "bytelevel" else {"unk_token": "<unk>"})
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=context,
        clean_up_tokenization_spaces=False,
        **specials,
    )


def tokenize_documents(tok, docs) -> torch.Tensor:
    """One int32 stream: <s> doc </s> <s> doc </s> ... in document order."""
    encodings = tok.encode_batch([d.text for d in docs], add_special_tokens=False)
    total = sum(len(e.ids) + 2 for e in encodings)
    stream = torch.empty(total, dtype=torch.int32)
    pos = 0
    for e in encodings:
        n = len(e.ids)
        stream[pos] = BOS_ID
        stream[pos + 1 : pos + 1 + n] = torch.tensor(e.ids, dtype=torch.int32)
        stream[pos + 1 + n] = EOS_ID
        pos += n + 2
    return stream


# ---------------------------------------------------------------------------------------- model


def model_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=pad_id_of(args.tokenizer),
        initializer_range=0.02,
    )


class Batches:
    """Packed training windows of ``context + 1`` tokens cut from the token stream at a random
    offset, visited in a random order; a new offset and order each epoch. The generator is
    seeded, so the sequence of batches depends only on the seed and the stream."""

    def __init__(self, stream: torch.Tensor, context: int, batch_size: int, seed: int):
        self.stream, self.context, self.batch_size = stream, context, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.epoch, self.order, self.cursor = -1, None, 0
        self._new_epoch()

    def _new_epoch(self):
        self.epoch += 1
        offset = int(torch.randint(0, self.context, (1,), generator=self.gen))
        n = (len(self.stream) - offset - 1) // self.context
        starts = offset + torch.arange(n) * self.context
        self.order = starts[torch.randperm(n, generator=self.gen)]
        self.cursor = 0

    def next(self) -> torch.Tensor:
        if self.cursor + self.batch_size > len(self.order):
            self._new_epoch()
        starts = self.order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        idx = starts[:, None] + torch.arange(self.context + 1)[None, :]
        return self.stream[idx].long()


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def heldout_loss(model, stream: torch.Tensor, context: int, max_windows: int = 16) -> float:
    """Mean next-token loss (nats) over up to ``max_windows`` consecutive held-out windows."""
    model.eval()
    n = min(max_windows, (len(stream) - 1) // context)
    idx = torch.arange(n)[:, None] * context + torch.arange(context + 1)[None, :]
    batch = stream[idx].long()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch[:, :-1]).logits
    model.train()
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten()).item()


def train_member(name: str, member_index: int, train_stream, heldout_stream, args):
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed * 1000 + member_index)
    model = LlamaForCausalLM(model_config(args))
    n_params = sum(p.numel() for p in model.parameters())
    _log(f"{name}: {n_params / 1e6:.2f}M parameters, {len(train_stream):,} training tokens")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    batches = Batches(train_stream, args.context, args.batch_size, seed=args.seed * 1000 + member_index)
    log = []
    t0 = time.perf_counter()
    model.train()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = batches.next()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - t0
            tokens = (step + 1) * args.batch_size * args.context
            entry = {"step": step, "loss": round(loss.item(), 4), "grad_norm": round(float(grad_norm), 3),
                     "lr": round(lr_at(step, args), 6), "elapsed_s": round(elapsed, 1)}
            if step % args.eval_every == 0 or step == args.steps - 1:
                entry["heldout_loss"] = round(heldout_loss(model, heldout_stream, args.context), 4)
            log.append(entry)
            _log(f"{name} step {step}/{args.steps} loss {entry['loss']:.3f}"
                 + (f" heldout {entry['heldout_loss']:.3f}" if "heldout_loss" in entry else "")
                 + f" lr {entry['lr']:.2e} |g| {entry['grad_norm']:.2f} {tokens / elapsed:.0f} tok/s"
                 f" epoch {batches.epoch}")
    wall = time.perf_counter() - t0
    return model, {"parameters": n_params, "train_wall_s": round(wall, 1),
                   "epochs_started": batches.epoch + 1, "log": log}


def _train_and_save(name, index, train_stream, heldout_stream, args, meta, tokenizer_json) -> str:
    from tokenizers import Tokenizer

    torch.set_num_threads(args.threads)
    hf_tok = hf_tokenizer(Tokenizer.from_str(tokenizer_json), args.context, args.tokenizer)
    model, info = train_member(name, index, train_stream, heldout_stream, args)
    info.update(meta)
    info["threads"] = torch.get_num_threads()
    save_member(model, hf_tok, args.out / name, info)
    return str(args.out / name)


def save_member(model, hf_tok, folder: Path, info: dict):
    from transformers import GenerationConfig

    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_file():
            stale.unlink()
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                               pad_token_id=model.config.pad_token_id)
    model.save_pretrained(folder, safe_serialization=True)
    hf_tok.save_pretrained(folder)
    # transformers 5 writes its own class name; PreTrainedTokenizerFast is understood by 4.x too.
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    for f in folder.iterdir():
        f.chmod(0o644)  # save_pretrained writes the weights 0600 (temporary file); package data is 0644
    (folder / "training.json").write_text(json.dumps(info, indent=1) + "\n")


# ------------------------------------------------------------------------------------------ CLI


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="Train demo members (code, prose, blend) on CPU.")
    ap.add_argument("--out", type=Path, default=MEMBERS_DIR,
                    help=f"where to write the member folders (default {MEMBERS_DIR})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=corpus_lib.DEFAULT_CACHE, help="corpus download folder")
    ap.add_argument("--members", default="code,prose",
                    help=f"which of {', '.join(MEMBER_NAMES)} to train (comma list); they share one tokenizer")
    ap.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                    help="train the members at the same time, one process each (default)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per member process (default: 1 with --parallel, else 2)")
    # tokenizer / model shape (the same for every member of a run)
    ap.add_argument("--tokenizer", choices=TOKENIZER_KINDS, default="bytelevel",
                    help="bytelevel: GPT-2-style byte-level BPE with <pad>/<s>/</s> (code, prose); "
                         "metaspace: SentencePiece-style BPE with byte fallback and <unk>/<s>/</s>, "
                         "as Llama-2 / Mistral (blend)")
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden-size", type=int, default=256)
    ap.add_argument("--intermediate-size", type=int, default=704)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tokenizer-bytes", type=int, default=4_000_000,
                    help="training bytes of each domain used to train the tokenizer")
    # optimisation (per member)
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr", type=float, default=1e-4)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=300)
    return ap.parse_args(argv)


def _take_bytes(docs, budget: int):
    """Documents spread evenly over ``docs`` (every k-th) adding up to about ``budget`` bytes."""
    total = sum(len(d.text.encode("utf-8")) for d in docs)
    stride = max(1, round(total / budget))
    return docs[::stride]


def main(argv=None):
    args = parse_args(argv)
    wanted = [m.strip() for m in args.members.split(",") if m.strip()]
    bad = [m for m in wanted if m not in MEMBER_NAMES]
    if bad or not wanted:
        raise ValueError(f"--members must name some of {MEMBER_NAMES}, got {args.members!r}")
    if args.threads is None:
        args.threads = 1 if args.parallel else 2
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)

    corpora = corpus_lib.load_corpora(args.cache)
    sizes = corpus_lib.summary(corpora)
    _log(f"corpora: {json.dumps(sizes)}")

    t_tok = time.perf_counter()
    tok_docs = (_take_bytes(corpora["code"]["train"], args.tokenizer_bytes)
                + _take_bytes(corpora["prose"]["train"], args.tokenizer_bytes))
    tok = train_tokenizer((d.text for d in tok_docs), args.vocab_size, args.tokenizer)
    if tok.get_vocab_size() != args.vocab_size:
        _log(f"WARNING: the tokenizer has {tok.get_vocab_size()} entries, the model {args.vocab_size}")
    # Each member's documents: code and prose are the two domains, blend mixes them 50/50.
    member_corpora = {**{domain: corpora[domain] for domain in ("code", "prose")},
                      "blend": corpus_lib.blend_corpus(corpora)}
    sizes = corpus_lib.summary(member_corpora)
    streams = {
        name: {part: tokenize_documents(tok, member_corpora[name][part]) for part in ("train", "heldout")}
        for name in MEMBER_NAMES if name in wanted
    }
    tok_s = time.perf_counter() - t_tok
    for name, stream in streams.items():
        nbytes = sizes[name]["train"]["bytes"]
        _log(f"{name}: {len(stream['train']):,} train tokens ({nbytes / len(stream['train']):.2f} bytes/token)")
    _log(f"tokenizer + tokenization: {tok_s:.1f} s")

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out", "cache")}
    jobs = []
    for index, name in enumerate(MEMBER_NAMES):
        if name in wanted:
            meta = {"member": name, "member_index": index, "settings": settings, "corpus": sizes[name],
                    "train_tokens": len(streams[name]["train"]), "torch": torch.__version__,
                    "python": sys.version.split()[0], "tokenizer_s": round(tok_s, 1)}
            jobs.append((name, index, streams[name]["train"], streams[name]["heldout"], args, meta))
    if args.parallel and len(jobs) > 1:
        # One process per member, each on its own core: no intra-op thread synchronisation, which
        # on a busy machine costs far more than it gains, and the members are independent anyway.
        with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(_train_and_save, *job, tok.to_str()) for job in jobs]
            results = [f.result() for f in futures]
    else:
        results = [_train_and_save(*job, tok.to_str()) for job in jobs]
    for folder in results:
        _log(f"wrote {folder}")

    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(u.ru_utime + u.ru_stime for u in usage) - cpu_start.ru_utime - cpu_start.ru_stime
    _log(f"total wall {time.perf_counter() - t_start:.1f} s, CPU (user+sys, all processes) {cpu:.1f} s")


if __name__ == "__main__":
    main()
