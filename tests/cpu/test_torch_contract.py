"""The torch transport keeps the GPU transports' contract (gloo, spawned ranks): the same validation,
CollectiveMismatchError on every rank when ranks disagree, bounded waits (TOKENWEAVE_TIMEOUT_MS /
timeout_ms), zero tokens as a no-op without communication, and a world of one rank that communicates nothing."""
import time

import pytest
import torch

import tokenweave as tw
from dist_utils import run_workers
from reference import REL_TOL, rank_inputs, reference, rel_err
from test_launch_path import Recorder, fake_comm

EPS = 1e-5
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "all_gather_object",
                "reduce_scatter", "all_to_all")


class _NoCollectives:
    """Makes every torch.distributed collective raise while active (proves an op sent nothing)."""

    def __enter__(self):
        import torch.distributed as dist

        self.saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

        def refuse(*a, **k):
            raise AssertionError("a collective was called")

        for name in self.saved:
            setattr(dist, name, refuse)
        return self

    def __exit__(self, *exc):
        import torch.distributed as dist

        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _fused_ok(rank, world, comm, seed, tokens=5, hidden=64, dtype=torch.bfloat16):
    """One correct fused call (float64 reference): the group still works after the errors before it."""
    xs, residual, weight = rank_inputs(seed, world, tokens, hidden, dtype, "cpu")
    res = residual.clone()
    out = tw.fused_allreduce_rmsnorm(comm, xs[rank].clone(), res, weight, EPS)
    z_ref, out_ref = reference(xs, residual, weight, EPS)
    return max(rel_err(out, out_ref), rel_err(res, z_ref))


# ---------------------------------------------------------------------------------------------- mismatch
# (name, rank 0's call, rank 1's call): (op, tokens, hidden, dtype, residual)
MISMATCHES = [
    ("tokens", ("fused", 3, 64, torch.bfloat16, True), ("fused", 5, 64, torch.bfloat16, True)),
    ("hidden, equal numel", ("all_reduce", 4, 512, torch.float32, False), ("all_reduce", 8, 256, torch.float32, False)),
    ("dtype", ("fused", 4, 64, torch.bfloat16, True), ("fused", 4, 64, torch.float16, True)),
    ("op", ("fused", 4, 64, torch.float32, False), ("all_reduce", 4, 64, torch.float32, False)),
    ("residual", ("fused", 4, 64, torch.float32, True), ("fused", 4, 64, torch.float32, False)),
]


def _mismatch_cases(rank, world):
    results = {}
    for name, *calls in MISMATCHES:
        op, tokens, hidden, dtype, with_residual = calls[rank]
        comm = tw.Communicator(max_tokens=16, hidden=512, dtype=torch.float32, timeout_ms=20_000)
        x = torch.randn(tokens, hidden).to(dtype)
        residual = torch.randn_like(x) if with_residual else None
        out = torch.full_like(x, float("nan"))
        before = (x.clone(), None if residual is None else residual.clone())
        try:
            if op == "fused":
                tw.fused_allreduce_rmsnorm(comm, x, residual, torch.ones(hidden, dtype=dtype), EPS, out=out)
            else:
                tw.all_reduce(comm, x, out=out)
            results[name] = ("no error", None)
            continue
        except tw.CollectiveMismatchError as e:
            error = e
        untouched = (torch.equal(x, before[0]) and torch.isnan(out).all().item()
                     and (residual is None or torch.equal(residual, before[1])))
        t0 = time.monotonic()
        try:  # broken from now on, as on the GPU transports: raises at once, without communicating
            tw.all_reduce(comm, torch.randn(2, 64))
            again = None
        except tw.CollectiveMismatchError as e2:
            again = (str(e2), time.monotonic() - t0)
        results[name] = (str(error), (error.op, error.rank, error.peer), untouched, again)
    results["after"] = _fused_ok(rank, world, tw.Communicator(max_tokens=16, hidden=64), seed=11)
    return results


