"""Stop criteria: EOS token ids and stop strings, checked on the host once per step."""
from __future__ import annotations

from collections.abc import Iterable, Sequence


def normalize_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """`stop` argument -> tuple of non-empty stop strings (ValueError/TypeError on bad input)."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a string, a list of strings or None, got {type(stop).__name__}")
    for s in stop:
        if not isinstance(s, str):
            raise TypeError(f"stop strings must be str, got {type(s).__name__}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return tuple(stop)


def eos_token_ids(models: Iterable, tokenizer=None) -> frozenset[int]:
    """EOS ids from the tokenizer and every member's generation config (int or list)."""
    ids: set[int] = set()
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    for model in models:
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        if eos is None:
            continue
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return frozenset(ids)


class StopChecker:
    """Finds stop strings in one request's newly generated text.

    Only the tail of the generated tokens is decoded each step (a window long enough to hold
    any stop string), so the check costs O(longest stop string) per step, not O(length).
    A stop string is searched only in generated text, never in the prompt.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        if stop and tokenizer is None:
            raise ValueError("stop strings need a tokenizer (use Ensemble(models, tokenizer=...))")
        self.tokenizer = tokenizer
        self.stop = stop
        # A stop string of L characters spans at most L tokens that each add a character, plus
        # tokens that add none (partial UTF-8 bytes): 4 bytes per character at most.
        self.window = 4 * max((len(s) for s in stop), default=0) + 4

    def hit(self, token_ids: list[int]) -> bool:
        if not self.stop:
            return False
        tail = self.tokenizer.decode(token_ids[-self.window :], skip_special_tokens=True)
        return any(s in tail for s in self.stop)

    def truncate(self, text: str) -> str:
        """The text up to (not including) the earliest stop string."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]


class ByteStopChecker:
    """Stop strings searched in the emitted bytes (members with different tokenizers, whose output
    is a sequence of byte pieces). Only the tail that a new piece can complete a stop string in is
    searched each step."""

    def __init__(self, stop: tuple[str, ...], longest_piece: int):
        self.stop = stop
        self.needles = [s.encode("utf-8") for s in stop]
        self.window = max((len(n) for n in self.needles), default=0) + longest_piece

    def hit(self, data: bytearray) -> bool:
        if not self.needles:
            return False
        tail = bytes(data[-self.window :])
        return any(n in tail for n in self.needles)

    def truncate(self, text: str) -> str:
        """The text up to (not including) the earliest stop string."""
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]
