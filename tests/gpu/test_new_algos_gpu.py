"""The Lamport one-shot and the lean two-shot (replicated and sharded residual) on real process groups.

2 and 4 GPUs (NCCL groups, p2p transport), against float64 references on fresh random data:
- every element of a NaN-poisoned output written; residual (or this rank's residual rows) updated;
- results bitwise identical on every rank, and identical to the flagged two-shot's (Lamport: equal values,
  the sign of an exact zero may differ);
- odd shapes (tokens 1, 3, 37, 300, 4096 x hidden 1032, 4096, 8192), bf16 and fp16 (lean also fp32);
- CUDA-graph replays with new inputs (1000; Lamport's three buffers rotating between two-shot and lean calls);
- the launches the dispatcher makes (algo=None) against tokenweave/configs/<card>.json and a user's config;
- per algorithm: a rank sleeping past a short timeout (CollectiveTimeoutError naming the late peer) and ranks
  making different calls (an error on every rank, a mismatch on at least one; never a hang).

Every case is bounded by run_workers' timeout. Expected: about 70 s at world 2 on H200 (5 process groups of
~10 s start-up each, the rest compute).

    python -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_new_algos_gpu.py
"""
import json
import os
import time

import pytest
import torch

from dist_utils import run_workers
from reference import REL_TOL, fingerprint, rank_inputs, reference, rel_err

pytestmark = pytest.mark.gpu
EPS = 1e-5
TOKENS = (1, 3, 37, 300, 4096)
HIDDENS = (1032, 4096, 8192)
TIMEOUT_MS = 1000  # the fault cases' Communicator timeout
CALL_TIMEOUT_MS = 20000  # everywhere else: a wedged kernel raises long before run_workers gives up


def needs_gpus(n):
    found = torch.cuda.device_count()
    return pytest.mark.skipif(found < n, reason=f"needs {n} GPUs, found {found}")


WORLDS = [pytest.param(2, marks=needs_gpus(2)), pytest.param(4, marks=needs_gpus(4))]


# ---------------------------------------------------------------------------------------------- pieces
def _same_bits(a, b) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = torch.int16 if a.element_size() == 2 else torch.int32
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def _view(buf, tokens, hidden):
    """A [tokens, hidden] view at offset 0 of a flat symmetric buffer (the same offset on every rank)."""
    return buf[: tokens * hidden].view(tokens, hidden)


def _fused(tw, comm, algo, x, residual, weight, symmetric=None):
    """One fused call of ``algo`` ("two_shot", "lamport", "lean", "lean_sharded") into a NaN-poisoned out.

    ``symmetric``: flat (out, residual) buffers from ``comm.empty`` for the lean variants. Returns
    ``(out, residual after the call, first_row)``: the residual holds rows ``first_row ..`` (all of them
    unless sharded).
    """
    tokens, hidden = x.shape
    lean = algo.startswith("lean")
    out = _view(symmetric[0], tokens, hidden) if lean else torch.empty_like(x)
    out.fill_(float("nan"))
    first = 0
    if algo == "lean_sharded":
        first, n = comm.shard_rows(tokens)
        res = residual[first:first + n].clone()
    elif algo == "lean":
        res = _view(symmetric[1], tokens, hidden).copy_(residual)
    else:
        res = residual.clone()
    tw.fused_allreduce_rmsnorm(comm, x, res, weight, EPS, out=out, algo="lean" if lean else algo,
                               sharded_residual=algo == "lean_sharded")
    comm.synchronize()
    return out, res, first


def _check_against_float64(case, out, res, first, z_ref, out_ref, dtype, failures):
    if not torch.isfinite(out).all():
        failures.append(f"{case}: {int((~torch.isfinite(out)).sum())} out elements NaN/unwritten")
        return False
    e_out, e_res = rel_err(out, out_ref), rel_err(res, z_ref[first:first + res.shape[0]])
    if max(e_out, e_res) > REL_TOL[dtype]:
        failures.append(f"{case}: rel err out {e_out:.3g}, residual {e_res:.3g} (bound {REL_TOL[dtype]})")
        return False
    return True


