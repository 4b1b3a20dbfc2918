"""Track-and-trigger, the parts that run without a GPU: producer grouping, mode choice, and the
sequential path of matmul_allreduce(_rmsnorm) on gloo against float64."""
import json

import pytest
import torch

import tokenweave as tw
from tokenweave import trigger
from dist_utils import run_workers
from reference import REL_TOL, rel_err


@pytest.mark.parametrize("tokens,chunk_rows,ctas", [(1000, 7, 32), (64, 1, 64), (4097, 16, 132), (5, 2, 1)])
def test_producer_groups_cover_every_row_once_in_pipeline_order(tokens, chunk_rows, ctas):
    n_chunks = -(-tokens // chunk_rows)
    groups = trigger.producer_groups(tokens, chunk_rows, n_chunks, ctas)
    assert len(groups) == -(-n_chunks // ctas)
    assert groups[0].row_begin == 0 and groups[-1].row_end == tokens and groups[-1].chunk_end == n_chunks
    for a, b in zip(groups, groups[1:]):
        assert a.row_end == b.row_begin and a.chunk_end == b.chunk_begin
    for k, g in enumerate(groups):  # group k = the chunks the consumer's CTAs need at pipeline step k
        assert (g.chunk_begin, g.row_begin) == (k * ctas, k * ctas * chunk_rows)


def _comm_for_mode(rank, world):
    comm = tw.Communicator(max_tokens=64, hidden=64)
    x = torch.randn(8, 16)
    w = torch.randn(64, 16)
    big = torch.empty(100000, 16, dtype=torch.bfloat16)
    results = {"auto": trigger.policy.choose_for("op", comm, "auto", big, w.to(torch.bfloat16))[0].mode}
    for mode, dtype in [("trigger", torch.bfloat16), ("bogus", torch.bfloat16)]:
        try:
            trigger.policy.choose_for("op", comm, mode, x.to(dtype), w.to(dtype))
            results[mode] = None
        except ValueError as e:
            results[mode] = str(e)
    for key, kwargs in [("shape", dict(x=x, w=w[:, :8])), ("partial", dict(x=x, w=w, partial=torch.empty(8, 63)))]:
        try:
            tw.matmul_allreduce(comm=comm, **kwargs)
            results[key] = None
        except ValueError as e:
            results[key] = str(e)
    comm.close()
    return results


def test_mode_choice_and_input_checks():
    r = run_workers(_comm_for_mode, 2)[0]
    assert r["auto"] == "sequential"  # the torch transport cannot overlap
    assert "needs the p2p or multimem transport" in r["trigger"] and "mode=" in r["bogus"]
    assert "w is [N, K]" in r["shape"]
    assert "partial must be a contiguous [M, N] = [8, 64]" in r["partial"]


def _sequential(rank, world, dtype):
    g = torch.Generator().manual_seed(3)
    M, K, N = 37, 24, 64
    xs = [torch.randn(M, K, generator=g).to(dtype) for _ in range(world)]
    ws = [torch.randn(N, K, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(M, N, generator=g).to(dtype)
    norm_w = (1 + 0.3 * torch.randn(N, generator=g)).to(dtype)
    comm = tw.Communicator(max_tokens=M, hidden=N, dtype=dtype)
    res = residual.clone()
    partial = torch.full((M, N), float("nan"), dtype=dtype)  # the GEMM must overwrite it
    out = tw.matmul_allreduce_rmsnorm(comm, xs[rank], ws[rank], res, norm_w, 1e-5, partial=partial)
    partial_used = partial.isfinite().all().item()
    summed = tw.matmul_allreduce(comm, xs[rank], ws[rank])
    comm.close()
    assert partial_used, "the sequential path did not compute into partial"
    y = sum(x.double() @ w.double().t() for x, w in zip(xs, ws))
    z = y + residual.double()
    ref = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5) * norm_w.double()
    return rel_err(out, ref), rel_err(res, z), rel_err(summed, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sequential_path_matches_float64(dtype):
    # bf16 inputs: the per-rank GEMM output is rounded to bf16 before the sum, hence the looser bound
    tol = REL_TOL[dtype] if dtype == torch.float32 else 2e-2
    for errs in run_workers(_sequential, 2, dtype):
        assert max(errs) < tol, errs


def test_roles_are_checked_before_anything_runs():
    trigger.policy.check_roles("op", "p2p", "cublas", "copy_engine")  # fine
    with pytest.raises(ValueError, match="copy_engine' needs the p2p transport"):
        trigger.policy.check_roles("op", "torch", "cublas", "copy_engine")
    with pytest.raises(ValueError, match="producer="):
        trigger.policy.check_roles("op", "p2p", "cutlass", "sm")
    with pytest.raises(ValueError, match="consumer="):
        trigger.policy.check_roles("op", "p2p", "cublas", "dma")


def test_auto_overlaps_only_where_measured_faster():
    from tokenweave import producer_triton, tuning

    tuning.clear_cache()
    # every shipped entry that makes mode="auto" overlap: it does so from its M on, for its shape only
    wins = [(path.stem, e) for path in tuning.CONFIG_DIR.glob("*.json")
            for e in json.loads(path.read_text()).get("trigger", []) if e.get("auto_min_tokens")]
    assert wins, "no shipped config makes mode='auto' overlap anywhere"
    for card, e in wins:
        world, K, N, min_m = e["world_size"], e["K"], e["N"], e["auto_min_tokens"]
        transport = e.get("transport", "p2p")
        cfg = tuning.trigger_config(card, world, K, N, 2, transport)
        usable = e["auto_producer"] != "triton" or producer_triton.HAS_TRITON
        roles = (e["auto_producer"], e["auto_consumer"]) if usable else None
        assert trigger.policy.auto_roles(cfg, min_m) == roles
        assert trigger.policy.auto_roles(cfg, min_m - 1) is None  # below the measured crossover
        for other in [(card, world, K + 8, N, 2, transport), (card, world + 1, K, N, 2, transport),
                      ("unknown-card", world, K, N, 2, transport)]:
            assert trigger.policy.auto_roles(tuning.trigger_config(*other), min_m) is None  # unmeasured: sequential


# (rows, bytes per row, groups=) -> (rows per group, groups): one group per 16 MiB of output, at most 4.
@pytest.mark.parametrize("rows,row_bytes,groups,expected", [
    (1, 16384, None, (1, 1)), (511, 16384, None, (511, 1)), (1024, 16384, None, (1024, 1)),
    (2048, 16384, None, (1024, 2)), (4097, 16384, None, (1025, 4)), (16384, 16384, None, (4096, 4)),
    (7, 16, 3, (3, 3)), (5, 16, 64, (1, 5)), (1000, 16384, 8, (125, 8))])
def test_stream_groups_cover_every_row_once(rows, row_bytes, groups, expected):
    group_rows, n = trigger.stream_groups(rows, row_bytes, groups)
    assert (group_rows, n) == expected
    spans = [(k * group_rows, min(rows, (k + 1) * group_rows)) for k in range(n)]
    assert spans[0][0] == 0 and spans[-1][1] == rows and all(a < b for a, b in spans)  # no empty group
    assert all(spans[k][1] == spans[k + 1][0] for k in range(n - 1))


def test_groups_only_with_the_stream_consumer():
    from types import SimpleNamespace

    from tokenweave import tuning

    # no check() and no streams: every error below must come before the Communicator is touched
    comm = SimpleNamespace(transport="p2p", capacity_bytes=1 << 30, device=torch.device("cpu"))
    x, w = torch.zeros(8, 16, dtype=torch.bfloat16), torch.zeros(64, 16, dtype=torch.bfloat16)

    def call(consumer, groups, broken=False, **changes):
        fields = dict(op="op", comm=comm, x=x, w=w, residual=None, norm_weight=None, eps=0.0, out=None, partial=None,
                      ctas=None, tracker=SimpleNamespace(broken=broken), producer="cublas", consumer=consumer,
                      groups=groups, part=None, config=tuning.TRIGGER_HEURISTIC)
        return trigger.TriggerCall(**{**fields, **changes})

    for consumer, groups in [("sm", 2), ("stream", 0), ("stream", 65)]:
        with pytest.raises(ValueError, match="groups="):
            trigger.plan_call(call(consumer, groups))
    with pytest.raises(ValueError, match="make a new Tracker"):
        trigger.plan_call(call("stream", None, broken=True))
    with pytest.raises(ValueError, match="at most the workspace"):
        trigger.plan_call(call("stream", None, comm=SimpleNamespace(**{**vars(comm), "capacity_bytes": 8 * 64})))
    with pytest.raises(ValueError, match="but the Communicator is on"):
        trigger.plan_call(call("stream", None, comm=SimpleNamespace(**{**vars(comm), "device": torch.device("meta")})))


def test_sm_carveout_is_restored():
    get = getattr(torch._C, "_get_sm_carveout_experimental", None)
    if get is None:
        pytest.skip("this torch has no SM carveout hook")
    before = get()
    with trigger.sm_carveout(24):
        assert get() == 24
    assert get() == before
    with pytest.raises(RuntimeError, match="boom"):
        with trigger.sm_carveout(16):
            raise RuntimeError("boom")
    assert get() == before
    with trigger.sm_carveout(0):  # 0 / None: untouched
        assert get() == before
