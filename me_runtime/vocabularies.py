"""Members with different tokenizers: the byte string of every token, the union vocabulary, and
each member's spelling of every piece.

The unit the members exchange is a *piece*: the byte string of one sampled token. The union
vocabulary holds every distinct piece of every member (plus one END entry for the members' EOS
tokens); `to_union[m]` maps member m's token ids to union ids and `spelling[m]` maps union ids to
member m's token ids (the tokens member m appends to its context when that piece is emitted).
Everything is built once per Ensemble and lives on the device: a decode step maps and appends
with gathers, with no tokenizer call and no Python loop over the vocabulary.

Rules (README "Members with different tokenizers" states them for users):

* Bytes, not text: a piece is bytes, so a byte-fallback token (Llama's <0xE2>) or a byte-level
  token holding part of a UTF-8 character is a piece like any other. Every member must be able to
  spell every byte (byte-level BPE, or byte fallback): checked at construction, with an error
  naming the member otherwise.
* Leading spaces: Ġ (byte-level BPE) and ▁ (SentencePiece) are both the byte 0x20, so "Ġworld"
  and "▁world" are one piece, b" world".
* Special tokens: a member's EOS ids (its tokenizer's EOS and its generation config's) map to the
  union's END entry: sampling it ends the request ("eos"). Every other special token (BOS, PAD,
  UNK, chat markers that are not EOS ids, rows of the output layer beyond the tokenizer) has no
  piece: it is never sampled (its logit is -inf for ME and CE alike, i.e. the member's
  distribution is renormalised over its text tokens).
* Spelling: member m appends, for an emitted piece, (1) its own token with exactly those bytes when
  it has one (preferring a text token over a byte-fallback token), else (2) its tokenizer's
  encoding of the piece's text when that encoding spells exactly the piece (a SentencePiece
  tokenizer's dummy-prefix "▁" is dropped when it is a token of its own), else (3) the greedy
  longest-match of the piece's bytes over its tokens (byte tokens at worst). So every member's
  context always decodes to exactly the shared text, and it is a function of the emitted pieces
  only (the member that sampled a piece appends the same tokens as any other member), which is
  what makes ME and CE emit the same distribution over piece sequences. The price: a member may
  read a text in pieces its own tokenizer would have merged ("hel" + "lo"); the prompt is encoded
  by every member's own tokenizer (with its own BOS).
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import torch

END = 0  # union id of "a member's EOS token": ends the request
_BYTE_FALLBACK_TOKENS = {f"<0x{b:02X}>": b for b in range(256)}
# Texts every member's token bytes must spell back exactly (checks the byte table we derive).
_ROUND_TRIP_TEXTS = ("Hello world, it's 3:14 pm.", "  two  spaces\tand a tab\n", "def f(x):\n    return x ** 2",
                     "naïve café — “quotes” €5", "日本語のテキスト", "emoji 🙂 ok")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _decoder_kinds(tokenizer) -> set[str]:
    """The `tokenizers` decoder types of a Hugging Face tokenizer (a Sequence's parts included)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} has no `tokenizers` backend: cannot read its tokens' bytes")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    kinds, stack = set(), [decoder]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            kinds.add(d.get("type"))
            stack.extend(d.get("decoders") or [])
    return kinds


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens (added tokens marked special and the named ones)."""
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def token_bytes(tokenizer, size: int) -> list[bytes | None]:
    """The byte string of each token id in [0, size) (size: the member's output vocabulary);
    None for special tokens and ids the tokenizer does not have.

    Byte-level BPE tokens (GPT-2, Llama 3, Qwen) map each character back to its byte;
    SentencePiece-style tokens read ▁ as a space and <0xNN> as the byte NN. Raises ValueError for
    a tokenizer of another kind (WordPiece...) or when the derived bytes do not spell its own
    encodings back exactly.
    """
    kinds = _decoder_kinds(tokenizer)
    vocab = tokenizer.get_vocab()
    specials = special_token_ids(tokenizer)
    added = {int(i): t.content for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    out: list[bytes | None] = [None] * size
    if "ByteLevel" in kinds:
        table = _byte_level_table()

        def spell(token: str) -> bytes | None:
            try:
                return bytes(table[c] for c in token)
            except KeyError:
                return None
    elif kinds & {"Metaspace", "Replace", "ByteFallback"}:
        def spell(token: str) -> bytes | None:
            if token in _BYTE_FALLBACK_TOKENS:
                return bytes([_BYTE_FALLBACK_TOKENS[token]])
            return token.replace("\u2581", " ").encode("utf-8")
    else:
        raise ValueError(
            f"cannot read the byte strings of a tokenizer whose decoder is {sorted(k for k in kinds if k)} (byte-level "
            "BPE and SentencePiece-style tokenizers are supported)"
        )
    for token, i in vocab.items():
        if not 0 <= i < size or i in specials:
            continue
        out[i] = added[i].encode("utf-8") if i in added else spell(token)
        if out[i] == b"":
            out[i] = None
    for text in _ROUND_TRIP_TEXTS:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if any(i >= size or out[i] is None for i in ids) or tokenizer.decode(ids) != text:
            continue  # a text this tokenizer cannot encode (unknown or dropped characters)
        spelled = b"".join(out[i] for i in ids)
        if spelled not in (text.encode("utf-8"), b" " + text.encode("utf-8")):  # (a SentencePiece dummy prefix)
            raise ValueError(f"the byte strings derived for {type(tokenizer).__name__}'s tokens do not spell "
                             f"{text!r} back (got {spelled!r})")
    return out


def eos_ids_of(model, tokenizer) -> set[int]:
    """A member's EOS ids: its tokenizer's and its generation config's (int or list)."""
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None) if config is not None else None
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids


class UnionVocabulary:
    """The union of the members' pieces, the maps between it and each member's tokens, on `device`.

    pieces: list[bytes], union id -> the piece's bytes (pieces[END] = b"", the EOS entry).
    to_union[m]: int64 [V_m]: union id of each of member m's tokens, -1 for tokens never sampled.
    sample_mask[m]: bool [V_m]: True for tokens never sampled (their logits are set to -inf).
    to_union_table, sample_mask_table: the same as [M, V_max] tables (padded with -1 / True).
    spelling_offsets[m] int64 [U + 1], spelling_ids[m] int64 [S_m]: member m's tokens for union id u
        are spelling_ids[m][spelling_offsets[m][u] : spelling_offsets[m][u + 1]] (none for END);
        spelling_lengths[m]: the same lengths as a host list (the host sizes each step's append).
    longest_spelling[m]: the most tokens member m appends for one piece.
    """

    def __init__(self, tokenizers: Sequence, vocab_sizes: Sequence[int], eos_ids: Sequence[set[int]],
                 device: torch.device):
        self.num_members = len(tokenizers)
        member_bytes = [token_bytes(tok, size) for tok, size in zip(tokenizers, vocab_sizes)]
        self.pieces: list[bytes] = [b""]
        index: dict[bytes, int] = {}
        to_union = []
        for m, spelled in enumerate(member_bytes):
            ids = []
            for i, piece in enumerate(spelled):
                if i in eos_ids[m]:
                    ids.append(END)
                elif piece is None:
                    ids.append(-1)
                else:
                    if piece not in index:
                        index[piece] = len(self.pieces)
                        self.pieces.append(piece)
                    ids.append(index[piece])
            if all(u <= END for u in ids):
                raise ValueError(f"member {m}'s tokenizer has no text token")
            to_union.append(ids)
        self.size = len(self.pieces)
        self.to_union = [torch.tensor(ids, dtype=torch.long, device=device) for ids in to_union]
        self.sample_mask = [u < 0 for u in self.to_union]
        # The same as [M, V_max] tables (vocabularies padded to the largest: -1 / masked past a
        # member's own), indexed by each row's member in a step over rows of several members.
        self.vocab_sizes = [len(ids) for ids in to_union]
        width = max(self.vocab_sizes)
        self.to_union_table = torch.full((self.num_members, width), -1, dtype=torch.long, device=device)
        for m, ids in enumerate(self.to_union):
            self.to_union_table[m, : len(ids)] = ids
        self.sample_mask_table = self.to_union_table < 0
        self.has_duplicates = []
        self.spelling_offsets, self.spelling_ids, self.spelling_lengths, self.longest_spelling = [], [], [], []
        for m, tok in enumerate(tokenizers):
            spellings = spell_pieces(tok, member_bytes[m], self.pieces, member=m)
            lengths = [len(s) for s in spellings]
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            flat = [i for s in spellings for i in s] or [0]
            self.spelling_lengths.append(lengths)
            self.longest_spelling.append(max(lengths))
            self.spelling_offsets.append(torch.tensor(offsets, dtype=torch.long, device=device))
            self.spelling_ids.append(torch.tensor(flat, dtype=torch.long, device=device))
        self._duplicates = [_duplicate_ranks(ids) for ids in to_union]
        self._duplicates = [[(torch.tensor(t, dtype=torch.long, device=device), torch.tensor(u, dtype=torch.long, device=device))
                             for t, u in ranks] for ranks in self._duplicates]
        self._primary = [_primary_tokens(ids) for ids in to_union]
        self._primary = [(torch.tensor(t, dtype=torch.long, device=device), torch.tensor(u, dtype=torch.long, device=device))
                         for t, u in self._primary]

    # ---------------------------------------------------------------- per step, on the device
    def masked_logits(self, member: int, logits: torch.Tensor) -> torch.Tensor:
        """Member `member`'s logits [B, V_m] with the tokens it never samples set to -inf."""
        return logits.masked_fill(self.sample_mask[member], float("-inf"))

    def union_logits(self, member: int, logits: torch.Tensor) -> torch.Tensor:
        """float32 [B, U]: log of the member's (unnormalised) probability of each piece, i.e.
        logsumexp of the logits of its tokens with that piece (-inf for pieces it lacks), so
        softmax over U is the member's distribution over pieces. Tokens with distinct pieces are
        copied exactly; a member's tokens that share a piece (a byte-fallback token beside the
        text token) are combined with logaddexp."""
        logits = logits.float()
        out = torch.full((logits.shape[0], self.size), float("-inf"), dtype=torch.float32, device=logits.device)
        tokens, union = self._primary[member]
        out.index_copy_(1, union, logits.index_select(1, tokens))
        for tokens, union in self._duplicates[member]:
            out.index_copy_(1, union, torch.logaddexp(out.index_select(1, union), logits.index_select(1, tokens)))
        return out

    def spell(self, member: int, union_ids: torch.Tensor, width: int) -> torch.Tensor:
        """int64 [B, width]: member `member`'s tokens for each row's piece, left-aligned; columns past
        the piece's spelling hold arbitrary token ids (the caller writes them past the row's end)."""
        offsets = self.spelling_offsets[member]
        start = offsets[union_ids]
        cols = start[:, None] + torch.arange(width, device=union_ids.device)[None, :]
        return self.spelling_ids[member][cols.clamp(max=self.spelling_ids[member].shape[0] - 1)]

    def piece(self, union_id: int) -> bytes:
        return self.pieces[union_id]


def _primary_tokens(ids: list[int]) -> tuple[list[int], list[int]]:
    """The first token of each piece (and its union id), EOS tokens included once."""
    seen, tokens, union = set(), [], []
    for t, u in enumerate(ids):
        if u >= 0 and u not in seen:
            seen.add(u)
            tokens.append(t)
            union.append(u)
    return tokens, union


def _duplicate_ranks(ids: list[int]) -> list[tuple[list[int], list[int]]]:
    """Tokens whose piece an earlier token of the same member already has, in ranks (rank r: the
    (r+1)-th token of its piece), so each rank's union ids are distinct (index_copy is exact)."""
    count: dict[int, int] = {}
    ranks: list[tuple[list[int], list[int]]] = []
    for t, u in enumerate(ids):
        if u < 0:
            continue
        r = count.get(u, 0)
        count[u] = r + 1
        if r == 0:
            continue
        while len(ranks) < r:
            ranks.append(([], []))
        ranks[r - 1][0].append(t)
        ranks[r - 1][1].append(u)
    return ranks


def spell_pieces(tokenizer, member_bytes: list[bytes | None], pieces: list[bytes], *, member: int) -> list[list[int]]:
    """Member `member`'s tokens for every union piece (see the module docstring's "Spelling");
    [] for END. Raises ValueError when the member cannot spell some byte of some piece."""
    own: dict[bytes, int] = {}
    for i, b in enumerate(member_bytes):  # prefer text tokens over byte-fallback tokens, then low ids
        if b is None:
            continue
        is_byte_token = len(b) == 1 and tokenizer.convert_ids_to_tokens(i) in _BYTE_FALLBACK_TOKENS
        if b not in own or (own[b][0] and not is_byte_token):
            own[b] = (is_byte_token, i)
    own_ids = {b: i for b, (_, i) in own.items()}
    longest = max(len(b) for b in own_ids)
    spellings: list[list[int] | None] = [None] * len(pieces)
    spellings[END] = []
    todo = []
    for u in range(1, len(pieces)):
        if pieces[u] in own_ids:
            spellings[u] = [own_ids[pieces[u]]]
        else:
            todo.append(u)
    texts = []
    for u in todo:
        try:
            texts.append(pieces[u].decode("utf-8"))
        except UnicodeDecodeError:
            texts.append(None)
    valid = [(u, s) for u, s in zip(todo, texts) if s is not None]
    encoded = tokenizer([s for _, s in valid], add_special_tokens=False)["input_ids"] if valid else []
    for (u, _), ids in zip(valid, encoded):
        spelled = [member_bytes[i] if 0 <= i < len(member_bytes) else None for i in ids]
        if any(b is None for b in spelled):
            continue
        if ids and spelled[0] == b" " and b"".join(spelled[1:]) == pieces[u]:
            ids = ids[1:]  # a dummy-prefix "▁" token of its own
        elif b"".join(spelled) != pieces[u]:
            continue
        spellings[u] = list(ids)
    for u in range(1, len(pieces)):
        if spellings[u] is None:
            spellings[u] = _longest_match(pieces[u], own_ids, longest, member)
    return spellings


def _longest_match(piece: bytes, own_ids: dict[bytes, int], longest: int, member: int) -> list[int]:
    out, i = [], 0
    while i < len(piece):
        for n in range(min(longest, len(piece) - i), 0, -1):
            tok = own_ids.get(piece[i : i + n])
            if tok is not None:
                out.append(tok)
                i += n
                break
        else:
            raise ValueError(
                f"member {member}'s tokenizer cannot spell the byte 0x{piece[i]:02x} (of the piece {piece!r} another "
                "member can emit): members with different tokenizers must each spell every byte (byte-level BPE or "
                "byte fallback)"
            )
    return out
