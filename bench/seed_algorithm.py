"""A re-implementation of the paper's reference ME loop, as the baseline its users would have.

Batch size 1. Each step the member is drawn on the host; the chosen member runs one forward
over its pending tokens (the whole prompt the first time) with its own KV cache; the full
next-token distribution is copied to the host and sampled there (temperature as p^(1/T), then
top-k, then top-p, on the chosen member only); the token is appended to every member's pending
list. Written from the algorithm's description; only the benchmark uses it.
"""
from __future__ import annotations

import numpy as np
import torch
from transformers import DynamicCache


class SeedAlgorithm:
    def __init__(self, models, weights, *, temperature=1.0, top_k=0, top_p=1.0, seed=0, eos_token_id=None):
        self.models = models
        self.weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.rng = np.random.default_rng(seed)
        self.eos_token_id = eos_token_id

    def _sample_on_host(self, probs: np.ndarray) -> int:
        probs = probs / probs.sum()  # fp32 softmax, renormalised in fp64 for numpy's check
        if self.temperature != 1.0:
            probs = probs ** (1.0 / self.temperature)
            probs /= probs.sum()
        if self.top_k > 0:
            kth = np.partition(probs, -self.top_k)[-self.top_k]
            probs = np.where(probs >= kth, probs, 0.0)
            probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs)
            cumulative = np.cumsum(probs[order])
            cut = int(np.searchsorted(cumulative, self.top_p)) + 1
            kept = np.zeros_like(probs)
            kept[order[:cut]] = probs[order[:cut]]
            probs = kept / kept.sum()
        return int(self.rng.choice(probs.shape[0], p=probs))

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[int]]:
        """Returns (tokens, members)."""
        num = len(self.models)
        caches = [DynamicCache() for _ in range(num)]
        pending = [list(prompt_ids) for _ in range(num)]
        tokens, members = [], []
        for _ in range(max_new_tokens):
            m = int(self.rng.choice(num, p=self.weights))
            model = self.models[m]
            device = next(model.parameters()).device
            out = model(input_ids=torch.tensor([pending[m]], device=device), past_key_values=caches[m], use_cache=True)
            caches[m] = out.past_key_values
            pending[m] = []
            probs = torch.softmax(out.logits[0, -1].float(), dim=-1).cpu().numpy().astype(np.float64)
            tok = self._sample_on_host(probs)
            tokens.append(tok)
            members.append(m)
            for queue in pending:
                queue.append(tok)
            if tok == self.eos_token_id:
                break
        return tokens, members