def _assert_clean(per_rank):
    """No failures on any rank; every rank's fingerprints equal rank 0's, case by case."""
    failures = [f for fails, _ in per_rank for f in fails]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])
    base = per_rank[0][1]
    for r, (_, prints) in enumerate(per_rank[1:], 1):
        assert [c for c, _ in prints] == [c for c, _ in base], f"rank {r} ran other cases than rank 0"
        diff = [a[0] for a, b in zip(base, prints) if a != b]
        assert not diff, f"rank {r} differs bitwise from rank 0 in: {diff[:10]}"


# ---------------------------------------------------------------------------------------------- grid
def _grid(rank, world):
    import tokenweave as tw

    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    comm = tw.Communicator(max_tokens=max(TOKENS), hidden=max(HIDDENS), dtype=torch.float32, transport="p2p",
                           timeout_ms=CALL_TIMEOUT_MS)
    lamport_max = comm._layout["lamport_max_bytes"]
    numel = max(TOKENS) * max(HIDDENS)
    # lean's destinations: one flat (out, residual) pair per dtype (collective, same order on every rank)
    symmetric = {dt: (comm.empty(numel, dtype=dt), comm.empty(numel, dtype=dt)) for dt in dtypes}
    failures, prints = [], []
    for di, dtype in enumerate(dtypes):
        for T in TOKENS:
            for H in HIDDENS:
                xs, residual, weight = rank_inputs(T * 100003 + H * 7 + di, world, T, H, dtype, "cuda")
                z_ref, out_ref = reference(xs, residual, weight, EPS)
                algos = ["two_shot", "lean", "lean_sharded"]
                if dtype != torch.float32 and T * H * dtype.itemsize <= lamport_max:
                    algos.insert(1, "lamport")
                flagged = None  # the two-shot's (out, residual): every other algorithm must reproduce it
                for algo in algos:
                    case = f"{algo} T={T} H={H} {dtype}"
                    out, res, first = _fused(tw, comm, algo, xs[rank], residual, weight, symmetric[dtype])
                    if not _check_against_float64(case, out, res, first, z_ref, out_ref, dtype, failures):
                        continue
                    prints.append((f"{case} out", fingerprint(out)))
                    if algo != "lean_sharded":  # a shard is this rank's rows only: compared with the two-shot's
                        prints.append((f"{case} residual", fingerprint(res)))
                    if flagged is None:
                        flagged = (out.clone(), res.clone())
                        continue
                    rows = slice(first, first + res.shape[0])
                    if algo == "lamport":  # equal values (-0.0 == 0.0)
                        same = torch.equal(out, flagged[0]) and torch.equal(res, flagged[1][rows])
                    else:
                        same = _same_bits(out, flagged[0]) and _same_bits(res, flagged[1][rows])
                    if not same:
                        failures.append(f"{case}: differs from the two-shot's result")
                del xs, residual, z_ref, out_ref, flagged
    comm.close()
    return failures, prints


@pytest.mark.parametrize("world", WORLDS)
def test_lamport_and_lean_match_float64_and_agree(world):
    _assert_clean(run_workers(_grid, world, backend="nccl", timeout=240))


