"""A Communicator over one GPU: the fused op is the fused add + RMSNorm kernel, with no collective.

Checks against float64 (NaN-poisoned outputs), bitwise equality with tokenweave.add_rmsnorm, that no
torch.distributed collective is called and no NCCL kernel runs (profiler), and CUDA-graph capture.
"""
import pytest
import torch

from dist_utils import run_workers
from reference import REL_TOL, rank_inputs, reference, rel_err

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
EPS = 1e-5
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier", "all_gather_object",
                "reduce_scatter", "reduce_scatter_tensor", "all_to_all")


def _world_one(rank, world):
    import torch.distributed as dist

    import tokenweave as tw

    comm = tw.Communicator(max_tokens=8192, hidden=8192, dtype=torch.bfloat16)
    info = {"transport": comm.transport, "reason": comm.transport_reason, "ext": tw.HAS_EXTENSION}
    saved = {name: getattr(dist, name) for name in _COLLECTIVES if hasattr(dist, name)}

    def refuse(*a, **k):
        raise AssertionError("a collective was called at world size 1")

    for name in saved:
        setattr(dist, name, refuse)
    failures = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for T, H in [(1, 4096), (7, 8192), (1000, 4096), (8192, 8192), (3, 2880)]:
            xs, residual, weight = rank_inputs(T * 131 + H, 1, T, H, dtype, "cuda")
            z_ref, out_ref = reference(xs, residual, weight, EPS)
            res = residual.clone()
            out = torch.full_like(xs[0], float("nan"))
            tw.fused_allreduce_rmsnorm(comm, xs[0], res, weight, EPS, out=out)
            res2 = residual.clone()
            local = tw.add_rmsnorm(xs[0], res2, weight, EPS)
            summed = torch.full_like(xs[0], float("nan"))
            tw.all_reduce(comm, xs[0], out=summed)
            torch.cuda.synchronize()
            case = f"T={T} H={H} {dtype}"
            e_out, e_res = rel_err(out, out_ref), rel_err(res, z_ref)
            if max(e_out, e_res) > REL_TOL[dtype]:
                failures.append(f"{case}: rel err out {e_out:.3g} residual {e_res:.3g}")
            if not (torch.equal(out, local) and torch.equal(res, res2)):
                failures.append(f"{case}: differs bitwise from tokenweave.add_rmsnorm")
            if not torch.equal(summed, xs[0]):
                failures.append(f"{case}: all_reduce over one rank is not a copy of x")
    # what runs on the device: the fused kernel, no NCCL
    xs, residual, weight = rank_inputs(5, 1, 64, 4096, torch.bfloat16, "cuda")
    tw.fused_allreduce_rmsnorm(comm, xs[0], residual.clone(), weight, EPS)  # warm (lazy loading)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        tw.fused_allreduce_rmsnorm(comm, xs[0], residual.clone(), weight, EPS)
        torch.cuda.synchronize()
    kernels = [e.key for e in prof.key_averages()]
    info["kernels"] = kernels
    if any("nccl" in k.lower() for k in kernels):
        failures.append(f"an NCCL kernel ran: {kernels}")
    if tw.HAS_EXTENSION and not any("add_rmsnorm" in k for k in kernels):
        failures.append(f"the fused add_rmsnorm kernel did not run: {kernels}")
    # capturable, as the benchmark and CUDA-graphed models need
    x = xs[0].clone()
    res = residual.clone()
    out = torch.empty_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tw.fused_allreduce_rmsnorm(comm, x, res, weight, EPS, out=out)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tw.fused_allreduce_rmsnorm(comm, x, res, weight, EPS, out=out)
    for it in range(3):
        xs2, residual2, _ = rank_inputs(100 + it, 1, 64, 4096, torch.bfloat16, "cuda")
        x.copy_(xs2[0]); res.copy_(residual2); out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        z_ref, out_ref = reference(xs2, residual2, weight, EPS)
        if max(rel_err(out, out_ref), rel_err(res, z_ref)) > REL_TOL[torch.bfloat16]:
            failures.append(f"graph replay {it} wrong")
    for name, fn in saved.items():
        setattr(dist, name, fn)
    comm.close()
    return failures, info


def test_world_size_one_is_the_fused_norm_without_collectives():
    ((failures, info),) = run_workers(_world_one, 1, backend="nccl", timeout=300)
    print(info)
    assert info["transport"] == "torch" and "single rank" in info["reason"]
    assert not failures, "\n".join(failures)
