"""Track-and-trigger's launch plan and schedules on CPU: the CUDA streams, events and the extension's ops are
replaced by recorders, the cuBLAS producer's GEMMs run for real (torch.matmul on CPU), so the test sees what
one call enqueues, on which stream, in which order, and that the producer's output covers every row once."""
import contextlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tokenweave import comm as comm_mod
from tokenweave import ops, tuning
from tokenweave import trigger
from tokenweave.trigger import consumers
from tokenweave.trigger import plan as plan_mod


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_event(self, event):
        self.log.append(("wait_event", self.name, event.name))

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))

    def __repr__(self):
        return self.name


class Recorder:
    """The extension's ops: each call logged with the stream it was enqueued on."""

    def __init__(self, log, current):
        self.log, self.current = log, current

    def _add(self, op, **kw):
        self.log.append((op, self.current[-1].name, kw))

    def mark_ready(self, counters, begin, end, pieces):
        self._add("mark_ready", begin=begin, end=end, pieces=pieces)

    def gate_on_counter(self, counters, index, target):
        self._add("gate", index=index, target=target)

    def allreduce(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta):
        self._add("allreduce", rows=x.shape[0], first=x.data_ptr(), ctas=ctas, comm=comm_id)

    def allreduce_tracked(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunk_rows, ready, consumed, full,
                          last):
        self._add("tracked", ctas=ctas, algo=algo, comm=comm_id, targets=(full, last), chunk_rows=chunk_rows)

    def allreduce_staged(self, x, residual, weight, out, eps, comm_id, ctas, chunk_rows, go):
        self._add("staged", ctas=ctas, comm=comm_id, chunk_rows=chunk_rows)

    def copy_engine_stage(self, x, comm_id, ctas, chunk_rows, group_ready, group_chunks, full, last, go, ones):
        self._add("stage", ctas=ctas, group_chunks=group_chunks, chunk_rows=chunk_rows)