def test_mismatched_calls_raise_on_every_rank():
    per_rank = run_workers(_mismatch_cases, 2)
    for rank, results in enumerate(per_rank):
        for name, *calls in MISMATCHES:
            message, (op, err_rank, peer), untouched, again = results[name]
            mine, theirs = calls[rank], calls[1 - rank]
            assert "tokenweave." in message and "ranks disagree" in message, (rank, name, message)
            assert f"rank {rank} called" in message and f"rank {1 - rank} called" in message, message
            assert (err_rank, peer) == (rank, 1 - rank) and op in ("fused_allreduce_rmsnorm", "all_reduce")
            if name == "tokens":
                assert f"tokens={mine[1]}" in message and f"tokens={theirs[1]}" in message, message
            if name.startswith("hidden"):
                assert f"hidden={mine[2]}" in message and f"hidden={theirs[2]}" in message, message
            assert untouched, f"rank {rank} {name}: an input or output was written"
            assert again is not None and again[1] < 1.0 and "ranks disagree" in again[0]
        assert results["after"] < REL_TOL[torch.bfloat16]


# -------------------------------------------------------------------------------------------- validation
def _bad_settings(rank, world):
    comm = tw.Communicator(max_tokens=16, hidden=512, dtype=torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    fused = tw.fused_allreduce_rmsnorm
    cases = {
        "algo": lambda: fused(comm, x, None, w, EPS, algo="bogus"),
        "ctas negative": lambda: fused(comm, x, None, w, EPS, ctas=-5),
        "ctas zero": lambda: tw.all_reduce(comm, x, ctas=0),
        "ctas float": lambda: tw.all_reduce(comm, x, ctas=2.5),
        "eps negative": lambda: fused(comm, x, None, w, -1.0),
        "eps nan": lambda: fused(comm, x, None, w, float("nan")),
        "eps inf": lambda: fused(comm, x, None, w, float("inf")),
        "fp32 hidden 40000": lambda: tw.all_reduce(comm, torch.randn(1, 40000)),
        "fp32 hidden 16392": lambda: tw.all_reduce(comm, torch.randn(1, 16392)),
        "bf16 hidden 32776": lambda: tw.all_reduce(comm, torch.randn(1, 32776, dtype=torch.bfloat16)),
        "one_shot too large": lambda: tw.all_reduce(comm, torch.randn(16, 512, dtype=torch.bfloat16),
                                                    algo="one_shot"),
        "row larger than workspace": lambda: tw.all_reduce(comm, torch.randn(1, 16384)),
        "add_rmsnorm eps": lambda: tw.add_rmsnorm(x, None, w, -1e-3),
        "add_rmsnorm hidden": lambda: tw.add_rmsnorm(torch.randn(2, 40000), None, torch.ones(40000)),
    }
    messages = {}
    for name, call in cases.items():
        try:
            call()
            messages[name] = None
        except (TypeError, ValueError) as e:
            messages[name] = str(e)
    # the limits themselves are accepted (a workspace that holds them), and the group still works
    big = tw.Communicator(max_tokens=2, hidden=32768, dtype=torch.bfloat16)
    accepted = {}
    for name, (hidden, dtype) in {"bf16 32768": (32768, torch.bfloat16), "fp32 16384": (16384, torch.float32)}.items():
        accepted[name] = _fused_ok(rank, world, big, seed=hidden, tokens=1, hidden=hidden, dtype=dtype)
    xs, residual, weight = rank_inputs(4, world, 4, 64, torch.bfloat16, "cpu")
    out = fused(comm, xs[rank].clone(), None, weight, EPS, algo="two_shot", ctas=3)  # accepted, ignored
    accepted["forced settings"] = rel_err(out, reference(xs, None, weight, EPS)[1])
    return messages, accepted


def test_torch_transport_validates_like_the_gpu_transports():
    expected = {
        "algo": "algo='bogus'", "ctas negative": "ctas=-5", "ctas zero": "ctas=0", "ctas float": "ctas=2.5",
        "eps negative": "eps=-1.0", "eps nan": "eps=nan", "eps inf": "eps=inf",
        "fp32 hidden 40000": "16384", "fp32 hidden 16392": "16384", "bf16 hidden 32776": "32768",
        "one_shot too large": "two_shot", "row larger than workspace": "larger than the workspace",
        "add_rmsnorm eps": "eps=", "add_rmsnorm hidden": "16384",
    }
    for messages, accepted in run_workers(_bad_settings, 2):
        for name, words in expected.items():
            m = messages[name]
            assert m is not None, f"{name}: accepted"
            assert m.startswith("tokenweave.") and words in m, (name, m)
        for name, err in accepted.items():
            tol = REL_TOL[torch.float32 if "fp32" in name else torch.bfloat16]
            assert err < tol, (name, err)


def test_add_rmsnorm_rejects_bad_eps_in_process():
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match=r"tokenweave.add_rmsnorm: eps=-0.5"):
        tw.add_rmsnorm(x, None, torch.ones(64), -0.5)
    with pytest.raises(TypeError, match="eps must be a number"):
        tw.add_rmsnorm(x, None, torch.ones(64), "small")