# ---------------------------------------------------------------------------------------------- graphs
def _graph_replays(rank, world, replays):
    """Lamport, two-shot and lean calls of several sizes captured once, replayed on new inputs."""
    import tokenweave as tw

    H, dtype = 4096, torch.bfloat16
    comm = tw.Communicator(max_tokens=512, hidden=H, dtype=dtype, transport="p2p", timeout_ms=CALL_TIMEOUT_MS)
    # (algo, tokens): Lamport calls of two sizes, so a buffer is re-armed for a size other than its last
    calls = [("lamport", 8), ("two_shot", 8), ("lean", 300), ("lamport", 37), ("lean_sharded", 37), (None, 300)]
    sizes = sorted({t for _, t in calls})
    bank = [{t: rank_inputs(7919 * k + t, world, t, H, dtype, "cuda") for t in sizes} for k in range(3)]
    x = {t: bank[0][t][0][rank].clone() for t in sizes}
    weight = bank[0][sizes[0]][2].clone()
    outs, res, shard_of = [], [], []
    for algo, t in calls:
        first, n = comm.shard_rows(t) if algo == "lean_sharded" else (0, t)
        symmetric = algo != "two_shot" and algo != "lamport"  # lean, and the dispatcher given symmetric tensors
        outs.append(comm.empty(t, H, dtype=dtype) if symmetric else torch.empty(t, H, dtype=dtype, device="cuda"))
        res.append(comm.empty(t, H, dtype=dtype) if symmetric and algo != "lean_sharded"
                   else torch.empty(n, H, dtype=dtype, device="cuda"))
        shard_of.append((first, n))

    def load(k):
        for t in sizes:
            x[t].copy_(bank[k][t][0][rank])
        weight.copy_(bank[k][sizes[0]][2])
        for i, (_, t) in enumerate(calls):
            first, n = shard_of[i]
            res[i].copy_(bank[k][t][1][first:first + n])
            outs[i].fill_(float("nan"))

    def step():
        for i, (algo, t) in enumerate(calls):
            tw.fused_allreduce_rmsnorm(comm, x[t], res[i], weight, EPS, out=outs[i],
                                       algo="lean" if algo == "lean_sharded" else algo,
                                       sharded_residual=algo == "lean_sharded")

    load(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch requires
        step()
    torch.cuda.current_stream().wait_stream(side)
    comm.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    failures, prints = [], []
    for it in range(replays):
        k = it % len(bank)
        load(k)
        graph.replay()
        if it % 97 and it != replays - 1:
            continue
        comm.synchronize()
        weight_ref = bank[k][sizes[0]][2]
        for i, (algo, t) in enumerate(calls):
            xs, residual, _ = bank[k][t]
            z_ref, out_ref = reference(xs, residual, weight_ref, EPS)
            case = f"replay {it} call {i} ({algo}, T={t})"
            if _check_against_float64(case, outs[i], res[i], shard_of[i][0], z_ref, out_ref, dtype, failures):
                prints.append((case, fingerprint(outs[i])))
        if not torch.equal(outs[0], outs[1]):
            failures.append(f"replay {it}: Lamport and two-shot differ on the same input")
    graph.reset()
    comm.close()
    return failures, prints


@pytest.mark.parametrize("world", WORLDS)
def test_graph_replays_rotate_lamport_buffers(world):
    _assert_clean(run_workers(_graph_replays, world, 1000, backend="nccl", timeout=180))


# ---------------------------------------------------------------------------------------------- dispatch
DISPATCH_TOKENS = (1, 64, 1024, 4096)  # hidden 4096 bf16: 8 KiB, 512 KiB, 8 MiB, 32 MiB
DESTINATIONS = ("plain", "symmetric", "symmetric_out_only", "sharded")


def _record_launches():
    """Wrap the extension's collective ops (in this process) to log the algorithm each call launched."""
    from tokenweave import ops
    from tokenweave.comm import ALGOS

    names = {code: name for name, code in ALGOS.items()}
    o = ops._ops()
    log = []
    lean, plain = o.allreduce_lean, o.allreduce

    def lean_logged(*args):
        log.append(names[args[6]])  # lean or lean_bulk: same argument order as allreduce
        return lean(*args)

    def plain_logged(*args):
        log.append(names[args[6]])  # (x, residual, weight, out, eps, comm, algo, ...)
        return plain(*args)

    o.allreduce_lean, o.allreduce = lean_logged, plain_logged
    return log


def _expected_algo(cfg, layout, nbytes, destination):
    """What tokenweave/tuning.py's entry says the dispatcher launches (bf16 x of nbytes, within the workspace)."""
    if destination == "sharded":
        return "lean"  # a sharded residual exists only for lean
    if nbytes <= min(cfg.lamport_max_bytes, layout["lamport_max_bytes"]):
        return "lamport"
    if nbytes <= min(cfg.one_shot_max_bytes, layout["one_shot_bytes"]):
        return "one_shot"
    return "lean" if cfg.lean and destination == "symmetric" else "two_shot"


def _dispatch(rank, world, user_configs):
    """algo=None on plain / comm.empty destinations: the launched algorithm is the config's, the result right."""
    import tokenweave as tw
    from tokenweave import tuning

    H, dtype = 4096, torch.bfloat16
    log = _record_launches()
    failures, prints, launched = [], [], {}
    for label, path in [("shipped", None)] + list(user_configs):
        if path is None:
            os.environ.pop("TOKENWEAVE_CONFIG", None)
        else:
            os.environ["TOKENWEAVE_CONFIG"] = path
        comm = tw.Communicator(max_tokens=max(DISPATCH_TOKENS), hidden=H, dtype=dtype, transport="p2p",
                               timeout_ms=CALL_TIMEOUT_MS)
        cfg = tuning.dispatch_config(tuning.device_slug(comm.device), world, dtype.itemsize, H)
        numel = max(DISPATCH_TOKENS) * H
        sym_out, sym_res = comm.empty(numel, dtype=dtype), comm.empty(numel, dtype=dtype)  # views of these below
        for T in DISPATCH_TOKENS:
            xs, residual, weight = rank_inputs(31 * T + len(label), world, T, H, dtype, "cuda")
            z_ref, out_ref = reference(xs, residual, weight, EPS)
            for dest in DESTINATIONS:
                first, n = comm.shard_rows(T) if dest == "sharded" else (0, T)
                out = torch.empty(T, H, dtype=dtype, device="cuda") if dest == "plain" else _view(sym_out, T, H)
                res = _view(sym_res, T, H) if dest == "symmetric" else torch.empty(n, H, dtype=dtype, device="cuda")
                res.copy_(residual[first:first + n])
                out.fill_(float("nan"))
                del log[:]
                tw.fused_allreduce_rmsnorm(comm, xs[rank], res, weight, EPS, out=out,
                                           sharded_residual=dest == "sharded")
                comm.synchronize()
                want = _expected_algo(cfg, comm._layout, T * H * dtype.itemsize, dest)
                case = f"{label} config: T={T} {dest} destinations"
                launched[case] = log[:]
                if log != [want]:
                    failures.append(f"{case}: launched {log}, the config ({cfg.source}) says {want!r}")
                if _check_against_float64(case, out, res, first, z_ref, out_ref, dtype, failures):
                    prints.append((case, fingerprint(out)))
        comm.close()
    os.environ.pop("TOKENWEAVE_CONFIG", None)
    return failures, prints, launched


@pytest.mark.parametrize("world", WORLDS)
def test_dispatcher_launches_what_the_config_says(world, tmp_path):
    """The shipped config for this card (H200: lean on), then two user configs that flip every decision."""
    users = []
    flips = [("lamport-on-lean-off", {"lamport_max_bytes": 2 << 20, "one_shot_max_bytes": 0, "lean": False}),
             ("lean-on-one-shot-1MiB", {"lamport_max_bytes": 0, "one_shot_max_bytes": 1 << 20, "lean": True})]
    for label, entry in flips:
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"entries": [dict(entry, world_size=world, source=f"test: {label}")]}))
        users.append((label, str(path)))
    per_rank = run_workers(_dispatch, world, users, backend="nccl", timeout=180)
    _assert_clean([(fails, prints) for fails, prints, _ in per_rank])
    launched = per_rank[0][2]
    # each user config makes the dispatcher take the new paths at least once (the shipped one may not)
    assert launched["lamport-on-lean-off config: T=1 plain destinations"] == ["lamport"]
    assert launched["lean-on-one-shot-1MiB config: T=4096 symmetric destinations"] == ["lean"]
    assert launched["lean-on-one-shot-1MiB config: T=4096 symmetric_out_only destinations"] == ["two_shot"]


