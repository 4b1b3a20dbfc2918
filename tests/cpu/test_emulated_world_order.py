"""The emulated world's launch order, checked without a GPU (stream calls recorded on fakes).

torch hands out pooled streams round-robin (32 per priority), so the caller's stream can BE one of the rank
streams; every fork must be recorded before any rank's work is enqueued, or the later ranks wait behind an earlier
rank's kernel, which waits for them (tokenweave.testing.EmulatedWorld.on_rank_streams).
"""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import pytest
import torch

from tokenweave.testing import EmulatedWorld


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


@pytest.fixture
def world(monkeypatch):
    log, state = [], {}
    streams = [FakeStream(f"rank{r}", log) for r in range(4)]
    state["current"] = streams[1]  # the caller's stream IS rank 1's (a wrapped pool)

    @contextlib.contextmanager
    def on(stream):
        before, state["current"] = state["current"], stream
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: state["current"])
    monkeypatch.setattr(torch.cuda, "stream", on)
    fake = SimpleNamespace(device="cuda:0", world_size=4, streams=streams, ranks=[f"comm{r}" for r in range(4)])
    fake.on_rank_streams = lambda ranks, body: EmulatedWorld.on_rank_streams(fake, ranks, body)
    return SimpleNamespace(fake=fake, log=log, state=state)


def test_every_fork_is_recorded_before_any_rank_works(world):
    log = world.log

    def body(r):
        log.append(("work", world.state["current"].name))
        return r * 10

    out = world.fake.on_rank_streams(range(4), body)
    assert out == {0: 0, 1: 10, 2: 20, 3: 30}
    first_work = next(i for i, e in enumerate(log) if e[0] == "work")
    forks = [e for e in log[:first_work] if e[0] == "wait"]
    assert forks == [("wait", f"rank{r}", "rank1") for r in range(4)], log  # all forks, from the caller's stream
    assert [e for e in log if e[0] == "work"] == [("work", f"rank{r}") for r in range(4)]  # each on its own stream
    joins = log[-4:]
    assert joins == [("wait", "rank1", f"rank{r}") for r in range(4)]  # the caller joins every rank
    assert world.state["current"].name == "rank1"  # the caller's stream is current again


def test_run_returns_each_ranks_result_in_rank_order(world):
    results = EmulatedWorld.run(world.fake, lambda comm, r: (comm, r), ranks=[2, 0])
    assert results == [("comm0", 0), None, ("comm2", 2), None]