# ------------------------------------------------------------------------------------------- zero tokens
def _zero_tokens(rank, world):
    comm = tw.Communicator(max_tokens=16, hidden=64)
    w = torch.randn(64, dtype=torch.bfloat16)
    checks = {}
    with _NoCollectives():  # on rank 0 only the zero-token calls run: a collective would also hang rank 1
        for shape in ((0, 64), (2, 0, 64)):
            if rank == 1:
                break
            x = torch.empty(shape, dtype=torch.bfloat16)
            res = torch.empty(shape, dtype=torch.bfloat16)
            out = torch.empty(shape, dtype=torch.bfloat16)
            checks[f"fused {shape} returns out"] = tw.fused_allreduce_rmsnorm(comm, x, res, w, EPS, out=out) is out
            checks[f"all_reduce {shape} returns out"] = tw.all_reduce(comm, x, out=out) is out
            fresh = tw.all_reduce(comm, x)
            checks[f"all_reduce {shape} allocates"] = fresh.shape == x.shape and fresh.dtype == x.dtype
            checks[f"add_rmsnorm {shape}"] = tw.add_rmsnorm(x, res, w, EPS, out=out) is out
        if rank == 0:
            try:  # still validated: zero tokens of an unsupported hidden is an error
                tw.all_reduce(comm, torch.empty(0, 60, dtype=torch.bfloat16))
                checks["validated"] = False
            except ValueError as e:
                checks["validated"] = "multiple of 8" in str(e)
    checks["then a real call"] = _fused_ok(rank, world, comm, seed=21) < REL_TOL[torch.bfloat16]
    return checks


def test_zero_tokens_is_a_no_op_without_communication():
    per_rank = run_workers(_zero_tokens, 2)
    assert len(per_rank[0]) == 10
    for checks in per_rank:
        assert all(checks.values()), checks