# ---------------------------------------------------------------------------------------------- faults
def _fault_call(tw, comm, algo, x, residual, weight, out):
    tw.fused_allreduce_rmsnorm(comm, x, residual, weight, EPS, out=out, algo=algo)


def _faults(rank, world, algo):
    """(1) the last rank sleeps past the timeout before a call; (2) rank 0 calls with 64 tokens, the others 32."""
    import tokenweave as tw

    T, H, dtype = 64, 1024, torch.bfloat16
    late = world - 1
    xs, residual, weight = rank_inputs(97, world, T, H, dtype, "cuda")
    result = {}

    def tensors(comm):
        if algo == "lean":  # lean writes every rank's out and residual: symmetric memory
            out, res = comm.empty(T, H, dtype=dtype), comm.empty(T, H, dtype=dtype)
            res.copy_(residual)
            return out, res
        return torch.empty_like(residual), residual.clone()

    comm = tw.Communicator(max_tokens=T, hidden=H, transport="p2p", timeout_ms=TIMEOUT_MS)
    out, res = tensors(comm)
    _fault_call(tw, comm, algo, xs[rank], res, weight, out)  # a clean call first: set-up is not what times out
    comm.synchronize()
    if rank == late:
        time.sleep(2 * TIMEOUT_MS / 1000)  # past the timeout
    out.fill_(7.0)  # finite: a call that gives up must leave NaN
    t0 = time.monotonic()
    _fault_call(tw, comm, algo, xs[rank], res, weight, out)
    try:
        comm.synchronize()
        result["late"] = ("ok", time.monotonic() - t0)
    except tw.CollectiveTimeoutError as e:
        result["late"] = ("timeout", time.monotonic() - t0, e.rank, e.peer, str(e), bool(torch.isnan(out).any()))

    comm2 = tw.Communicator(max_tokens=T, hidden=H, transport="p2p", timeout_ms=TIMEOUT_MS)  # waits for the late call
    out, res = tensors(comm2)
    _fault_call(tw, comm2, algo, xs[rank], res, weight, out)
    comm2.synchronize()
    rows = T if rank == 0 else T // 2
    t0 = time.monotonic()
    _fault_call(tw, comm2, algo, xs[rank][:rows], res[:rows], weight, out[:rows])
    try:
        comm2.synchronize()
        result["mismatch"] = ("no error", time.monotonic() - t0)
    except (tw.CollectiveMismatchError, tw.CollectiveTimeoutError) as e:
        result["mismatch"] = (type(e).__name__, time.monotonic() - t0, str(e))
    return result


