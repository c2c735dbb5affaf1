"""How the batcher (minaf3/serve/batcher.py) picks a generate call's rows: the oldest job always, then the
jobs of its group nearest it in prompt length while the call's left padding stays within max_padding, its
size within max_batch_size and the token budget; jobs of other groups and seeded jobs wait their turn."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minaf3.serve.batcher import Batcher, Job
from minaf3.serve.rows import RowSink

CONTEXT = 4096


def job(length: int, key=("greedy",), max_tokens: int = 8, seed=None) -> Job:
    inputs = {"input_ids": torch.zeros(1, length, dtype=torch.long), "attention_mask": torch.ones(1, length)}
    return Job(inputs, RowSink(lambda ids: "", set(), max_tokens), {}, key, seed=seed)


def taken(jobs: list[Job], **options) -> list[Job]:
    """The rows one call would take from a queue holding `jobs` (oldest first); the worker thread idles."""
    batcher = Batcher(None, pad_id=0, context=CONTEXT, **options)
    try:
        with batcher._cond:
            batcher._queue.extend(jobs)
            return batcher._take()
    finally:
        with batcher._cond:
            batcher._queue.clear()
        batcher.close(5)


def padding(rows: list[Job]) -> int:
    return len(rows) * max(r.length for r in rows) - sum(r.length for r in rows)


def lengths(rows: list[Job]) -> list[int]:
    return [r.length for r in rows]


def same(rows: list[Job], expected: list[Job]) -> bool:
    return [id(r) for r in rows] == [id(r) for r in expected]


def test_rows_of_like_length_share_a_call_and_the_others_wait():
    queue = [job(100), job(220), job(104), job(20), job(98), job(215)]
    assert same(taken(queue), [queue[4], queue[0], queue[2]])  # 98, 100, 104, sorted by length
    assert same(taken([queue[1], queue[3], queue[5]]), [queue[5], queue[1]])  # 20 would pad past 25%
    assert lengths(taken(queue, max_padding=10.0)) == sorted(lengths(queue))  # all, when allowed
    assert same(taken(queue, max_padding=0.0), [queue[0]])


def test_the_oldest_always_runs_even_alone():
    queue = [job(40), job(400), job(400)]
    assert same(taken(queue), [queue[0]])
    queue = [job(9000, max_tokens=1), job(9000)]
    assert same(taken(queue), [queue[0]])  # past the budget and the context: it runs alone, and fails alone


def test_other_groups_and_seeded_jobs_wait():
    queue = [job(100), job(100, key=("sample", 0.7)), job(100, seed=3, key=("s", 1)), job(101)]
    assert same(taken(queue), [queue[0], queue[3]])
    assert same(taken(queue[2:]), [queue[2]])  # a seeded job runs alone


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 600), min_size=1, max_size=40),
    max_padding=st.sampled_from([0.0, 0.1, 0.25, 1.0]),
    max_batch_size=st.integers(1, 16),
    budget=st.integers(500, 20_000),
)
def test_a_call_keeps_every_limit_and_cannot_take_a_neighbour_more(
    lengths, max_padding, max_batch_size, budget
):
    queue = [job(n) for n in lengths]
    options = dict(max_padding=max_padding, max_batch_size=max_batch_size, token_budget=budget)
    rows = taken(queue, **options)
    assert any(r is queue[0] for r in rows) and len({id(r) for r in rows}) == len(rows)
    if len(rows) > 1:
        longest = max(r.length for r in rows) + 8
        assert len(rows) <= max_batch_size and len(rows) * longest <= budget
        assert padding(rows) <= max_padding * sum(r.length for r in rows)
    # the rows are a run of the queue sorted by length (ties by age): nothing of like length left between
    order = sorted(range(len(queue)), key=lambda i: (queue[i].length, i))
    at = sorted(order.index(next(i for i, q in enumerate(queue) if q is r)) for r in rows)
    assert at == list(range(at[0], at[0] + len(rows)))

    def fits(run: list[Job]) -> bool:
        longest = max(r.length for r in run)
        return (
            len(run) <= max_batch_size
            and len(run) * (longest + 8) <= budget
            and padding(run) <= max_padding * sum(r.length for r in run)
        )

    for i in (at[0] - 1, at[-1] + 1):  # neither neighbour could have joined
        if 0 <= i < len(order):
            assert not fits(rows + [queue[order[i]]])


@pytest.mark.parametrize("bad", [-0.5])
def test_serve_refuses_a_negative_max_padding(bad):
    from minaf3.cli import build_parser
    from minaf3.errors import ConfigError
    from minaf3.serve.server import options_from

    args = build_parser().parse_args(["serve", "--model", "m", "--max-padding", str(bad)])
    with pytest.raises(ConfigError, match="--max-padding must be >= 0"):
        options_from(args)
