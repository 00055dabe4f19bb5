"""Property-based fuzzing (Hypothesis) of every me_kernels op against its torch reference (issue 16).

Each op runs on both CPU paths: the Triton kernel under the interpreter (TRITON_INTERPRET=1 and
CPU tensors; skipped otherwise) and the compiled C++ CPU kernel (torch.ops.me.<op>, which the
dispatcher sends to me_kernels._C even under the interpreter). group_rows / grouped_linear have
no Triton kernel: their CPU path is the compiled op only (and its public wrapper).

Inputs are drawn from the families that broke other sampling stacks in production: odd shapes
(B 0..6, V 1..300), every dtype and memory layout, NaN / +inf / -inf rows and entries, logits
from a tiny value set (ties everywhere, at the top-k and top-p boundaries too), per-row
parameters at their limits (and out of range, for the device-tensor path that does not check
them on the host), extreme seeds and offsets, bad weight rows and out-of-range ids.

Properties: tokens / members / counts equal the reference's exactly; every token is -1 or in
[0, V) and in the reference's kept set; logprobs match with NaN and -inf in the same places; bad
ids raise ValueError on the CPU. The only tolerated token difference is a row whose kept set
hangs on fp32 rounding (`borderline_rows`: a top-p crossing or min-p cut within 1e-5 of its
target), and for the Triton mixture kernels, whose mixture values differ from the reference's in
the last bits, the near-ties `assert_tokens_match` accepts.

Bounded for CI (2 cores, interpreter): small shapes, a fixed number of examples per test,
derandomized (the same examples every run) and no example database. ME_FUZZ_SCALE=k runs k
times as many examples.
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import me_kernels as K
from me_kernels import reference as R
from me_kernels._philox import STREAM_MIXTURE
from me_kernels._validate import RowParam, RowParams
from me_kernels.mixture import _launch_logprobs, _launch_mixture_sample
from me_kernels.sampling import _launch_sample
from me_kernels.selection import _launch_select_members
from me_kernels.verify import _launch_verify

from _sampling_testlib import assert_tokens_match, borderline_rows
from conftest import INTERPRET
from test_grouped_linear import OUT_EPS, acc_eps, oracle

NEG, POS, NAN = float("-inf"), float("inf"), float("nan")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


# ME_FUZZ_SCALE=k runs k times as many examples (a longer local hunt; CI runs the default).
FUZZ_SCALE = float(os.environ.get("ME_FUZZ_SCALE", "1"))


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * FUZZ_SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="Triton kernels on CPU need TRITON_INTERPRET=1")
PATHS = [pytest.param("triton", marks=needs_interpreter), "compiled"]


@contextlib.contextmanager
def cpu_path():
    """Public functions take the compiled CPU op, not the Triton interpreter (a context manager,
    not monkeypatch: Hypothesis runs many examples inside one function-scoped fixture)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

def batch_sizes(max_batch: int):
    """B in [0, max_batch], 0 (an empty batch) rarely: Hypothesis favours it otherwise."""
    return st.sampled_from(list(range(1, max_batch + 1)) * 2 + [0])


VOCABS = st.one_of(st.sampled_from([1, 2, 3, 7, 16, 31, 64, 127, 128, 129, 255, 256, 257, 300]),
                   st.integers(1, 300))
# Row patterns applied on top of the values: what FlashInfer / vLLM met in production.
ROW_PATTERNS = ["plain"] * 12 + ["nan_entry", "nan_row", "pinf_one", "pinf_some", "nan_and_pinf",
                "ninf_half", "ninf_all", "single_finite", "constant", "ninf_but_pinf"]
VALUE_KINDS = ["normal", "ties", "ties", "extreme", "tiny_spread"]


def _values(shape, kind, dtype, gen):
    """fp32 values exactly representable in `dtype` (so every dtype sees the same ties)."""
    if kind == "normal":
        x = torch.randn(shape, generator=gen) * 3
    elif kind == "ties":  # a tiny set: ties at the top, at the top-k boundary, in the top-p class
        x = torch.randint(-3, 2, shape, generator=gen).float() * 0.5
    elif kind == "tiny_spread":  # values 1 ulp-ish apart around a large offset
        x = 100.0 + torch.randint(0, 4, shape, generator=gen).float() * 0.0625
    else:  # extreme: the dtype's largest finite values of both signs among ordinary ones
        big = torch.finfo(dtype).max
        x = torch.randn(shape, generator=gen) * 3
        pick = torch.randint(0, 4, shape, generator=gen)
        x = torch.where(pick == 0, torch.full_like(x, big), torch.where(pick == 1, torch.full_like(x, -big), x))
    return x.to(dtype).float()