@pytest.mark.parametrize("algo", ["lamport", "lean"])
@pytest.mark.parametrize("world", WORLDS)
def test_late_rank_and_mismatched_calls_fail_cleanly(world, algo):
    per_rank = run_workers(_faults, world, algo, backend="nccl", timeout=90)
    bound = TIMEOUT_MS / 1000 + 30
    on_time = per_rank[:-1]
    for rank, r in enumerate(on_time):
        status, seconds, *rest = r["late"]
        assert status == "timeout", (rank, r["late"])
        err_rank, peer, msg, nan = rest
        assert err_rank == rank and peer != rank and seconds < bound, (rank, r["late"])
        assert f"rank {rank}" in msg and f"rank {peer}" in msg and "fused_allreduce_rmsnorm" in msg, msg
        assert nan, f"rank {rank}: a call that gave up must leave NaN in out, not plausible values"
    # the late rank's peer is the one somebody waited for (at world 2, the only one)
    assert any(r["late"][3] == world - 1 for r in on_time), [r["late"][:4] for r in on_time]
    # the late rank itself finishes (its peers' data were there) or times out; it never hangs
    assert per_rank[-1]["late"][0] in ("ok", "timeout"), per_rank[-1]["late"]

    kinds = [r["mismatch"][0] for r in per_rank]
    for rank, r in enumerate(per_rank):
        assert r["mismatch"][0] in ("CollectiveMismatchError", "CollectiveTimeoutError"), (rank, r["mismatch"])
        assert r["mismatch"][1] < bound, (rank, r["mismatch"][:2])
    assert "CollectiveMismatchError" in kinds, f"every rank timed out; none diagnosed the mismatch: {per_rank}"
    for r in per_rank:
        if r["mismatch"][0] == "CollectiveMismatchError":
            assert "disagree" in r["mismatch"][2], r["mismatch"][2]
            if algo == "lean":  # flagged: the call headers are published before the flags, so both calls are named
                assert "tokens=64" in r["mismatch"][2] and "tokens=32" in r["mismatch"][2], r["mismatch"][2]
