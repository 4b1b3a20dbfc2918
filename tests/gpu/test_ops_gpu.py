"""Every op on 2 and 4 GPUs against float64: p2p and torch transports, bf16 and fp16.

Checks per case: relative error vs float64, every element of a NaN-poisoned output written,
results bitwise identical on every rank (fingerprints), one-shot == two-shot bitwise (p2p),
CUDA-graph capture then replay with new inputs, launch settings (ctas, chunking) that must not matter.
"""
import pytest
import torch

from dist_utils import run_workers
from reference import REL_TOL, fingerprint, rank_inputs, reference, rel_err

pytestmark = pytest.mark.gpu
EPS = 1e-5
TOKENS = [1, 2, 3, 7, 64, 127, 1000, 4097, 16384]
HIDDENS = [512, 2880, 4096, 5120, 8192, 16384]


def needs_gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _run_op(tw, comm, op, x, residual, weight, algo=None):
    out = torch.full_like(x, float("nan"))
    if op == "fused":
        tw.fused_allreduce_rmsnorm(comm, x, residual, weight, EPS, out=out, algo=algo)
    elif op == "fused_nores":
        tw.fused_allreduce_rmsnorm(comm, x, None, weight, EPS, out=out, algo=algo)
    else:
        tw.all_reduce(comm, x, out=out, algo=algo)
    return out


def _grid(rank, world, transports, dtypes, tokens, hiddens):
    import tokenweave as tw

    comms = {t: tw.Communicator(max_tokens=16384, hidden=8192, dtype=torch.bfloat16, transport=t) for t in transports}
    failures, prints = [], []
    for dtype in dtypes:
        for T in tokens:
            for H in hiddens:
                seed = T * 100003 + H * 7 + (dtype == torch.float16)  # same on every rank (no str hash)
                xs, residual, weight = rank_inputs(seed, world, T, H, dtype, "cuda")
                z_ref, out_ref = reference(xs, residual, weight, EPS)
                sum_ref, out_nores_ref = reference(xs, None, weight, EPS)
                refs = {"fused": out_ref, "fused_nores": out_nores_ref, "all_reduce": sum_ref}
                small = T * H * 2 * world <= 16384 * 8192 * 2  # one-shot fits
                for tname, comm in comms.items():
                    algos = [None] + (["one_shot", "two_shot"] if tname != "torch" and small and T <= 1000 else [])
                    for op in refs:
                        for algo in algos:
                            res = residual.clone()
                            out = _run_op(tw, comm, op, xs[rank], res, weight, algo)
                            comm.synchronize()
                            case = f"{tname} {op} algo={algo} T={T} H={H} {dtype}"
                            if not torch.isfinite(out).all():
                                failures.append(f"{case}: {int((~torch.isfinite(out)).sum())} elements NaN/unwritten")
                                continue
                            e = rel_err(out, refs[op])
                            if e > REL_TOL[dtype]:
                                failures.append(f"{case}: out rel err {e:.3g}")
                            if op == "fused":
                                e = rel_err(res, z_ref)
                                if e > REL_TOL[dtype]:
                                    failures.append(f"{case}: residual rel err {e:.3g}")
                            prints.append((case, fingerprint(out)))
                            if algo is not None and tname == "p2p":
                                prints.append((f"p2p {op} T={T} H={H} {dtype} any-algo", fingerprint(out)))
                del xs, residual, z_ref, out_ref, sum_ref, out_nores_ref, refs
    for c in comms.values():
        c.close()
    return failures, prints


def _check(per_rank):
    failures = [f for f, _ in per_rank for f in f]
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:40])
    base = per_rank[0][1]
    for r, (_, prints) in enumerate(per_rank[1:], 1):
        diff = [a[0] for a, b in zip(base, prints) if a != b]
        assert not diff, f"rank {r} differs bitwise from rank 0 in: {diff[:10]}"
    # one-shot and two-shot (p2p) give the same bits
    by_case = {}
    for case, fp in base:
        if case.endswith("any-algo"):
            by_case.setdefault(case, set()).add(fp)
    mixed = [c for c, fps in by_case.items() if len(fps) > 1]
    assert not mixed, f"one-shot and two-shot differ bitwise in {mixed[:10]}"


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=needs_gpus(4)), pytest.param(8, marks=needs_gpus(8))])
@needs_gpus(2)
def test_all_ops_grid(world):
    _check(run_workers(_grid, world, ["p2p", "torch"], [torch.bfloat16, torch.float16], TOKENS, HIDDENS,
                       backend="nccl", timeout=900))