@pytest.fixture
def world(monkeypatch):
    log = []
    compute = FakeStream("compute", log)
    current = [compute]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    class Event:
        count = 0

        def __init__(self):
            Event.count += 1
            self.name = f"event{Event.count}"

        def record(self, s):
            log.append(("record", s.name, self.name))

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, s: None)
    monkeypatch.setattr(ops, "_OPS", Recorder(log, current))
    monkeypatch.delenv("CUDA_MODULE_LOADING", raising=False)

    def geometry(comm_id, tokens, hidden, dtype_code, algo, ctas, chunks_per_cta):
        chunk_rows = max(1, -(-tokens // (ctas * chunks_per_cta)))
        n_chunks = -(-tokens // chunk_rows)
        return min(ctas, n_chunks), chunk_rows, n_chunks

    monkeypatch.setattr(plan_mod, "_geometry", geometry)
    c = comm_mod.Communicator.__new__(comm_mod.Communicator)
    c.transport, c._closed, c._error, c._id, c._plans, c._tracker = "p2p", False, None, 7, {}, None
    c.capacity_bytes, c.world_size, c._num_sms = 4096 * 64 * 2, 4, 132
    c._layout = {"one_shot_bytes": c.capacity_bytes // 4, "lamport_max_bytes": 2 << 20}
    c._card, c._symm_allocs, c._err_view = "h200", [], np.zeros(8, dtype=np.int64)
    c.device = torch.device("cpu")
    c.order_stream = lambda: None
    tracker = trigger.Tracker("cpu")
    tracker.stream, tracker.copy_stream = FakeStream("consumer", log), FakeStream("copy", log)
    return SimpleNamespace(log=log, comm=c, tracker=tracker, compute=compute)


def _call(w, consumer, M=1000, ctas=None, groups=None, norm=True):
    g = torch.Generator().manual_seed(M + (ctas or 0))
    x = torch.randn(M, 32, generator=g).to(torch.bfloat16)
    wt = torch.randn(64, 32, generator=g).to(torch.bfloat16)
    partial = torch.full((M, 64), float("nan"), dtype=torch.bfloat16)  # poisoned: the producer must cover it
    return trigger.TriggerCall(
        op="matmul_allreduce_rmsnorm", comm=w.comm, x=x, w=wt, residual=torch.randn(M, 64).to(torch.bfloat16),
        norm_weight=torch.ones(64, dtype=torch.bfloat16) if norm else None, eps=1e-5, out=None, partial=partial,
        ctas=ctas, tracker=w.tracker, producer="cublas", consumer=consumer, groups=groups, part=None,
        config=tuning.TRIGGER_HEURISTIC)


def _check_product(call):
    ref = call.x.double() @ call.w.double().t()
    assert torch.isfinite(call.partial).all()
    assert torch.allclose(call.partial.double(), ref, rtol=2e-2, atol=2e-2)


def _ops_on(log, name):
    return [e for e in log if e[0] == name]


@pytest.mark.parametrize("consumer", ["sm", "copy_engine"])
def test_chunked_consumers_first_call_produces_first_then_overlaps(world, consumer):
    call = _call(world, consumer)
    p = trigger.plan_call(call)
    assert p.ctas == 32 and p.max_programs == 132 - 32 and p.carveout == 0  # default 32 CTAs, at most half
    assert p.counters is (world.tracker.group_ready if consumer == "copy_engine" else world.tracker.ready)
    rows = [r for r0, r1, _, _ in p.marks for r in range(r0, r1)]
    assert rows == list(range(1000))  # every row once, in order
    kernel = "staged" if consumer == "copy_engine" else "tracked"
    for n_call in range(2):
        world.log.clear()
        call.partial.fill_(float("nan"))
        out = consumers.run(trigger.plan_call(call))
        _check_product(call)
        assert out.shape == (1000, 64)
        names = [e[0] for e in world.log]
        first_mark, kernel_at = names.index("mark_ready"), names.index(kernel)
        if n_call == 0:  # producer first, the consumer stream waits for it: no spinning before every kernel loaded
            assert first_mark < kernel_at and ("wait_stream", "consumer", "compute") in world.log
        else:  # warm: the consumer is enqueued first, and spins on its CTAs
            assert kernel_at < first_mark and ("wait_stream", "consumer", "compute") not in world.log[:kernel_at]
        assert all(e[1] == "compute" for e in _ops_on(world.log, "mark_ready"))
        assert _ops_on(world.log, kernel)[0][1] == "consumer"
        # the plan's geometry is handed to C++ as is (never re-derived there), to every role alike
        assert _ops_on(world.log, kernel)[0][2]["chunk_rows"] == p.chunk_rows
        assert _ops_on(world.log, kernel)[0][2]["ctas"] == p.ctas
        if consumer == "copy_engine":  # the stage is enqueued last, on the copy stream, and joined
            assert names.index("stage") > max(i for i, n in enumerate(names) if n == "mark_ready")
            assert _ops_on(world.log, "stage")[0][1] == "copy"
            assert _ops_on(world.log, "stage")[0][2]["chunk_rows"] == p.chunk_rows
            assert ("wait_stream", "compute", "copy") in world.log
            assert [e[2]["begin"] for e in _ops_on(world.log, "mark_ready")] == list(range(len(p.marks)))
        else:
            assert _ops_on(world.log, "tracked")[0][2]["targets"] == (1, 1)
        assert world.log[-1] == ("wait_stream", "compute", "consumer")  # joined before returning


def test_stream_consumer_gates_each_group_then_calls_the_fused_op(world):
    call = _call(world, "stream", M=1000, groups=3)
    p = trigger.plan_call(call)
    assert [(r0, r1) for r0, r1, _, _ in p.marks] == [(0, 334), (334, 668), (668, 1000)]
    assert p.ctas is None and p.carveout == 0 and p.max_programs == 132 - 32
    consumers.run(p)
    _check_product(call)
    names = [e[0] for e in world.log]
    assert names.count("mark_ready") == 3 and names.count("gate") == 3 and names.count("allreduce") == 3
    assert max(i for i, n in enumerate(names) if n == "mark_ready") < names.index("gate")  # producer first
    gated = [(e[0], e[2].get("index", e[2].get("rows"))) for e in world.log if e[0] in ("gate", "allreduce")]
    assert gated == [("gate", 0), ("allreduce", 334), ("gate", 1), ("allreduce", 334), ("gate", 2),
                     ("allreduce", 332)]
    assert all(e[1] == "consumer" for e in world.log if e[0] in ("gate", "allreduce"))
    with_ctas = trigger.plan_call(_call(world, "stream", ctas=16))  # explicit ctas: cuBLAS leaves them free
    assert (with_ctas.ctas, with_ctas.carveout, with_ctas.max_programs) == (16, 16, 132 - 16)


def test_stream_consumer_checks_the_epilogue_before_producing(world):
    call = _call(world, "stream")
    bad = trigger.TriggerCall(**{**call.__dict__, "norm_weight": torch.ones(63, dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="matmul_allreduce_rmsnorm"):
        trigger.plan_call(bad)
    aliased = trigger.TriggerCall(**{**call.__dict__, "out": call.residual})
    with pytest.raises(ValueError, match="out must not be the residual"):
        trigger.plan_call(aliased)
    assert world.log == []  # nothing enqueued


def test_tracker_streams_never_alias_the_callers_stream():
    """torch's stream pool hands out 32 streams round-robin: a Tracker's stream may BE the caller's (or the two
    may coincide); keep_streams_apart replaces the coinciding one with the pool's next."""
    pool = [SimpleNamespace(cuda_stream=1000 + i) for i in range(32)]
    drawn = iter(range(10 ** 6))
    tracker = trigger.Tracker("cpu")
    tracker._draw = lambda: pool[next(drawn) % 32]
    for start in range(40):  # the caller's stream, the Tracker's and its copy stream at every offset
        compute = pool[start % 32]
        tracker.stream, tracker.copy_stream = pool[start % 32], pool[(start + 32 * (start % 2)) % 32]
        tracker.keep_streams_apart(compute)
        handles = {compute.cuda_stream, tracker.stream.cuda_stream, tracker.copy_stream.cuda_stream}
        assert len(handles) == 3, (start, handles)
    tracker.stream, tracker.copy_stream = pool[1], pool[2]
    tracker.keep_streams_apart(pool[0])  # nothing coincides: nothing is replaced
    assert (tracker.stream, tracker.copy_stream) == (pool[1], pool[2])
