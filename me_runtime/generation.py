"""`Generation`: one request's output (returned by Ensemble and by me_runtime.ray_placement.RayEnsemble)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generation:
    """One request's output.

    text: the decoded new tokens (special tokens skipped), cut before the first stop string
        when finish_reason is "stop"; None when the Ensemble has no tokenizer.
    token_ids: every generated token id, including the EOS token or the tokens that spell the
        stop string.
    members: for each generated token, the member that produced it (-1 for CE).
    finish_reason: "eos" | "stop" | "length".
    drafted, accepted: CE by drafting (draft_tokens > 0): how many drafted tokens were tested
        against the mixture for this request, and how many of them were accepted (the
        acceptance rate is accepted / drafted); 0 otherwise.
    """

    text: str | None
    token_ids: list[int]
    members: list[int]
    finish_reason: str
    drafted: int = 0
    accepted: int = 0