def _graphs_and_settings(rank, world):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=4096, hidden=4096, dtype=torch.bfloat16, transport="p2p")
    failures, prints = [], []
    for T, algo in [(3, "one_shot"), (64, None), (1000, "two_shot"), (4096, None)]:
        H = 4096
        x = torch.empty(T, H, dtype=torch.bfloat16, device="cuda")
        res = torch.empty_like(x)
        out = torch.empty_like(x)
        w = torch.empty(H, dtype=torch.bfloat16, device="cuda")
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch requires
            tw.fused_allreduce_rmsnorm(comm, x.normal_(), res.normal_(), w.normal_(), EPS, out=out, algo=algo)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            tw.fused_allreduce_rmsnorm(comm, x, res, w, EPS, out=out, algo=algo)
        for it in range(30):  # replays with new inputs, flags and epochs advancing on device
            xs, residual, weight = rank_inputs(1000 * T + it, world, T, H, torch.bfloat16, "cuda")
            x.copy_(xs[rank]); res.copy_(residual); w.copy_(weight); out.fill_(float("nan"))
            graph.replay()
            comm.synchronize()
            z_ref, out_ref = reference(xs, residual, weight, EPS)
            e1, e2 = rel_err(out, out_ref), rel_err(res, z_ref)
            if max(e1, e2) > REL_TOL[torch.bfloat16]:
                failures.append(f"graph T={T} algo={algo} replay {it}: errs {e1:.3g} {e2:.3g}")
            prints.append((f"graph T={T} it={it}", fingerprint(out)))
        for _ in range(1000):
            graph.replay()
        comm.synchronize()
    # launch settings must not change the bits
    T, H = 1000, 8192
    comm2 = tw.Communicator(max_tokens=T, hidden=H, dtype=torch.bfloat16, transport="p2p")
    xs, residual, weight = rank_inputs(5, world, T, H, torch.bfloat16, "cuda")
    seen = set()
    for ctas in [1, 3, 16, 64, 132]:
        res = residual.clone()
        out = torch.full_like(xs[rank], float("nan"))
        tw.fused_allreduce_rmsnorm(comm2, xs[rank], res, weight, EPS, out=out, ctas=ctas)
        comm2.synchronize()
        seen.add(fingerprint(out))
    if len(seen) != 1:
        failures.append(f"ctas changes the bits: {len(seen)} distinct results")
    # in-place: out is x
    x = xs[rank].clone()
    tw.all_reduce(comm2, x, out=x)
    comm2.synchronize()
    if rel_err(x, reference(xs, None, None, EPS)[0]) > REL_TOL[torch.bfloat16]:
        failures.append("in-place all_reduce wrong")
    # inputs larger than the workspace are processed in row chunks
    xs, residual, weight = rank_inputs(6, world, 3 * T + 5, H, torch.bfloat16, "cuda")
    res = residual.clone()
    out = _run_op(tw, comm2, "fused", xs[rank], res, weight)
    comm2.synchronize()
    z_ref, out_ref = reference(xs, residual, weight, EPS)
    if max(rel_err(out, out_ref), rel_err(res, z_ref)) > REL_TOL[torch.bfloat16]:
        failures.append("chunked (larger than workspace) result wrong")
    comm.close()
    comm2.close()
    return failures, prints


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=needs_gpus(4)), pytest.param(8, marks=needs_gpus(8))])
@needs_gpus(2)
def test_cuda_graph_replay_and_settings(world):
    _check(run_workers(_graphs_and_settings, world, backend="nccl", timeout=300))


@needs_gpus(1)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_rmsnorm_gpu(dtype):
    import tokenweave as tw

    for T in TOKENS:
        for H in HIDDENS:
            if dtype == torch.float32 and H > 16384:
                continue
            xs, residual, weight = rank_inputs(T + H, 1, T, H, dtype, "cuda")
            z_ref, out_ref = reference(xs, residual, weight, EPS)
            res = residual.clone()
            out = torch.full_like(xs[0], float("nan"))
            tw.add_rmsnorm(xs[0], res, weight, EPS, out=out)
            assert rel_err(out, out_ref) < REL_TOL[dtype], (T, H)
            assert rel_err(res, z_ref) < REL_TOL[dtype], (T, H)


@needs_gpus(1)
def test_add_rmsnorm_validation_gpu():
    """The CUDA path validates in C++ before launch: TypeError/ValueError naming the op, nothing written."""
    import tokenweave as tw

    x = torch.randn(4, 64, dtype=torch.bfloat16, device="cuda")
    res, w = torch.randn_like(x), torch.ones(64, dtype=torch.bfloat16, device="cuda")
    wide = torch.randn(64, 16, dtype=torch.bfloat16, device="cuda")  # .t() is [16, 64], not contiguous
    before = (x.clone(), res.clone())
    cases = [
        (TypeError, "convert it", lambda: tw.add_rmsnorm(x, res, w.float())),
        (ValueError, "multiple of 8", lambda: tw.add_rmsnorm(x[:, :60].contiguous(), None, w[:60].contiguous())),
        (ValueError, "contiguous", lambda: tw.add_rmsnorm(wide.t(), None, w)),
        (ValueError, "must not be the residual", lambda: tw.add_rmsnorm(x, res, w, out=res)),
        (ValueError, "shape [hidden]", lambda: tw.add_rmsnorm(x, res, w[:32])),
        (ValueError, "residual has shape", lambda: tw.add_rmsnorm(x, res[:2], w)),
    ]
    for exc, words, call in cases:
        with pytest.raises(exc, match="add_rmsnorm"):
            try:
                call()
            except exc as e:
                assert words in str(e), str(e)
                raise
    torch.cuda.synchronize()
    assert torch.equal(x, before[0]) and torch.equal(res, before[1])
