"""Per-row positions on the "hf" engine: steps take a generated count per row (RowPositions), so
rows of one member's cache hold different numbers of tokens (masked holes between a row's tokens).
Every logit must equal a fresh unpadded forward of the row alone, through ragged catch-ups,
per-row rollbacks, retired rows and cache compaction; members whose caches cannot hold holes
(sliding windows) refuse ragged counts past their window with a clear error."""
from __future__ import annotations

import random

import pytest
import torch

from me_runtime import Ensemble
from me_runtime.decode import Batch, RowPositions
from me_runtime.hf_engine import HFEngine, MemberRunner

from tiny_models import other_architecture_members, tiny_member

V = 12
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


# members of other architectures: learned positions (GPT-2), q/k norms (Qwen3), fused projections (Phi-3)
OTHER_KINDS = {"gpt2": "gpt2-learned-positions", "qwen3": "qwen3", "phi3": "phi3"}


def _member(kind: str) -> MemberRunner:
    """A MemberRunner over a random tiny member of one attention / position kind."""
    if kind in OTHER_KINDS:
        model = other_architecture_members(OTHER_KINDS[kind], 1, vocab_size=V)[0]
    else:
        model = tiny_member("llama", V, seed=7, sharpness=3.0)
        if kind == "llama-eager":
            model.set_attn_implementation("eager")
    runner = MemberRunner(model, CPU)
    if kind == "llama-2d-mask":
        runner.mask_kind = "2d"  # the path of attention kernels that take transformers' 2D mask
    assert runner.mask_kind == {"llama-eager": "4d-float", "llama-2d-mask": "2d"}.get(kind, "4d-bool")
    assert runner.hole_limit is None
    return runner


def _random_batch(rng: random.Random, rows: int, max_new_tokens: int) -> Batch:
    """Rows with random prompts of different lengths, every generated token already random (a
    catch-up reads whatever the batch holds)."""
    prompts = [[rng.randrange(V) for _ in range(rng.randint(1, 7))] for _ in range(rows)]
    batch = Batch(prompts, list(range(rows)), max_new_tokens, CPU)
    generator = torch.Generator().manual_seed(rng.randrange(1 << 31))
    batch.generated.copy_(torch.randint(0, V, batch.generated.shape, generator=generator))
    return batch


def _positions(counts: list[int]) -> RowPositions:
    return RowPositions(list(counts), torch.tensor(counts, dtype=torch.long))


def _row_tokens(batch: Batch, row: int, generated: int) -> list[int]:
    """Row `row`'s prompt and its first `generated` generated tokens, unpadded."""
    prompt = batch.prompt_ids[row, batch.width - batch.prompt_lens[row]:].tolist()
    return prompt + batch.generated[row, :generated].tolist()


@torch.no_grad()
def _fresh_logits(model, tokens: list[int], span: int = 1) -> torch.Tensor:
    """The logits of the last `span` tokens of an unpadded forward of one row alone, no cache."""
    logits = model(input_ids=torch.tensor([tokens])).logits[0, -span:]
    return logits[0] if span == 1 else logits


def _assert_rows_fresh(runner: MemberRunner, batch: Batch, logits: torch.Tensor, counts: list[int], span: int = 1):
    assert logits.shape == ((batch.size, V) if span == 1 else (batch.size, span, V))
    for row in range(batch.size):
        want = _fresh_logits(runner.model, _row_tokens(batch, row, counts[row]), span)
        torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4, msg=lambda m, row=row: f"row {row}: {m}")


KINDS = ["llama-sdpa", "llama-eager", "llama-2d-mask", "gpt2"]


