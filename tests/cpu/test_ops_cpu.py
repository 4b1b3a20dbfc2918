"""The torch transport on gloo (2 and 4 processes) against float64, plus input validation."""
import pytest
import torch

import tokenweave as tw
from dist_utils import run_workers
from reference import REL_TOL, rank_inputs, reference, rel_err

EPS = 1e-5
SHAPES = [(1, 64), (3, 8), (7, 136), (64, 512), (127, 40)]


def _check_all_ops(rank, world, dtype):
    comm = tw.Communicator(max_tokens=256, hidden=512, dtype=dtype)
    assert comm.transport == "torch"
    results = []
    for i, (tokens, hidden) in enumerate(SHAPES):
        xs, residual, weight = rank_inputs(100 + i, world, tokens, hidden, dtype, "cpu")
        z_ref, out_ref = reference(xs, residual, weight, EPS)
        x = xs[rank].clone()
        res = residual.clone()
        out = torch.full_like(x, float("nan"))  # poisoned: every element must be written
        tw.fused_allreduce_rmsnorm(comm, x, res, weight, EPS, out=out)
        fused_no_res = tw.fused_allreduce_rmsnorm(comm, xs[rank].clone(), None, weight, EPS)
        summed = tw.all_reduce(comm, xs[rank].clone())
        _, out_nores_ref = reference(xs, None, weight, EPS)
        z_nores_ref, _ = reference(xs, None, None, EPS)
        errs = {"out": rel_err(out, out_ref), "residual": rel_err(res, z_ref),
                "no_residual": rel_err(fused_no_res, out_nores_ref), "all_reduce": rel_err(summed, z_nores_ref)}
        results.append(((tokens, hidden), errs, out.view(torch.int16 if dtype != torch.float32 else torch.int32).sum().item()))
    comm.close()
    return results


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_torch_transport_matches_float64(world, dtype):
    per_rank = run_workers(_check_all_ops, world, dtype)
    for shape_results in zip(*per_rank):
        shape, errs, _ = shape_results[0]
        for name, e in errs.items():
            assert e < REL_TOL[dtype], f"{shape} {name}: rel err {e}"
        checksums = {r[2] for r in shape_results}
        assert len(checksums) == 1, f"{shape}: ranks differ bitwise"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_add_rmsnorm_cpu(dtype):
    xs, residual, weight = rank_inputs(7, 1, 33, 264, dtype, "cpu")
    z_ref, out_ref = reference(xs, residual, weight, EPS)
    res = residual.clone()
    out = tw.add_rmsnorm(xs[0], res, weight, EPS)
    assert rel_err(out, out_ref) < REL_TOL[dtype] and rel_err(res, z_ref) < REL_TOL[dtype]
    x = xs[0].clone()
    tw.add_rmsnorm(x, residual.clone(), weight, EPS, out=x)  # in place
    assert torch.equal(x, out)


def _validation_messages(rank, world):
    comm = tw.Communicator(max_tokens=16, hidden=64)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    cases = {
        "dtype": lambda: tw.all_reduce(comm, x.to(torch.int32)),
        "hidden": lambda: tw.all_reduce(comm, torch.randn(4, 60, dtype=torch.bfloat16)),
        "contiguous": lambda: tw.all_reduce(comm, torch.randn(64, 8, dtype=torch.bfloat16).t()),
        "residual": lambda: tw.fused_allreduce_rmsnorm(comm, x, torch.randn(3, 64, dtype=torch.bfloat16), w),
        "weight": lambda: tw.fused_allreduce_rmsnorm(comm, x, None, torch.ones(32, dtype=torch.bfloat16)),
        "residual-dtype": lambda: tw.fused_allreduce_rmsnorm(comm, x, torch.randn(4, 64), w),
        "out-alias": lambda: (lambda r: tw.fused_allreduce_rmsnorm(comm, x, r, w, out=r))(x.clone()),
        "comm": lambda: tw.all_reduce(object(), x),
        "algo": None,
    }
    messages = {}
    for name, call in cases.items():
        if call is None:
            continue
        try:
            call()
            messages[name] = None
        except (TypeError, ValueError) as e:
            messages[name] = str(e)
    before = x.clone()
    comm.close()
    try:
        tw.all_reduce(comm, x)
        messages["closed"] = None
    except tw.CommunicatorClosedError as e:
        messages["closed"] = str(e)
    assert torch.equal(before, x)  # inputs untouched on error
    return messages


def test_validation_messages_say_what_to_change():
    messages = run_workers(_validation_messages, 2)[0]
    expected = {
        "dtype": "supported: bfloat16", "hidden": "multiple of 8", "contiguous": ".contiguous()",
        "residual": "residual has shape", "weight": "expected (64,)", "residual-dtype": "convert it",
        "out-alias": "must not be the residual", "comm": "must be a tokenweave.Communicator",
        "closed": "create a new one",
    }
    for name, words in expected.items():
        assert messages[name] is not None and words in messages[name], (name, messages[name])
