"""Track-and-trigger on 2 and 4 GPUs, every producer (cuBLAS, Triton) with every consumer (SM, copy engine,
stream-gated launches).

Against float64: ragged M (not a multiple of the chunk or of TP), the GEMM output buffer poisoned with
NaN (a premature read shows), random per-rank delays before the GEMM, 1000+ CUDA-graph replays with
new inputs, bitwise identical across ranks.
"""
import random

import pytest
import torch

from dist_utils import run_workers
from reference import fingerprint, rel_err

pytestmark = pytest.mark.gpu
EPS = 1e-5


def needs_gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs, found {torch.cuda.device_count()}")


def _inputs(seed, world, M, K, N):
    g = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    xs = [rnd(M, K).to(torch.bfloat16) for _ in range(world)]
    ws = [(rnd(N, K) / K ** 0.5).to(torch.bfloat16) for _ in range(world)]
    return xs, ws, rnd(M, N).to(torch.bfloat16), (1 + 0.3 * rnd(N)).to(torch.bfloat16)


def _reference(xs, ws, residual, norm_w, rank):
    # each rank's GEMM output is rounded to bf16 before the all-reduce, as in the op
    y = sum((x @ w.t()).double() for x, w in zip(xs, ws))
    z = y + residual.double()
    return z, z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double()


def _check(label, out, res, inputs, rank, bad, prints):
    """float64 check of the output and the updated residual; keep the output's fingerprint."""
    z, ref = _reference(*inputs, rank)
    e = max(rel_err(out, ref), rel_err(res, z))
    if e > 2e-2:
        bad.append(f"{label}: rel err {e:.3g}")
    prints.append(fingerprint(out))


ROLES = [("cublas", "sm"), ("triton", "sm"), ("cublas", "copy_engine"), ("triton", "copy_engine"),
         ("cublas", "stream"), ("triton", "stream")]


def _eager(rank, world, producer, consumer):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=8192, hidden=8192, transport="p2p", timeout_ms=20000)
    tracker = tw.Tracker(torch.device("cuda", rank))
    rng = random.Random(7)
    bad, prints = [], []
    # Each shape twice: its first call runs the producer before the consumer (kernel loading), the
    # second overlaps them.
    for i, M in enumerate([1, 7, 129, 1000, 4097, 8192, 1000, 8192]):
        K, N = 1024 // world * 2, 8192
        xs, ws, residual, norm_w = _inputs(100 + i, world, M, K, N)
        partial = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device="cuda")
        res = residual.clone()
        torch.cuda._sleep(rng.randrange(0, 2_000_000) * (rank + 1))  # skew the ranks' producers
        # the stream consumer: its defaults on even calls; on odd ones 3 (ragged) groups of 24-CTA calls, with
        # 24 SMs carved out of the producer
        extra = ({} if i % 2 == 0 else {"groups": 3, "ctas": 24}) if consumer == "stream" else {}
        out = tw.matmul_allreduce_rmsnorm(comm, xs[rank], ws[rank], res, norm_w, EPS, mode="trigger",
                                          tracker=tracker, partial=partial, producer=producer, consumer=consumer,
                                          **extra)
        comm.synchronize()
        _check(f"{producer}/{consumer} M={M} call {i}", out, res, (xs, ws, residual, norm_w), rank, bad, prints)
    comm.close()
    return bad, prints