def _apply_pattern(row: torch.Tensor, pattern: str, gen) -> None:
    v = row.shape[0]
    i = int(torch.randint(0, v, (1,), generator=gen))
    if pattern == "nan_entry":
        row[i] = NAN
    elif pattern == "nan_row":
        row[:] = NAN
    elif pattern == "pinf_one":
        row[i] = POS
    elif pattern == "pinf_some":
        row[::3] = POS
    elif pattern == "nan_and_pinf":
        row[i] = POS
        row[(i + 1) % v] = NAN
    elif pattern == "ninf_half":
        row[::2] = NEG
    elif pattern == "ninf_all":
        row[:] = NEG
    elif pattern == "single_finite":
        keep = row[i].clone()
        row[:] = NEG
        row[i] = keep
    elif pattern == "constant":
        row[:] = row[i]
    elif pattern == "ninf_but_pinf":
        row[:] = NEG
        row[i] = POS


def strided(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as x (last dim = vocabulary) in another memory layout."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "every-other":  # the vocabulary at stride 2
        big = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    assert layout == "transposed"  # the vocabulary outermost in memory
    perm = list(range(x.dim()))[::-1]
    return x.permute(*perm).contiguous().permute(*perm)


LAYOUTS = st.sampled_from(["contiguous", "every-other", "transposed"])


@st.composite
def logit_rows(draw, lead_shape, vocab):
    """fp32 values [*lead_shape, V] with a drawn value kind and a drawn pattern per row (the
    caller casts to the dtype: values are exact in every dtype, so the cast changes nothing but
    the +-max of `extreme`, drawn for the dtype in use)."""
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(VALUE_KINDS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = _values((*lead_shape, vocab), kind, dtype, gen)
    flat = x.reshape(-1, vocab)
    patterns = draw(st.lists(st.sampled_from(ROW_PATTERNS), min_size=flat.shape[0], max_size=flat.shape[0]))
    for r, pattern in enumerate(patterns):
        _apply_pattern(flat[r], pattern, gen)
    return x.to(dtype), dtype


TEMPERATURES = [0.0, 1e-30, 1e-45, 0.25, 1.0, 1.0, 1.7, 1e30, POS]
TOP_P = [1.0, 1.0, 1e-7, 0.25, 0.5, 0.9, 0.999, "boundary"]
MIN_P = [0.0, 0.0, 1.0, 0.5, 0.1, 1e-6, "boundary"]
SEEDS = [0, 1, -1, INT64_MIN, INT64_MAX, 12345]
OFFSETS = [0, 1, 2**40, INT64_MAX - 8, INT64_MAX]
BAD = {"temperature": [-1.0, NAN], "top_k": [-1], "top_p": [0.0, 1.5, NAN, -0.5], "min_p": [-0.1, 1.5, NAN]}


def _min_p_boundary(x: torch.Tensor, temperature: float, i: int) -> float:
    """A min-p equal to the fp32 weight exp((x_i - m) / T) of token i of row x: that token sits
    exactly on the cut (kept, as e_i >= min_p)."""
    x, invalid, _ = R._prepare_rows(x[None].float())
    x = x[0]
    i = i % x.shape[0]
    if bool(invalid[0]) or not bool(x[i] > NEG):
        return 0.5
    inv_t = 0.0 if math.isinf(temperature) else (1.0 / temperature if temperature > 0 else 1.0)
    if math.isinf(inv_t):
        inv_t = 1.0
    e = float(torch.exp((x[i] - x.max()) * torch.tensor(inv_t, dtype=torch.float32)))
    return min(max(e, 0.0), 1.0)


def _top_p_boundary(x: torch.Tensor, temperature: float, j: int) -> float:
    """A top-p that the fp32 cumulative mass of row x's j+1 most likely tokens hits (nearly)
    exactly: the tie-and-rounding edge of the top-p rule."""
    x, invalid, _ = R._prepare_rows(x[None].float())
    x = x[0]
    if bool(invalid[0]):
        return 0.5
    m = x.max()
    inv_t = 0.0 if math.isinf(temperature) else (1.0 / temperature if temperature > 0 else 1.0)
    if math.isinf(inv_t):
        inv_t = 1.0
    e = torch.where(x > NEG, torch.exp((x - m) * inv_t), torch.zeros_like(x))
    es = torch.sort(e, descending=True).values
    cum = torch.cumsum(es, 0)
    p = float((cum[min(j, cum.shape[0] - 1)] / es.sum()).float())
    return min(max(p, 1e-7), 1.0)


@st.composite
def row_parameters(draw, logits2d: torch.Tensor, allow_bad: bool):
    """The six per-row sampling parameters of a [B, V] call, each a Python scalar or a tensor
    [B] (a tensor may hold out-of-range rows when allow_bad: the kernels must give -1 there).
    Returns (RowParams for the kernels / ops, reference keyword arguments, any row bad)."""
    b, v = logits2d.shape
    choices = {
        "temperature": TEMPERATURES,
        "top_k": [0, 0, 1, 2, max(v - 1, 0), v, v + 1, 2**31 - 1],
        "top_p": TOP_P,
        "min_p": MIN_P,
    }
    params, ref = {}, {}
    any_bad = False
    temps = None
    for name, values in choices.items():
        as_tensor = b > 0 and draw(st.booleans())
        pool = values + ([2**40] if name == "top_k" else [])  # int64 above int32: clamped, keeps all
        if as_tensor:
            vals = draw(st.lists(st.sampled_from(pool), min_size=b, max_size=b))
            if allow_bad and draw(st.integers(0, 5)) == 0:  # one out-of-range row (the device case)
                vals[draw(st.integers(0, b - 1))] = draw(st.sampled_from(BAD[name]))
            expanded = draw(st.integers(0, 3)) == 0  # one value for every row, as a stride-0 view
            if expanded:
                vals = [vals[0]] * b
        else:
            vals = [draw(st.sampled_from(pool))] * max(b, 1)
        if name == "top_p":
            vals = [(_top_p_boundary(logits2d[r], temps[r], draw(st.integers(0, v))) if b else 0.5)
                    if p == "boundary" else p for r, p in enumerate(vals)]
        if name == "min_p":
            vals = [(_min_p_boundary(logits2d[r], temps[r], draw(st.integers(0, v))) if b else 0.5)
                    if p == "boundary" else p for r, p in enumerate(vals)]
        if name == "temperature":
            temps = vals if b else [1.0]
        any_bad |= any(x in BAD[name] or (isinstance(x, float) and math.isnan(x)) for x in vals[:b])
        if as_tensor:
            dtype = torch.int64 if name == "top_k" else torch.float32
            t = torch.tensor(vals[0], dtype=dtype).expand(b) if expanded else torch.tensor(vals, dtype=dtype)
            if name == "top_k":
                params[name] = RowParam(t.clamp(max=2**31 - 1).to(torch.int32), 0)
            else:
                params[name] = RowParam(t, 0.0)
            ref[name] = t
        else:
            scalar = min(vals[0], 2**31 - 1) if name == "top_k" else vals[0]
            params[name] = RowParam(None, scalar)
            ref[name] = scalar
    for name, values in (("seed", SEEDS), ("offset", OFFSETS)):
        if b > 0 and draw(st.booleans()):
            t = torch.tensor(draw(st.lists(st.sampled_from(values) | st.integers(INT64_MIN, INT64_MAX),
                                           min_size=b, max_size=b)), dtype=torch.int64)
            params[name] = RowParam(t, 0)
            ref[name] = t
        else:
            s = draw(st.sampled_from(values) | st.integers(INT64_MIN, INT64_MAX))
            params[name] = RowParam(None, s)
            ref[name] = s
    return RowParams(**params), ref, any_bad


WEIGHT_ROWS = ["random", "random", "equal", "some_zero", "one_nonzero", "tiny", "huge"]
BAD_WEIGHT_ROWS = ["nan", "negative", "all_zero", "inf"]


def _weight_row(kind: str, m: int, gen) -> list[float]:
    w = (torch.rand(m, generator=gen) + 0.01).tolist()
    if kind == "equal":
        return [0.5] * m
    if kind == "some_zero":
        return [x if i % 2 else 0.0 for i, x in enumerate(w)] if m > 1 else w
    if kind == "one_nonzero":
        j = int(torch.randint(0, m, (1,), generator=gen))
        return [1.0 if i == j else 0.0 for i in range(m)]
    if kind == "tiny":
        return [x * 1e-30 for x in w]
    if kind == "huge":
        return [x * 1e30 for x in w]
    if kind == "nan":
        return [NAN] + w[1:]
    if kind == "negative":
        return [-x if i == m - 1 else x for i, x in enumerate(w)]
    if kind == "all_zero":
        return [0.0] * m
    if kind == "inf":
        return [POS] + w[1:]
    return w


@st.composite
def weight_tensors(draw, m: int, b: int, allow_bad: bool):
    """weights [M] or [B, M] (possibly a transposed view); bad rows only when allow_bad and 2-D."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    if b == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(WEIGHT_ROWS))
        return torch.tensor(_weight_row(kind, m, gen), dtype=torch.float32)
    kinds = draw(st.lists(st.sampled_from(WEIGHT_ROWS), min_size=b, max_size=b))
    if allow_bad and draw(st.integers(0, 3)) == 0:  # one bad row (device weights are not checked)
        kinds[draw(st.integers(0, b - 1))] = draw(st.sampled_from(BAD_WEIGHT_ROWS))
    w = torch.tensor([_weight_row(k, m, gen) for k in kinds], dtype=torch.float32)
    return w.t().contiguous().t() if draw(st.booleans()) else w


# --------------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------------


def _valid_params(ref: dict) -> dict:
    """The reference kwargs with out-of-range tensor rows replaced by neutral values (for the
    borderline test, which assumes valid parameters; those rows are -1 anyway)."""
    out = dict(ref)
    for name, neutral in (("temperature", 1.0), ("top_p", 1.0), ("min_p", 0.0)):
        v = ref[name]
        if isinstance(v, torch.Tensor):
            bad = torch.isnan(v) | (v < 0)
            if name != "temperature":
                bad |= v > 1
            if name == "top_p":
                bad |= v <= 0
            out[name] = torch.where(bad, torch.full_like(v, neutral), v)
    if isinstance(ref["top_k"], torch.Tensor):
        out["top_k"] = ref["top_k"].clamp(min=0)
    return out


def _sampling_kwargs(ref: dict) -> dict:
    return {k: ref[k] for k in ("temperature", "top_k", "top_p", "min_p")}


def check_tokens(got, want, x, ref, what, *, stream=None, near_ties=False):
    """got == want row by row, -1 exactly where the reference has -1, every token in [0, V) and
    in the reference's kept set; a differing row must be borderline (or, with near_ties, a
    near-tie of the Gumbel scores as assert_tokens_match accepts it)."""
    b, v = x.shape
    assert got.dtype == torch.int64 and got.shape == (b,), f"{what}: {got.dtype} {tuple(got.shape)}"
    assert bool(((got == -1) | ((got >= 0) & (got < v))).all()), f"{what}: token out of range {got.tolist()}"
    assert torch.equal(got == -1, want == -1), f"{what}: -1 rows differ: got {got.tolist()} want {want.tolist()}"
    if b == 0:
        return
    valid = _valid_params(ref)
    kept = R.kept_mask_reference(x, **_sampling_kwargs(ref))
    xp = R._prepare_rows(x.float())[0]
    border = borderline_rows(xp, **_sampling_kwargs(valid)) & (want >= 0)
    for r in range(b):
        g = int(got[r])
        if g >= 0 and not bool(border[r]):
            assert bool(kept[r, g]), f"{what}: row {r} token {g} is outside the reference's kept set"
    if near_ties:
        assert_tokens_match(torch.where(border, want, got), want, x, **_sampling_kwargs(valid), seed=ref["seed"],
                            offset=ref["offset"], stream=stream or 0, max_mismatch_frac=1.0)
        return
    diff = ((got != want) & ~border).nonzero().flatten().tolist()
    assert not diff, f"{what}: rows {diff} got {got[diff].tolist()} want {want[diff].tolist()} (not borderline)"


def assert_logprobs_match(got, want, what):
    assert got.dtype == torch.float32 and got.shape == want.shape, f"{what}: {got.dtype} {tuple(got.shape)}"
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN positions differ"
    assert torch.equal(got == NEG, want == NEG), f"{what}: -inf positions differ"
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite), f"{what}: finite positions differ"
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=2e-5, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------------------------
# sample
# --------------------------------------------------------------------------------------------


# Candidate capacity of the Triton threshold search: small ones force its bracket refinement
# (the path long rows take on the GPU; under the interpreter a row of V <= 300 fits otherwise).
CAPS = st.sampled_from([None, None, 2, 4, 16])


@st.composite
def sample_cases(draw, max_batch=6, allow_bad=True, vocabs=VOCABS):
    b = draw(batch_sizes(max_batch))
    v = draw(vocabs)
    x, dtype = draw(logit_rows((b,), v))
    layout = draw(LAYOUTS)
    rows, ref, bad = draw(row_parameters(x.float(), allow_bad))
    return strided(x, layout), rows, ref, bad, draw(CAPS)


def _run_sample(path, logits, rows, ref, bad, cap=None):
    if path == "triton":
        if not bad and cap is None and use_public(rows):
            return K.sample(logits, **public_kwargs(ref))
        return _launch_sample(logits, rows, cap=cap)[0]
    if not bad and use_public(rows):
        with cpu_path():
            return K.sample(logits, **public_kwargs(ref))
    return torch.ops.me.sample(logits, *rows.flat())


def use_public(rows: RowParams) -> bool:
    """Alternates between the public function (valid parameters only: it range-checks CPU
    tensors) and the launcher / op itself."""
    return rows["seed"].tensor is None


def public_kwargs(ref: dict) -> dict:
    """The reference's arguments as a caller passes them: a negative Python seed as its unsigned
    64-bit twin (the public functions take seeds modulo 2**64), top_k tensors as int64."""
    out = dict(ref)
    for name in ("seed", "offset"):
        if not isinstance(out[name], torch.Tensor) and out[name] < 0:
            out[name] += 2**64
    return out


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(40)
@given(case=sample_cases())
def test_fuzz_sample(path, case):
    logits, rows, ref, bad, cap = case
    want = R.sample_reference(logits, **ref)
    got = _run_sample(path, logits, rows, ref, bad, cap)
    check_tokens(got, want, logits, ref, f"sample[{path}]")


@needs_interpreter
@fuzz_settings(8)
@given(case=sample_cases(max_batch=2, vocabs=st.sampled_from([513, 700, 1024, 1100])))
def test_fuzz_sample_triton_multi_tile(case):
    """Rows longer than one interpreted tile (512): the cross-tile maxima and threshold search."""
    logits, rows, ref, bad, cap = case
    want = R.sample_reference(logits, **ref)
    got = _launch_sample(logits, rows, cap=cap)[0]
    check_tokens(got, want, logits, ref, "sample[triton, multi-tile]")


@fuzz_settings(150)
@given(case=sample_cases(max_batch=3))
def test_fuzz_sample_compiled_many(case):
    """More, smaller examples for the compiled kernel (cheap; the interpreter gets fewer above)."""
    logits, rows, ref, bad, _cap = case
    want = R.sample_reference(logits, **ref)
    got = _run_sample("compiled", logits, rows, ref, bad)
    check_tokens(got, want, logits, ref, "sample[compiled]")


# --------------------------------------------------------------------------------------------
# select_members / me_step
# --------------------------------------------------------------------------------------------


@st.composite
def select_cases(draw):
    m = draw(st.integers(1, 5))
    b = draw(batch_sizes(6))
    w = draw(weight_tensors(m, b, allow_bad=True))
    seed = draw(st.sampled_from(SEEDS) | st.integers(INT64_MIN, INT64_MAX))
    if b and draw(st.booleans()):
        seed = torch.tensor(draw(st.lists(st.integers(INT64_MIN, INT64_MAX), min_size=b, max_size=b)))
    offset = draw(st.sampled_from(OFFSETS) | st.integers(INT64_MIN, INT64_MAX))
    if b and draw(st.booleans()):
        offset = torch.tensor(draw(st.lists(st.sampled_from(OFFSETS), min_size=b, max_size=b)))
    return w, b, seed, offset


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(60)
@given(case=select_cases())
def test_fuzz_select_members(path, case):
    w, b, seed, offset = case
    want = R.select_members_reference(w, seed=seed, offset=offset, batch=b)
    rows = RowParams(seed=RowParam(seed, 0) if isinstance(seed, torch.Tensor) else RowParam(None, seed),
                     offset=RowParam(offset, 0) if isinstance(offset, torch.Tensor) else RowParam(None, offset))
    if path == "triton":
        got = _launch_select_members(w, rows, b)
    else:
        got = torch.ops.me.select_members(w, *rows.flat(), b)
    assert got.dtype == torch.int32 and got.shape == (b,)
    m = w.shape[-1]
    assert bool(((got == -1) | ((got >= 0) & (got < m))).all()), got.tolist()
    assert torch.equal(got, want), f"select_members[{path}]: got {got.tolist()} want {want.tolist()}"
    # a chosen member always has positive weight
    w2 = w if w.dim() == 2 else w[None].expand(b, -1)
    for r in range(b):
        if int(got[r]) >= 0:
            assert float(w2[r, int(got[r])]) > 0


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(30)
@given(case=sample_cases(max_batch=4), data=st.data())
def test_fuzz_me_step(path, case, data):
    logits, rows, ref, bad, cap = case
    b = logits.shape[0]
    m = data.draw(st.integers(1, 4))
    w = data.draw(weight_tensors(m, b, allow_bad=True))
    shared = data.draw(st.booleans())
    want_t, want_m = R.me_step_reference(logits, w, **ref, shared=shared)
    if path == "triton":
        got_t, got_m = _launch_sample(logits, rows, weights=w, shared=shared, cap=cap)
    else:
        got_t, got_m = torch.ops.me.me_step(logits, w, *rows.flat(), shared)
    check_tokens(got_t, want_t, logits, ref, f"me_step[{path}]")
    assert got_m.dtype == torch.int32 and got_m.shape == (b,)
    assert torch.equal(got_m, want_m), f"me_step[{path}] members: got {got_m.tolist()} want {want_m.tolist()}"


# --------------------------------------------------------------------------------------------
# mixture_logprobs / mixture_sample
# --------------------------------------------------------------------------------------------


@st.composite
def mixture_cases(draw, max_batch=5, max_members=4, allow_bad=True):
    m = draw(st.integers(1, max_members))
    b = draw(batch_sizes(max_batch))
    v = draw(VOCABS)
    x, dtype = draw(logit_rows((m, b), v))
    w = draw(weight_tensors(m, b, allow_bad=allow_bad))
    return strided(x, draw(LAYOUTS)), w


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(40)
@given(case=mixture_cases())
def test_fuzz_mixture_logprobs(path, case):
    logits, w = case
    want = R.mixture_logprobs_reference(logits, w)
    if path == "triton":
        got = _launch_logprobs(logits, w)
    else:
        got = torch.ops.me.mixture_logprobs(logits, w)
    assert_logprobs_match(got, want, f"mixture_logprobs[{path}]")


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(30)
@given(case=mixture_cases(max_batch=4, max_members=3), data=st.data())
def test_fuzz_mixture_sample(path, case, data):
    logits, w = case
    x = R.mixture_logprobs_reference(logits, w)
    rows, ref, bad = data.draw(row_parameters(torch.nan_to_num(x, nan=NEG), allow_bad=True))
    want = R.mixture_sample_reference(logits, w, **ref)
    if path == "triton":
        got = _launch_mixture_sample(logits, w, rows, cap=data.draw(CAPS))
    else:
        got = torch.ops.me.mixture_sample(logits, w, *rows.flat())
    # The Triton kernel computes the mixture itself (last-bit differences: near-ties allowed);
    # the compiled kernel must draw the reference's tokens exactly.
    check_tokens(got, want, x, ref, f"mixture_sample[{path}]", stream=STREAM_MIXTURE, near_ties=path == "triton")


# --------------------------------------------------------------------------------------------
# verify_draft
# --------------------------------------------------------------------------------------------


@st.composite
def verify_cases(draw, max_batch, max_positions, max_vocab):
    m = draw(st.integers(1, 3))
    b = draw(batch_sizes(max_batch))
    j = draw(st.integers(1, max_positions))
    v = draw(st.integers(1, max_vocab) | st.sampled_from([1, 2, 7, 31]))
    target, _ = draw(logit_rows((m, b, j), v))
    draft, _ = draw(logit_rows((b, j), v))
    w = draw(weight_tensors(m, b, allow_bad=True))
    rows, ref, bad = draw(row_parameters(draft.float().reshape(b * j, v) if b else draft.float().reshape(0, v),
                                         allow_bad=True))
    # parameters per row, not per position: row_parameters drew them for B*J rows; keep row b's
    # first position value (a [B] tensor) so they are valid per-row parameters of verify_draft
    rows, ref = _per_row(rows, ref, b, j)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    how = draw(st.sampled_from(["drafted", "drafted", "random", "out_of_range"]))
    if how == "drafted" and b:
        # as the runtime makes them: position i drawn from q_i at (seed, offset + i)
        off = ref["offset"] if isinstance(ref["offset"], torch.Tensor) else torch.full((b,), ref["offset"])
        cols = [R.sample_reference(draft[:, i].float(), **_sampling_kwargs(_valid_params(ref)), seed=ref["seed"],
                                   offset=off + i) for i in range(j)]
        tokens = torch.stack(cols, 1).clamp(min=0)
    elif how == "random":
        tokens = torch.randint(0, v, (b, j), generator=gen)
    else:
        pool = torch.tensor([-1, v, v + 1, INT64_MIN, INT64_MAX, 0, v - 1])
        tokens = pool[torch.randint(0, pool.shape[0], (b, j), generator=gen)]
    if how != "out_of_range" and draw(st.booleans()):
        tokens = tokens.to(torch.int32)  # any integer dtype is taken
    nd_kind = draw(st.sampled_from(["none", "int", "tensor"]))
    if nd_kind == "none":
        num_drafts = RowParam(None, j)
        nd_ref = None
    elif nd_kind == "int":
        n = draw(st.integers(0, j))
        num_drafts, nd_ref = RowParam(None, n), n
    else:
        t = torch.randint(0, j + 1, (b,), generator=gen)
        num_drafts, nd_ref = RowParam(t, j), t
    return (strided(target, draw(LAYOUTS)), strided(draft, draw(LAYOUTS)), tokens, w, num_drafts, nd_ref,
            rows, ref)


def _per_row(rows: RowParams, ref: dict, b: int, j: int):
    new_rows, new_ref = {}, {}
    for name in ("temperature", "top_k", "top_p", "min_p", "seed", "offset"):
        p = rows[name]
        if p.tensor is None:
            new_rows[name], new_ref[name] = p, ref[name]
        else:
            new_rows[name] = RowParam(p.tensor[::j].contiguous(), p.scalar)
            new_ref[name] = ref[name][::j].contiguous()
    return RowParams(**new_rows), new_ref


@pytest.mark.parametrize("path", PATHS)
@fuzz_settings(25)
@given(data=st.data())
def test_fuzz_verify_draft(path, data):
    # the interpreter runs one program per (row, position): keep its examples small
    small = path == "triton"
    case = data.draw(verify_cases(max_batch=3 if small else 5, max_positions=2 if small else 4,
                                  max_vocab=64 if small else 300))
    target, draft, tokens, w, num_drafts, nd_ref, rows, ref = case
    want_n, want_t = R.verify_draft_reference(target, draft, tokens, w, num_drafts=nd_ref, **ref)
    if path == "triton":
        got_n, got_t = _launch_verify(target, draft, tokens, w, num_drafts, rows)
    else:
        got_n, got_t = torch.ops.me.verify_draft(target, draft, tokens, w, num_drafts.tensor, num_drafts.scalar,
                                                 *rows.flat())
    b, j, v = draft.shape
    assert got_n.dtype == torch.int64 and got_t.dtype == torch.int64
    nd = torch.full((b,), j) if nd_ref is None else torch.as_tensor(nd_ref).expand(b)
    assert bool(((got_n >= 0) & (got_n <= nd)).all()), got_n.tolist()
    assert bool(((got_t == -1) | ((got_t >= 0) & (got_t < v))).all()), got_t.tolist()
    assert torch.equal(got_n, want_n) and torch.equal(got_t, want_t), (
        f"verify_draft[{path}]: n {got_n.tolist()} token {got_t.tolist()}; "
        f"reference n {want_n.tolist()} token {want_t.tolist()}")


# --------------------------------------------------------------------------------------------
# group_rows / grouped_linear (compiled ops only: their other kernels are CUDA)
# --------------------------------------------------------------------------------------------


@st.composite
def member_ids(draw, t, m, allow_out_of_range=True):
    pool = st.integers(0, m - 1)
    if allow_out_of_range and draw(st.integers(0, 3)) == 0:
        pool = pool | st.sampled_from([-1, m, m + 1, -(2**31), 2**31 - 1])
    return torch.tensor(draw(st.lists(pool, min_size=t, max_size=t)), dtype=torch.int32)


@fuzz_settings(100)
@given(data=st.data())
def test_fuzz_group_rows(data):
    m = data.draw(st.integers(1, 6) | st.sampled_from([100, 1000]))
    t = data.draw(st.integers(0, 40))
    members = data.draw(member_ids(t, m))
    if t and data.draw(st.booleans()):  # a strided view of the ids
        big = torch.zeros(2 * t, dtype=torch.int32)
        big[::2] = members
        members = big[::2]
    valid = bool(((members >= 0) & (members < m)).all())
    for call in (lambda: torch.ops.me.group_rows(members, m), lambda: K.group_rows(members, m),
                 lambda: K.group_rows(members.to(torch.int64), m)):
        if not valid:
            with pytest.raises(ValueError):
                call()
            continue
        order, offsets = call()
        want_order, want_offsets = R.group_rows_reference(members, m)
        assert order.dtype == torch.int32 and offsets.dtype == torch.int32
        assert torch.equal(order, want_order) and torch.equal(offsets, want_offsets)
    # int64 ids beyond int32 must not wrap into valid ones
    if t:
        wide = members.to(torch.int64)
        wide[data.draw(st.integers(0, t - 1))] = data.draw(st.sampled_from([2**32, 2**32 + 1, -(2**32), 2**40]))
        with pytest.raises(ValueError):
            K.group_rows(wide, m)


@fuzz_settings(60)
@given(data=st.data())
def test_fuzz_grouped_linear(data):
    m = data.draw(st.integers(1, 4))
    t = data.draw(st.integers(0, 20))
    k = data.draw(st.integers(1, 40))
    n = data.draw(st.integers(1, 20))
    dtype = data.draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
    kind = data.draw(st.sampled_from(["normal", "ties", "zeros", "special"]))
    if kind == "ties":
        x = torch.randint(-2, 3, (t, k), generator=gen).float()
        weight = torch.randint(-2, 3, (m, n, k), generator=gen).float() * 0.25
    else:
        x = torch.randn(t, k, generator=gen)
        weight = torch.randn(m, n, k, generator=gen) / math.sqrt(k)
        if kind == "zeros":
            x[:, ::2] = 0.0
        if kind == "special" and t:  # NaN / inf inputs, and zeros beside them (inf * 0 = NaN)
            x[0, 0] = NAN
            x[-1, -1] = POS
            weight[:, :, 0] = 0.0
    x, weight = x.to(dtype), weight.to(dtype)
    bias = None
    if data.draw(st.booleans()):
        bias = (torch.randint(-2, 3, (m, n), generator=gen) * 0.5 if kind == "ties"
                else torch.randn(m, n, generator=gen)).to(dtype)
    layout = data.draw(st.sampled_from(["contiguous", "every-other", "transposed"]))
    x = strided(x, layout)
    if data.draw(st.booleans()):
        weight = weight.transpose(1, 2).contiguous().transpose(1, 2)  # K outermost
    members = data.draw(member_ids(t, m))
    valid = bool(((members >= 0) & (members < m)).all())
    for call in (lambda: torch.ops.me.grouped_linear(x, members, weight, bias),
                 lambda: K.grouped_linear(x, members.to(torch.int64), weight, bias)):
        if not valid:
            with pytest.raises(ValueError):
                call()
            continue
        got = call()
        want = R.grouped_linear_reference(x, members, weight, bias)
        assert got.dtype == dtype and got.shape == (t, n)
        # non-finite outputs (NaN / inf inputs) where the reference has them, the same ones
        assert torch.equal(torch.isnan(got), torch.isnan(want)), "grouped_linear: NaN positions differ"
        inf = torch.isinf(want)
        assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], want[inf])
        # finite ones against the fp64 oracle, within the rounding bound of tests/test_grouped_linear.py
        exact, scale = oracle(x, members, weight, bias)
        tol = OUT_EPS[dtype] * exact.abs() + acc_eps(dtype, k) * scale + 1e-30
        finite = torch.isfinite(exact) & torch.isfinite(scale)
        for name, out in (("kernel", got), ("reference", want)):
            err = (out.double() - exact).abs()
            assert bool((err <= tol)[finite].all()), f"grouped_linear {name}: worst error {float(err[finite].max())}"
        if kind == "ties":  # small integers times 1/4: every sum is exact in fp32, so equal exactly
            assert torch.equal(got, want)