@pytest.mark.parametrize("kind", KINDS + ["qwen3", "phi3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_ragged_catch_ups_equal_fresh_forwards(kind, seed):
    """Several steps in a row, each row reading its own random number of new tokens (zero too: a
    row with nothing pending re-reads its last token), from a ragged first read on."""
    rng = random.Random(seed)
    runner = _member(kind)
    batch = _random_batch(rng, rows=5, max_new_tokens=40)
    counts = [rng.randint(0, 3) for _ in range(batch.size)]
    counts[rng.randrange(batch.size)] = 0  # a row that reads only its prompt at first
    holed = False
    with torch.inference_mode():
        for _ in range(7):
            logits = runner.catch_up(batch, _positions(counts))
            _assert_rows_fresh(runner, batch, logits, counts)
            assert runner.seen == [n + c for n, c in zip(batch.prompt_lens, counts)]
            holed |= runner.runs is not None
            counts = [c + rng.choice([0, 1, 1, 2, 5]) for c in counts]
    assert holed, "no step left holes: the test would not exercise the masks of ragged rows"


@pytest.mark.parametrize("kind", KINDS)
def test_per_row_rollback_then_reread_equals_fresh(kind):
    rng = random.Random(3)
    runner = _member(kind)
    batch = _random_batch(rng, rows=4, max_new_tokens=30)
    with torch.inference_mode():
        runner.catch_up(batch, _positions([6, 9, 2, 7]))
        runner.catch_up(batch, _positions([10, 11, 8, 12]))
        # each row forgets its own tail (row 2 down into its prompt: -1 drops the prompt's last token)
        runner.rollback(batch, _positions([7, 11, -1, 3]))
        assert runner.seen == [n + c for n, c in zip(batch.prompt_lens, [7, 11, -1, 3])]
        assert runner.runs is not None  # rows now end at different columns
        counts = [9, 13, 2, 6]
        logits = runner.catch_up(batch, _positions(counts), span=2)
        _assert_rows_fresh(runner, batch, logits, counts, span=2)
        # a rollback of the same tail in every row crops it (lock-step int t)
        columns = runner.cache_len
        logits = runner.catch_up(batch, _positions([c + 3 for c in counts]))
        _assert_rows_fresh(runner, batch, logits, [c + 3 for c in counts])
        runner.rollback(batch, _positions([c + 1 for c in counts]))
        assert runner.cache_len == columns + 1  # 3 columns appended, the 2 dropped in every row cropped
        logits = runner.catch_up(batch, _positions([c + 2 for c in counts]))
        _assert_rows_fresh(runner, batch, logits, [c + 2 for c in counts])


@pytest.mark.parametrize("kind", ["llama-sdpa", "llama-eager", "gpt2"])
def test_retiring_rows_in_the_middle_keeps_holes_exact_and_trims(kind):
    rng = random.Random(5)
    runner = _member(kind)
    prompts = [[1, 2], [3] * 11, [4, 5, 6], [7], [8, 9, 10, 11]]
    batch = Batch(prompts, [0] * 5, 30, CPU)
    batch.generated.copy_(torch.randint(0, V, batch.generated.shape, generator=torch.Generator().manual_seed(5)))
    counts = [2, 0, 5, 1, 3]
    with torch.inference_mode():
        for step in range(6):
            logits = runner.catch_up(batch, _positions(counts))
            _assert_rows_fresh(runner, batch, logits, counts)
            if step in (1, 3):  # the long prompt's row, then the middle row, leave
                keep = [r for r in range(batch.size) if r != (1 if step == 1 else batch.size // 2)]
                keep_dev = torch.tensor(keep)
                before = runner.cache_len
                batch.keep(keep, keep_dev)
                runner.keep(keep, keep_dev)
                counts = [counts[r] for r in keep]
                if step == 1:  # the 11-token prompt's leading columns held nothing for the others
                    assert runner.cache_len < before
            counts = [c + rng.randint(0, 3) for c in counts]
        logits = runner.catch_up(batch, _positions(counts))
        _assert_rows_fresh(runner, batch, logits, counts)


def test_compaction_bounds_the_cache_and_stays_exact():
    """Rows that take turns reading many tokens leave more hole than token: the cache is then
    compacted (every row's tokens moved to the end), and stays within twice the longest row."""
    runner = _member("llama-sdpa")
    batch = _random_batch(random.Random(9), rows=3, max_new_tokens=60)
    counts = [0, 0, 0]
    compactions = []
    compact = runner._compact
    runner._compact = lambda: (compactions.append(runner.cache_len), compact())
    with torch.inference_mode():
        for step in range(12):
            counts[step % 3] += 4  # the other rows have nothing pending: they re-read one token
            logits = runner.catch_up(batch, _positions(counts))
            _assert_rows_fresh(runner, batch, logits, counts)
            assert runner.cache_len <= 2 * max(runner.seen)
    assert compactions


def test_lock_step_keeps_the_contiguous_layout():
    """int t (and RowPositions with one count) never builds per-column state: the cache holds the
    prompts' left padding and the generated tokens, nothing more."""
    runner = _member("llama-sdpa")
    batch = _random_batch(random.Random(2), rows=3, max_new_tokens=12)
    with torch.inference_mode():
        for t in (0, 1, 4, 5):
            logits = runner.catch_up(batch, t)
            _assert_rows_fresh(runner, batch, logits, [t] * 3)
            assert runner.runs is None and runner.valid is None
            assert runner.cache_len == batch.width + t
        runner.rollback(batch, 2)
        assert runner.cache_len == batch.width + 2 and runner.runs is None
        logits = runner.catch_up(batch, _positions([6, 6, 6]), span=3)
        _assert_rows_fresh(runner, batch, logits, [6] * 3, span=3)
        assert runner.runs is None


# ---------------------------------------------------------------------------------------------
# The engine: member_logits / all_member_logits / span_logits / rollback with RowPositions
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members():
    return [tiny_member(arch, V, seed=30 + i, sharpness=3.0) for i, arch in enumerate(("llama", "qwen2", "llama"))]


def test_engine_steps_with_row_positions_equal_fresh_forwards(members):
    engine = HFEngine(members, CPU, V)
    assert engine.per_row_positions
    batch = _random_batch(random.Random(4), rows=4, max_new_tokens=30)
    engine.begin(batch)
    with torch.inference_mode():
        # ME: each row's own member (member 2 is chosen by no row: it does not run)
        counts = [0, 3, 1, 2]
        chosen = [1, 0, 1, 0]
        logits = engine.member_logits(batch, _positions(counts), torch.tensor(chosen), chosen)
        for row, m in enumerate(chosen):
            want = _fresh_logits(members[m], _row_tokens(batch, row, counts[row]))
            torch.testing.assert_close(logits[row], want, atol=1e-4, rtol=1e-4)
        assert engine.runners[2].cache is None
        # CE, then a verification of 3 positions per row, then each row keeps its own accepted run
        counts = [4, 4, 6, 2]
        every = engine.all_member_logits(batch, _positions(counts))
        counts = [c + 2 for c in counts]
        spans = engine.span_logits(batch, _positions(counts), 3)
        assert every.shape == (3, 4, V) and spans.shape == (3, 4, 3, V)
        for m, model in enumerate(members):
            for row in range(batch.size):
                torch.testing.assert_close(every[m, row], _fresh_logits(model, _row_tokens(batch, row, counts[row] - 2)),
                                           atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(spans[m, row], _fresh_logits(model, _row_tokens(batch, row, counts[row]), 3),
                                           atol=1e-4, rtol=1e-4)
        accepted = [counts[0] - 2, counts[1], counts[2] - 1, counts[3] - 3]
        engine.rollback(batch, _positions(accepted))
        for runner in engine.runners[:2]:
            assert runner.seen == [n + a for n, a in zip(batch.prompt_lens, accepted)]
        counts = [a + 1 for a in accepted]
        every = engine.all_member_logits(batch, _positions(counts))
        for m, model in enumerate(members):
            for row in range(batch.size):
                torch.testing.assert_close(every[m, row], _fresh_logits(model, _row_tokens(batch, row, counts[row])),
                                           atol=1e-4, rtol=1e-4)
    engine.end()


# (CE by drafting with per-row positions on the hf engine: tests/test_drafting.py,
# test_rows_keep_their_own_positions_on_both_engines and test_both_engines_give_the_same_tokens.)


# ---------------------------------------------------------------------------------------------
# Members whose caches cannot hold holes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mistral-sliding-window", "gemma2-hybrid-sliding"])
def test_sliding_window_member_refuses_ragged_counts_past_its_window(name):
    models = other_architecture_members(name, 2, vocab_size=V)  # sliding window of 4 columns
    engine = HFEngine(models, CPU, V)
    assert not engine.per_row_positions  # so drafting keeps rows in lock-step on this ensemble
    prompts = [[1], [2, 3, 4], [5, 6]]
    batch = Batch(prompts, [0, 1, 2], 12, CPU)
    batch.generated.copy_(torch.randint(0, V, batch.generated.shape, generator=torch.Generator().manual_seed(1)))
    engine.begin(batch)
    runner = engine.runners[1]
    with torch.inference_mode():
        # a ragged first read is left padding only, and holes within the window are exact
        for counts in ([0, 0, 1], [1, 1, 1]):
            logits = engine.all_member_logits(batch, _positions(counts))
            _assert_rows_fresh(runner, batch, logits[1], counts)
        assert runner.runs is not None and runner.cache_len <= 4
        with pytest.raises(ValueError, match=r"member 0 .*sliding-window attention \(window 4\)"):
            engine.all_member_logits(batch, _positions([3, 2, 4]))
    engine.end()
    # lock-step keeps working past the window
    engine.begin(batch)
    with torch.inference_mode():
        for t in (0, 1, 2, 5, 8):
            logits = engine.all_member_logits(batch, t)
            _assert_rows_fresh(runner, batch, logits[1], [t] * 3)
        engine.rollback(batch, 3)  # past the window: the cache is re-read (exact)
        logits = engine.span_logits(batch, 6, 2)
        _assert_rows_fresh(runner, batch, logits[1], [6] * 3, span=2)
    engine.end()