def test_zero_tokens_on_the_gpu_launch_path_launches_nothing(monkeypatch):
    from tokenweave import ops

    rec = Recorder()
    monkeypatch.setattr(ops, "_OPS", rec)
    c = fake_comm()
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    out = torch.empty_like(x)
    assert tw.fused_allreduce_rmsnorm(c, x, torch.empty_like(x), torch.ones(64, dtype=torch.bfloat16), out=out) is out
    assert tw.all_reduce(c, x).shape == (0, 64)
    with pytest.raises(ValueError, match="multiple of 8"):
        tw.all_reduce(c, torch.empty(0, 12, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="eps="):
        tw.fused_allreduce_rmsnorm(c, torch.randn(2, 64, dtype=torch.bfloat16), None,
                                   torch.ones(64, dtype=torch.bfloat16), -1.0)
    assert not rec.calls


# ------------------------------------------------------------------------------------------------ timeout
def _one_rank_never_calls(rank, world, timeout_ms, by_env):
    comm = tw.Communicator(max_tokens=16, hidden=64) if by_env else \
        tw.Communicator(max_tokens=16, hidden=64, timeout_ms=timeout_ms)
    if rank == 1:  # alive but never calls (a dead peer would close its sockets: a different error)
        time.sleep(timeout_ms / 1000 + 4)
        return None
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    t0 = time.monotonic()
    try:
        tw.fused_allreduce_rmsnorm(comm, x, torch.randn_like(x), torch.ones(64, dtype=torch.bfloat16), EPS)
        return "no error", time.monotonic() - t0
    except tw.CollectiveTimeoutError as e:
        elapsed = time.monotonic() - t0
        error = e
    try:
        tw.all_reduce(comm, x)
        again = False
    except tw.CollectiveTimeoutError:
        again = True
    return str(error), elapsed, (error.op, error.rank), again, comm.timeout_ms


@pytest.mark.parametrize("by_env", [False, True], ids=["timeout_ms", "TOKENWEAVE_TIMEOUT_MS"])
def test_waits_are_bounded_by_the_timeout(by_env):
    timeout_ms = 1500
    extra_env = {"TOKENWEAVE_TIMEOUT_MS": str(timeout_ms)} if by_env else {"TOKENWEAVE_TIMEOUT_MS": "600000"}
    per_rank = run_workers(_one_rank_never_calls, 3, timeout_ms, by_env, extra_env=extra_env, exit_after=True,
                           timeout=120)
    assert per_rank[1] is None
    for rank in (0, 2):
        message, elapsed, (op, err_rank), again, comm_timeout = per_rank[rank]
        assert comm_timeout == timeout_ms
        assert "timed out after 1500 ms" in message and f"rank {rank}" in message, message
        assert message.startswith("tokenweave.fused_allreduce_rmsnorm:"), message
        assert (op, err_rank) == ("fused_allreduce_rmsnorm", rank)
        assert timeout_ms / 1000 * 0.9 <= elapsed < timeout_ms / 1000 + 3.0, elapsed
        assert again, "the Communicator must be broken after a timeout"


def _one_rank_dies(rank, world):
    comm = tw.Communicator(max_tokens=16, hidden=64, timeout_ms=5000)
    if rank == 1:
        import os

        os._exit(0)  # its sockets close: the peer sees an error at once, or at worst its timeout
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    t0 = time.monotonic()
    errors = []
    for _ in range(2):  # the second call re-raises the recorded error without communicating
        try:
            tw.all_reduce(comm, x)
            errors.append(None)
        except tw.TokenweaveError as e:
            errors.append((type(e).__name__, str(e)))
    return errors, time.monotonic() - t0


def test_a_dead_peer_raises_within_the_timeout():
    errors, elapsed = run_workers(_one_rank_dies, 2, allow_errors=True, exit_after=True, timeout=120)[0]
    assert all(e is not None and e[1].startswith("tokenweave.all_reduce: rank 0") for e in errors), errors
    assert errors[0][0] == errors[1][0] and "broken" in errors[0][1]
    assert elapsed < 5.0 + 3.0, elapsed


# ---------------------------------------------------------------------------------------- world size 1
def _world_one(rank, world):
    comm = tw.Communicator(max_tokens=64, hidden=256, dtype=torch.float32)
    results = {"transport": (comm.transport, comm.transport_reason)}
    with _NoCollectives():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            xs, residual, weight = rank_inputs(31, 1, 33, 264, dtype, "cpu")
            z_ref, out_ref = reference(xs, residual, weight, EPS)
            x = xs[0].clone()
            res = residual.clone()
            out = torch.full_like(x, float("nan"))
            got = tw.fused_allreduce_rmsnorm(comm, x, res, weight, EPS, out=out)
            res2 = residual.clone()
            same_as_add_rmsnorm = torch.equal(out, tw.add_rmsnorm(xs[0], res2, weight, EPS)) and torch.equal(res, res2)
            nores = tw.fused_allreduce_rmsnorm(comm, xs[0], None, weight, EPS)
            summed = torch.full_like(x, float("nan"))
            copied = tw.all_reduce(comm, xs[0], out=summed)
            in_place = xs[0].clone()
            results[str(dtype)] = {
                "out": rel_err(out, out_ref), "residual": rel_err(res, z_ref),
                "no residual": rel_err(nores, reference(xs, None, weight, EPS)[1]),
                "returns out": got is out and copied is summed, "bitwise add_rmsnorm": same_as_add_rmsnorm,
                "all_reduce copies": torch.equal(summed, xs[0]) and torch.equal(x, xs[0]),
                "all_reduce in place": tw.all_reduce(comm, in_place, out=in_place) is in_place
                and torch.equal(in_place, xs[0]),
                "all_reduce allocates": torch.equal(tw.all_reduce(comm, xs[0]), xs[0]),
            }
        try:  # validated like every transport
            tw.fused_allreduce_rmsnorm(comm, xs[0], None, weight, EPS, algo="bogus")
            results["validated"] = False
        except ValueError:
            results["validated"] = True
    return results


def test_world_size_one_runs_locally_without_collectives():
    (results,) = run_workers(_world_one, 1)
    transport, reason = results.pop("transport")
    assert transport == "torch" and "single rank" in reason
    assert results.pop("validated")
    for dtype, r in results.items():
        tol = REL_TOL[getattr(torch, dtype.replace("torch.", ""))]
        for name in ("out", "residual", "no residual"):
            assert r[name] < tol, (dtype, name, r[name])
        for name in ("returns out", "bitwise add_rmsnorm", "all_reduce copies", "all_reduce in place",
                     "all_reduce allocates"):
            assert r[name], (dtype, name)