def _graph(rank, world, replays, producer, consumer):
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=2048, hidden=8192, transport="p2p", timeout_ms=20000)
    tracker = tw.Tracker(torch.device("cuda", rank))
    M, K, N = 2048 - 3, 512, 8192
    x = torch.empty(M, K, dtype=torch.bfloat16, device="cuda")
    w = torch.empty(N, K, dtype=torch.bfloat16, device="cuda")
    res = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    nw = torch.empty(N, dtype=torch.bfloat16, device="cuda")
    out = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    partial = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    extra = {"groups": 3} if consumer == "stream" else {}  # several gated launches inside the graph
    run = lambda: tw.matmul_allreduce_rmsnorm(comm, x, w, res, nw, EPS, mode="trigger", tracker=tracker,  # noqa: E731
                                              out=out, partial=partial, producer=producer, consumer=consumer,
                                              **extra)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for t in (x, w, res, nw):
            t.normal_()
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    bad, prints = [], []
    for it in range(replays):
        xs, ws, residual, norm_w = _inputs(5000 + it, world, M, K, N)
        x.copy_(xs[rank]); w.copy_(ws[rank]); res.copy_(residual); nw.copy_(norm_w)
        partial.fill_(float("nan")); out.fill_(float("nan"))
        graph.replay()
        if it % 50 == 0 or it == replays - 1:  # the float64 check is the slow part: sample it
            comm.synchronize()
            _check(f"replay {it}", out, res, (xs, ws, residual, norm_w), rank, bad, prints)
    comm.synchronize()
    comm.close()
    return bad, prints


def _interleaved(rank, world):
    """Copy-engine calls (staging always in half 0) between one-shot and two-shot calls of either epoch
    parity on the same Communicator, without a Tracker (the Communicator's own is used)."""
    import tokenweave as tw
    from reference import rank_inputs, reference

    comm = tw.Communicator(max_tokens=4096, hidden=8192, transport="p2p", timeout_ms=20000)
    bad, prints = [], []
    for i in range(6):
        M, K, N = 1000 + 97 * i, 512, 8192
        xs, ws, residual, norm_w = _inputs(700 + i, world, M, K, N)
        res = residual.clone()
        out = tw.matmul_allreduce_rmsnorm(comm, xs[rank], ws[rank], res, norm_w, EPS, mode="trigger",
                                          partial=torch.full((M, N), float("nan"), dtype=torch.bfloat16,
                                                             device="cuda"), consumer="copy_engine")
        comm.synchronize()
        _check(f"copy_engine call {i}", out, res, (xs, ws, residual, norm_w), rank, bad, prints)
        # A plain fused call in between: one-shot after even calls, two-shot after odd ones, so both epoch
        # parities of the staging slots follow a copy-engine call.
        algo, tokens = ("one_shot", 16 + i) if i % 2 == 0 else ("two_shot", 2048 + i)
        fx, fres, fw = rank_inputs(900 + i, world, tokens, N, torch.bfloat16, "cuda")
        res2 = fres.clone()
        out2 = tw.fused_allreduce_rmsnorm(comm, fx[rank], res2, fw, EPS, algo=algo)
        comm.synchronize()
        z_ref, out_ref = reference(fx, fres, fw, EPS)
        e = max(rel_err(out2, out_ref), rel_err(res2, z_ref))
        if e > 2e-2:
            bad.append(f"{algo} call after copy_engine call {i}: rel err {e:.3g}")
        prints.append(fingerprint(out2))
    comm.close()
    return bad, prints


def _assert_clean(per_rank):
    bad = [b for r in per_rank for b in r[0]]
    assert not bad, "\n".join(bad[:20])
    for r, (_, prints) in enumerate(per_rank[1:], 1):
        assert prints == per_rank[0][1], f"rank {r} differs bitwise from rank 0"


@needs_gpus(2)
@pytest.mark.parametrize("producer,consumer", ROLES)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=needs_gpus(4)), pytest.param(8, marks=needs_gpus(8))])
def test_trigger_matches_float64_with_skewed_producers(world, producer, consumer):
    _assert_clean(run_workers(_eager, world, producer, consumer, backend="nccl", timeout=300))


@needs_gpus(2)
@pytest.mark.parametrize("producer,consumer", ROLES)
def test_trigger_cuda_graph_1000_replays(producer, consumer):
    _assert_clean(run_workers(_graph, 2, 1000, producer, consumer, backend="nccl", timeout=400))


@needs_gpus(2)
def test_copy_engine_interleaved_with_plain_calls():
    _assert_clean(run_workers(_interleaved, 2, backend="nccl", timeout=300))
