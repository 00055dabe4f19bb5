"""The stacked engine's model: one compact decoder for Llama-family members stacked by shape.

Members whose `shape_key` agree (Llama, Mistral, Qwen2, Qwen3 with equal sizes, biases, norms,
dtype and device) are copied into stacked tensors, one [M, out, in] tensor per projection, and
ONE forward serves N sequences, each on its own member: every projection is one
`me_kernels.grouped_linear` call over all N * Q tokens with per-token member ids; norms, RoPE
and sliding windows are gathered per sequence. The math is Hugging Face's (transformers 5.x
modeling_llama / mistral / qwen2 / qwen3 and masking_utils), in the members' dtype.

    group = StackedGroup.from_models([model_a, model_b])      # HF models now view the stacks
    cache = group.new_cache(slots=4, max_seq_len=256)
    logits = group.forward(cache, tokens, member, slot, start, count, kv_len=64)

The Hugging Face models keep working after stacking: each of their parameters is re-pointed to
a view of its slice of the stacked tensor, so the weights are held once.
"""
from __future__ import annotations

import warnings
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Called with int32 member ids only: the wrapper then does no host-side value check (it would
# sync for int64 ids on the CPU), so it traces under torch.compile(fullgraph=True) to the op
# torch.ops.me.grouped_linear, whose fake implementation gives the output shape.
from me_kernels import grouped_linear

from .architectures import SUPPORTED_ARCHITECTURES, is_tied, shape_key, sliding_windows, unsupported_reason
from .kv_cache import CachePlan, KVCache, attention_mask, plan_cache_access, read_rows, write_layer

__all__ = ["SUPPORTED_ARCHITECTURES", "StackedGroup", "shape_key", "unsupported_reason"]

# "No sliding window": larger than any position, small enough that position - window cannot overflow.
_FULL_ATTENTION_WINDOW = 2**62
_LOGITS_MODES = ("last", "all", "none")
# model -> (weak reference to the StackedGroup holding its weights, its index there)
_STACKED_IN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _shares_storage(model: torch.nn.Module, group) -> bool:
    """Whether any of the model's parameters is still a view of the group's stacked tensors."""
    held = {t.untyped_storage().data_ptr() for t in group.weight_tensors()}
    return any(p.untyped_storage().data_ptr() in held for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# Stacking (which models are supported and stack together: me_runtime/architectures.py)
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _stack_parameters(params: list[torch.nn.Parameter], out: torch.Tensor, rows: slice = slice(None)) -> None:
    """Copy params[m] into out[m, rows] and re-point params[m] to that slice (storage held once)."""
    for m, param in enumerate(params):
        destination = out[m, rows]
        destination.copy_(param.data)
        # `.data =` keeps the Parameter object, so ties (lm_head is embed_tokens) and any outside
        # references stay valid, while the old storage is freed.
        param.data = destination


class _Layout(NamedTuple):
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# ---------------------------------------------------------------------------------------------
# The stacked group
# ---------------------------------------------------------------------------------------------


class StackedGroup:
    """M members of one shape_key, stacked. Per layer l:

        qkv_weight[l]      [M, (H + 2 * KVH) * hd, hidden]   (q rows, then k, then v)
        qkv_bias[l]        [M, (H + 2 * KVH) * hd] or None
        o_weight[l]        [M, hidden, H * hd];   o_bias[l] [M, hidden] or None
        gate_up_weight[l]  [M, 2 * I, hidden]     (gate rows, then up); gate_up_bias[l] or None
        down_weight[l]     [M, hidden, I];        down_bias[l] or None
    and
        input_norm, post_attention_norm [M, L, hidden]; final_norm [M, hidden]
        q_norm, k_norm     [M, L, hd] or None (Qwen3)
        vocab_weight       [M + U, V, hidden]: rows 0..M-1 are the embeddings (`embedding`), then
                           the lm_heads of the U members that do not tie them to the embedding
        lm_head_index      int32 [M]: row of vocab_weight that is member m's lm_head
        eps [M] fp32, inv_freq [M, hd / 2] fp32, attention_scaling [M] fp32, window int64 [M, L]
    all in the members' dtype (except the fp32 / int tables) on their device.
    """

    def __init__(self) -> None:  # use from_models
        raise TypeError("build a StackedGroup with StackedGroup.from_models(models)")

    @classmethod
    @torch.no_grad()
    def from_models(cls, models: list[torch.nn.Module], *, pad_vocab: bool = False) -> StackedGroup:
        """Stack Hugging Face causal LMs that share one shape_key (raises ValueError otherwise).

        pad_vocab: members may differ in vocabulary size (members with different tokenizers):
        the embeddings and lm_heads are stacked into the largest vocabulary, the rows past a
        member's own vocabulary are zeros (its logits there are 0: the caller masks them), and
        the layers are stacked as usual.

        The models' parameters are re-pointed to views of the stacked tensors (they keep working,
        and the weights are held once). Built projection by projection, so peak memory stays near
        the weights plus one stacked projection. The same models in the same order, already
        stacked, return their existing group (no second copy); models that another group holds
        are stacked again with a warning (their weights are then held twice until that group goes).
        """
        models = list(models)
        if not models:
            raise ValueError("from_models needs at least one model")
        if len({id(m) for m in models}) != len(models):
            raise ValueError("from_models got the same model object more than once")
        for i, model in enumerate(models):
            reason = unsupported_reason(model)
            if reason is not None:
                raise ValueError(f"model {i}: {reason}")
        def comparable(k: tuple) -> tuple:
            return k[:6] + k[7:] if pad_vocab else k  # (index 6 is the vocabulary size)

        key = shape_key(models[0])
        for i, model in enumerate(models[1:], start=1):
            if comparable(shape_key(model)) != comparable(key):
                raise ValueError(
                    f"model {i} cannot be stacked with model 0: shape keys differ ({shape_key(model)} != {key}; "
                    "fields: hidden, intermediate, layers, heads, kv_heads, head_dim, vocab, qkv_bias, o_bias, "
                    "mlp_bias, qk_norm, dtype, device)"
                )
        existing = [_STACKED_IN.get(m) for m in models]
        group = existing[0][0]() if existing[0] is not None else None
        if group is not None and group.num_members == len(models) and all(
                e is not None and e[0]() is group and e[1] == j for j, e in enumerate(existing)):
            # The same models, already stacked (e.g. a second Ensemble re-weighting them), if their
            # parameters are still the group's views (not moved or cast since).
            held = {t.untyped_storage().data_ptr() for t in group.weight_tensors()}
            if all(p.untyped_storage().data_ptr() in held for m in models for p in m.parameters()):
                return group
        if any(e is not None and e[0]() is not None and _shares_storage(models[i], e[0]())
               for i, e in enumerate(existing)):
            warnings.warn(
                "stacking models that another stacked group already holds: their weights are held twice "
                "until that group (its Ensemble) is released", RuntimeWarning, stacklevel=2)
        self = object.__new__(cls)
        if pad_vocab:
            key = key[:6] + (max(shape_key(m)[6] for m in models),) + key[7:]
        self._build(models, key)
        ref = weakref.ref(self)
        for j, model in enumerate(models):
            _STACKED_IN[model] = (ref, j)
        return self

    def _build(self, models: list[torch.nn.Module], key: tuple) -> None:
        hidden, intermediate, layers, heads, kv_heads, head_dim, vocab = key[:7]
        self.layout = _Layout(hidden, intermediate, layers, heads, kv_heads, head_dim, vocab)
        self.num_members = num = len(models)
        self.dtype, self.device = key[-2], key[-1]
        self.scaling = head_dim**-0.5
        empty = lambda *shape: torch.empty(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        decoders = [model.model for model in models]
        q_rows, kv_rows = heads * head_dim, kv_heads * head_dim
        qkv_rows = (slice(0, q_rows), slice(q_rows, q_rows + kv_rows), slice(q_rows + kv_rows, q_rows + 2 * kv_rows))
        gate_up_rows = (slice(0, intermediate), slice(intermediate, 2 * intermediate))

        def stack_linears(linears_per_part: list[list[torch.nn.Linear]], rows_per_part, out_rows, in_features):
            weight = empty(num, out_rows, in_features)
            has_bias = linears_per_part[0][0].bias is not None
            bias = empty(num, out_rows) if has_bias else None
            for linears, rows in zip(linears_per_part, rows_per_part):
                _stack_parameters([lin.weight for lin in linears], weight, rows)
                if has_bias:
                    _stack_parameters([lin.bias for lin in linears], bias, rows)
            return weight, bias

        self.qkv_weight, self.qkv_bias, self.o_weight, self.o_bias = [], [], [], []
        self.gate_up_weight, self.gate_up_bias, self.down_weight, self.down_bias = [], [], [], []
        self.input_norm = empty(num, layers, hidden)
        self.post_attention_norm = empty(num, layers, hidden)
        qk_norm = key[10]
        self.q_norm = empty(num, layers, head_dim) if qk_norm else None
        self.k_norm = empty(num, layers, head_dim) if qk_norm else None
        for layer in range(layers):
            attns = [d.layers[layer].self_attn for d in decoders]
            mlps = [d.layers[layer].mlp for d in decoders]
            qkv_parts = [[a.q_proj for a in attns], [a.k_proj for a in attns], [a.v_proj for a in attns]]
            weight, bias = stack_linears(qkv_parts, qkv_rows, q_rows + 2 * kv_rows, hidden)
            self.qkv_weight.append(weight)
            self.qkv_bias.append(bias)
            weight, bias = stack_linears([[a.o_proj for a in attns]], [slice(None)], hidden, q_rows)
            self.o_weight.append(weight)
            self.o_bias.append(bias)
            gate_up_parts = [[m.gate_proj for m in mlps], [m.up_proj for m in mlps]]
            weight, bias = stack_linears(gate_up_parts, gate_up_rows, 2 * intermediate, hidden)
            self.gate_up_weight.append(weight)
            self.gate_up_bias.append(bias)
            weight, bias = stack_linears([[m.down_proj for m in mlps]], [slice(None)], hidden, intermediate)
            self.down_weight.append(weight)
            self.down_bias.append(bias)
            _stack_parameters([d.layers[layer].input_layernorm.weight for d in decoders], self.input_norm[:, layer])
            post_norms = [d.layers[layer].post_attention_layernorm.weight for d in decoders]
            _stack_parameters(post_norms, self.post_attention_norm[:, layer])
            if qk_norm:
                _stack_parameters([a.q_norm.weight for a in attns], self.q_norm[:, layer])
                _stack_parameters([a.k_norm.weight for a in attns], self.k_norm[:, layer])
        self.final_norm = empty(num, hidden)
        _stack_parameters([d.norm.weight for d in decoders], self.final_norm)

        # Tying is per member: tied members read their lm_head from their embedding row.
        untied = [m for m, model in enumerate(models) if not is_tied(model)]
        self.vocab_sizes = [d.embed_tokens.weight.shape[0] for d in decoders]
        if all(v == vocab for v in self.vocab_sizes):
            self.vocab_weight = empty(num + len(untied), vocab, hidden)
            _stack_parameters([d.embed_tokens.weight for d in decoders], self.vocab_weight)
            _stack_parameters([models[m].lm_head.weight for m in untied], self.vocab_weight[num:])
        else:  # pad_vocab: each member's rows first, zeros after them
            self.vocab_weight = torch.zeros((num + len(untied), vocab, hidden), dtype=self.dtype, device=self.device)
            for m, d in enumerate(decoders):
                _stack_parameters([d.embed_tokens.weight], self.vocab_weight[m : m + 1], slice(0, self.vocab_sizes[m]))
            for j, m in enumerate(untied):
                _stack_parameters([models[m].lm_head.weight], self.vocab_weight[num + j : num + j + 1],
                                  slice(0, self.vocab_sizes[m]))
        for m, model in enumerate(models):
            if m not in untied and model.lm_head.weight is not model.model.embed_tokens.weight:
                # tied through a second Parameter object
                model.lm_head.weight.data = self.vocab_weight[m, : self.vocab_sizes[m]]
        lm_head_index = list(range(num))
        for extra, m in enumerate(untied):
            lm_head_index[m] = num + extra
        self.lm_head_index = torch.tensor(lm_head_index, dtype=torch.int32, device=self.device)
        self.tied = [m not in untied for m in range(num)]

        table = dict(device=self.device)
        # RMSNorm adds eps as a Python float to an fp32 tensor, i.e. rounded to fp32 like here.
        self.eps = torch.tensor([d.norm.variance_epsilon for d in decoders], dtype=torch.float32, **table)
        self.inv_freq = torch.stack([d.rotary_emb.inv_freq.to(torch.float32) for d in decoders]).to(self.device)
        scaling = [float(d.rotary_emb.attention_scaling) for d in decoders]
        self.attention_scaling = torch.tensor(scaling, dtype=torch.float32, **table)
        windows = [[_FULL_ATTENTION_WINDOW if w is None else int(w) for w in sliding_windows(m)] for m in models]
        self.window = torch.tensor(windows, dtype=torch.int64, **table)
        # Layers whose members' windows agree share one attention mask per forward (usually all
        # layers do): the distinct window columns, None for full attention in every member.
        columns = [tuple(member_windows[layer] for member_windows in windows) for layer in range(layers)]
        distinct = list(dict.fromkeys(columns))
        self._mask_of_layer = [distinct.index(column) for column in columns]
        self._mask_windows = [
            None if all(w == _FULL_ATTENTION_WINDOW for w in column)
            else torch.tensor(column, dtype=torch.int64, **table)
            for column in distinct
        ]
        # SDPA's enable_gqa on the CPU runs the same flash kernel on the unrepeated keys / values
        # (bit-identical, no copy); on CUDA a masked call with it may fall back to the math backend.
        self._sdpa_gqa = self.device.type == "cpu" and heads != kv_heads
        # Attention's dtype: on the CPU bf16 / fp16 attention runs at a fraction of the fp32 rate
        # (no half-precision arithmetic on most CPUs; measured 36 us against 8 us for one decode
        # query over 100 keys), so q / k / v are widened and the output rounded once; on CUDA
        # the members' dtype, as Hugging Face's sdpa path.
        self._attention_dtype = torch.float32 if self.device.type == "cpu" else self.dtype

    # -----------------------------------------------------------------------------------------
    # Memory
    # -----------------------------------------------------------------------------------------

    def weight_tensors(self) -> list[torch.Tensor]:
        """Every stacked weight tensor (each a separate allocation)."""
        per_layer = (self.qkv_weight, self.qkv_bias, self.o_weight, self.o_bias, self.gate_up_weight,
                     self.gate_up_bias, self.down_weight, self.down_bias)
        tensors = [t for group in per_layer for t in group if t is not None]
        tensors += [self.input_norm, self.post_attention_norm, self.final_norm, self.vocab_weight]
        tensors += [t for t in (self.q_norm, self.k_norm) if t is not None]
        return tensors

    @property
    def weight_bytes(self) -> int:
        """Bytes of all stacked weights (the members' weights, held once)."""
        return sum(t.numel() * t.element_size() for t in self.weight_tensors())

    @property
    def embedding(self) -> torch.Tensor:
        """[M, V, hidden] view of the members' input embeddings."""
        return self.vocab_weight[: self.num_members]

    def new_cache(self, slots: int, max_seq_len: int) -> KVCache:
        """A zeroed KV cache with `slots` request rows per member, `max_seq_len` positions each."""
        lay = self.layout
        return KVCache(num_members=self.num_members, slots=slots, max_seq_len=max_seq_len, num_layers=lay.layers,
                       kv_heads=lay.kv_heads, head_dim=lay.head_dim, dtype=self.dtype, device=self.device)

    # -----------------------------------------------------------------------------------------
    # Forward
    # -----------------------------------------------------------------------------------------

    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        member: torch.Tensor,
        slot: torch.Tensor,
        start: torch.Tensor,
        count: torch.Tensor,
        *,
        kv_len: int,
        logits: str = "last",
    ) -> torch.Tensor | None:
        """One forward over N sequences, each on its own member, writing their keys / values.

        Args:
            cache: from this group's new_cache().
            tokens: int64 [N, Q]; entries at q >= count[n] are padding (any value).
            member: int32 / int64 [N], local member index (0..M-1) of each sequence.
            slot: int64 [N], cache slot; (member, slot) owns one cache row.
            start: int64 [N], tokens already in that row = position of tokens[n, 0].
            count: int64 [N], valid tokens of row n in [0, Q]; 0 writes nothing.
            kv_len: host int, >= max(start + count) and <= cache.max_seq_len; attention reads
                cache positions [0, kv_len) only.
            logits: "last" -> float32 [N, V] at position count - 1 (unspecified for count 0);
                "all" -> float32 [N, Q, V] (unspecified at q >= count); "none" -> None.
        No host synchronisation: static shapes, no data-dependent Python control flow.
        """
        if torch.compiler.is_compiling():  # inductor cannot trace inference tensors
            with torch.no_grad():
                return self._forward(cache, tokens, member, slot, start, count, kv_len, logits)
        # Eager: inference_mode rather than no_grad saves ~10% of the per-op overhead (no version
        # counters, no view tracking), which is most of a small member's decode step on the CPU.
        # Caches and weights stay normal tensors (writing them in place from inside is allowed);
        # the returned logits are inference tensors, read-only outside (nothing downstream
        # modifies them in place).
        with torch.inference_mode():
            return self._forward(cache, tokens, member, slot, start, count, kv_len, logits)

    def _forward(self, cache, tokens, member, slot, start, count, kv_len, logits):
        self._check_forward_args(cache, tokens, member, slot, start, count, kv_len, logits)
        n, q_len = tokens.shape
        int64 = torch.int64
        member = member.to(int64)
        plan = plan_cache_access(cache, member, slot.to(int64), start.to(int64), count.to(int64), q_len, kv_len)
        per = self._per_forward(member, plan, q_len)
        hidden = self._embed(torch.where(plan.valid, tokens, 0), member)
        # With logits="last", the last layer needs every token's keys / values but only each
        # sequence's last token past its attention (the other rows would feed nothing): its
        # attention output, o_proj and MLP run on N rows instead of N * Q.
        last = None
        if logits == "last" and q_len > 1:
            last = (torch.arange(n, device=tokens.device), (count.to(int64) - 1).clamp(min=0))
        final = self.layout.layers - 1
        for layer in range(self.layout.layers):
            hidden = self._decoder_layer(layer, hidden, per, plan, cache, last if layer == final else None)
        return self._final_logits(hidden, member, per, logits)

    __call__ = forward

    def _check_forward_args(self, cache, tokens, member, slot, start, count, kv_len, logits) -> None:
        # Shapes, dtypes and host ints only: checking values would need a device sync.
        lay = self.layout
        if (
            not isinstance(cache, KVCache)
            or cache.num_members != self.num_members
            or tuple(cache.key.shape[::3]) != (lay.layers, lay.kv_heads)  # [L, rows, S, KVH, hd]
            or cache.key.shape[4] != lay.head_dim
            or cache.key.dtype != self.dtype
        ):
            raise ValueError("cache must come from this group's new_cache()")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be [N, Q] with Q >= 1, got shape {tuple(tokens.shape)}")
        n = tokens.shape[0]
        for name, t in (("member", member), ("slot", slot), ("start", start), ("count", count)):
            if t.shape != (n,):
                raise ValueError(f"{name} must have shape [N] = [{n}], got {tuple(t.shape)}")
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
        if not isinstance(kv_len, int) or isinstance(kv_len, bool) or not 1 <= kv_len <= cache.max_seq_len:
            raise ValueError(f"kv_len must be a host int in [1, max_seq_len={cache.max_seq_len}], got {kv_len!r}")
        if logits not in _LOGITS_MODES:
            raise ValueError(f"logits must be one of {_LOGITS_MODES}, got {logits!r}")

    def _embed(self, tokens: torch.Tensor, member: torch.Tensor) -> torch.Tensor:
        """tokens int64 [N, Q] (padding replaced by 0), member int64 [N] -> [N, Q, hidden] dtype."""
        return self.vocab_weight[member[:, None], tokens]

    def _per_forward(self, member: torch.Tensor, plan: CachePlan, q_len: int) -> _PerForward:
        """Everything the layers read that depends on the sequences' members but not on the layer,
        gathered once per forward instead of once per layer."""
        lay = self.layout
        n = member.shape[0]
        sequence_member = token_member = member.to(torch.int32)
        if q_len > 1:
            token_member = token_member[:, None].expand(n, q_len).reshape(-1)
        eps = self.eps[member][:, None, None]  # [N, 1, 1] fp32
        input_norm = self.input_norm[member][:, :, None, :].unbind(1)  # L x [N, 1, hidden]
        post_attention_norm = self.post_attention_norm[member][:, :, None, :].unbind(1)
        qk_norm = None
        if self.q_norm is not None:  # q heads' weight then k heads' weight: one norm over both
            q_norm = self.q_norm[member][:, :, None].expand(n, lay.layers, lay.heads, lay.head_dim)
            k_norm = self.k_norm[member][:, :, None].expand(n, lay.layers, lay.kv_heads, lay.head_dim)
            qk_norm = torch.cat((q_norm, k_norm), dim=2)[:, :, None].unbind(1)  # L x [N, 1, H + KVH, hd]
        cos, sin_signed = self._rope(member, plan.positions)
        masks = [attention_mask(plan, None if w is None else w[member], self._attention_dtype)
                 for w in self._mask_windows]
        return _PerForward(sequence_member, token_member, eps, input_norm, post_attention_norm, qk_norm, cos,
                           sin_signed, [masks[i] for i in self._mask_of_layer])

    def _rope(self, member: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and the signed sin (see _apply_rope), [N, Q, 1, hd] in the members' dtype, computed
        in fp32 as the HF rotary module does (angle = position * inv_freq, duplicated halves, times
        attention_scaling)."""
        freqs = positions.to(torch.float32)[:, :, None, None] * self.inv_freq[member][:, None, None, :]
        scale = self.attention_scaling[member][:, None, None, None]
        cos, sin = freqs.cos() * scale, freqs.sin() * scale
        return torch.cat((cos, cos), dim=-1).to(self.dtype), torch.cat((-sin, sin), dim=-1).to(self.dtype)

    def _decoder_layer(self, layer: int, hidden: torch.Tensor, per: _PerForward, plan: CachePlan, cache: KVCache,
                       only: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Pre-norm attention block then pre-norm MLP block, residuals in the members' dtype.
        hidden [N, Q, hidden] -> [N, Q, hidden], or [N, 1, hidden] at the token q = only[1][n] of
        each sequence when `only` (sequence indices, token indices) is given."""
        normed = _rms_norm(hidden, per.input_norm[layer], per.eps)
        attention = self._attention(layer, normed, per, plan, cache, only)
        if only is not None:
            hidden = hidden[only][:, None, :]
        hidden = hidden + attention
        normed = _rms_norm(hidden, per.post_attention_norm[layer], per.eps)
        token_member = per.token_member if only is None else per.sequence_member
        return hidden.add_(self._mlp(layer, normed, token_member))

    def _attention(self, layer: int, x: torch.Tensor, per: _PerForward, plan: CachePlan, cache: KVCache,
                   only: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x [N, Q, hidden] -> [N, Q, hidden] ([N, 1, hidden] for the queries `only`, see
        _decoder_layer). Writes this layer's k / v of the valid tokens at (member, slot,
        start + q), then each query attends to its own row's keys in [0, kv_len)."""
        lay = self.layout
        n, q_len, _ = x.shape
        qkv = grouped_linear(x.reshape(n * q_len, lay.hidden), per.token_member, self.qkv_weight[layer],
                             self.qkv_bias[layer])
        qkv = qkv.view(n, q_len, lay.heads + 2 * lay.kv_heads, lay.head_dim)
        # q and k heads are adjacent: one norm (Qwen3) and one RoPE over both, written back in
        # place, so the k and v heads that follow are the [2, KVH, hd] blocks the cache stores.
        qk = qkv[:, :, : lay.heads + lay.kv_heads]
        if per.qk_norm is None:
            _apply_rope_(qk, per.cos, per.sin_signed)
        else:
            qk.copy_(_apply_rope_(_rms_norm(qk, per.qk_norm[layer], per.eps[..., None]), per.cos, per.sin_signed))
        write_layer(cache, layer, plan, qkv[:, :, lay.heads :].reshape(n * q_len, 2, lay.kv_heads, lay.head_dim))
        keys, values = read_rows(cache, layer, plan)  # [N, KVH, kv_len, hd] each
        mask = per.masks[layer]
        token_member = per.token_member
        if only is not None:  # each sequence's query `only`: [N, 1, ...]
            qkv, mask = qkv[only][:, None], mask[only[0], :, only[1]][:, :, None]
            token_member, q_len = per.sequence_member, 1
        query = qkv[:, :, : lay.heads].transpose(1, 2)
        if self._attention_dtype != query.dtype:
            query, keys, values = (t.to(self._attention_dtype) for t in (query, keys, values))
        if self._sdpa_gqa:
            out = F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=True)
        else:  # like HF's sdpa path with a mask: keys / values repeated per query head
            groups = lay.heads // lay.kv_heads
            out = F.scaled_dot_product_attention(query, _repeat_kv(keys, groups), _repeat_kv(values, groups),
                                                 attn_mask=mask, scale=self.scaling)
        out = out.transpose(1, 2).reshape(n * q_len, lay.heads * lay.head_dim).to(qkv.dtype)
        return grouped_linear(out, token_member, self.o_weight[layer], self.o_bias[layer]).view(n, q_len, lay.hidden)

    def _mlp(self, layer: int, x: torch.Tensor, token_member: torch.Tensor) -> torch.Tensor:
        """SwiGLU: down(silu(gate(x)) * up(x)); x [N, Q, hidden] -> [N, Q, hidden]."""
        n, q_len, hidden = x.shape
        x_rows = x.reshape(n * q_len, hidden)
        gate_up = grouped_linear(x_rows, token_member, self.gate_up_weight[layer], self.gate_up_bias[layer])
        gate, up = gate_up.chunk(2, dim=-1)
        out = grouped_linear(F.silu(gate).mul_(up), token_member, self.down_weight[layer], self.down_bias[layer])
        return out.view(n, q_len, hidden)

    def _final_logits(self, hidden, member, per: _PerForward, mode: str) -> torch.Tensor | None:
        """Final RMSNorm and lm_head: "last" float32 [N, V] (hidden is then [N, 1, hidden], each
        sequence's last token), "all" float32 [N, Q, V], "none" None."""
        if mode == "none":
            return None
        n, q_len, dim = hidden.shape
        if mode == "last":
            heads = self.lm_head_index[member]
        else:
            heads = self.lm_head_index[per.token_member.to(torch.int64)]
        normed = _rms_norm(hidden, self.final_norm[member][:, None, :], per.eps)
        out = grouped_linear(normed.reshape(-1, dim), heads, self.vocab_weight, None).to(torch.float32)
        return out.view(n, self.layout.vocab) if mode == "last" else out.view(n, q_len, self.layout.vocab)


class _PerForward(NamedTuple):
    """Per-forward gathers shared by all layers (see StackedGroup._per_forward)."""

    sequence_member: torch.Tensor  # int32 [N]
    token_member: torch.Tensor  # int32 [N * Q]
    eps: torch.Tensor  # fp32 [N, 1, 1]
    input_norm: list[torch.Tensor]  # per layer [N, 1, hidden]
    post_attention_norm: list[torch.Tensor]
    qk_norm: list[torch.Tensor] | None  # per layer [N, 1, H + KVH, hd] (Qwen3)
    cos: torch.Tensor  # [N, Q, 1, hd]
    sin_signed: torch.Tensor  # [N, Q, 1, hd]
    masks: list[torch.Tensor]  # per layer [N, 1, Q, kv_len], additive


# ---------------------------------------------------------------------------------------------
# Elementwise pieces, in Hugging Face's order of operations
# ---------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2) + eps)): statistics in fp32, cast back to x's dtype before the
    scale (LlamaRMSNorm). weight and eps (fp32) broadcast against x [..., D]."""
    xf = x.float()
    variance = xf.pow(2).mean(-1, keepdim=True)
    # In place on this function's own temporaries only (x may be a view of a live tensor).
    normed = xf * variance.add_(eps).rsqrt_()
    if x.dtype != torch.float32:  # (a no-op .to still costs a dispatch)
        normed = normed.to(x.dtype)
    return normed.mul_(weight)


def _apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate x [N, Q, heads, hd] by position in place (x may be a view): HF's
    x * cos + rotate_half(x) * sin. Returns x.

    rotate_half(x) = cat(-x2, x1) is computed as roll(x) = cat(x2, x1) times sin_signed =
    cat(-sin1, sin2): the same products bit for bit (a sign flip is exact), in one roll instead of
    two slices, a negation and a cat.
    """
    rotated = x.roll(x.shape[-1] // 2, dims=-1).mul_(sin_signed)
    return x.mul_(cos).add_(rotated)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, KVH, S, hd] -> [N, KVH * groups, S, hd], each kv head repeated for its query heads."""
    if groups == 1:
        return x
    n, kv_heads, seq, head_dim = x.shape
    return x[:, :, None].expand(n, kv_heads, groups, seq, head_dim).reshape(n, kv_heads * groups, seq, head_dim)
