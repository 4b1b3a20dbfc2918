"""The fused benchmark's Lamport / lean / symmetric-destination variants, on CPU.

The p2p path runs with the extension's collective ops replaced by a one-rank computation that logs each
launch (a one-rank gloo group: the baseline's all-reduce and these fakes both sum x alone), and
``Communicator.empty`` replaced by plain buffers registered as symmetric. Checked: what each variant
launches, where its out and residual live, that the symmetric tensors are allocated once per size, that
the sharded variant is compared on this rank's rows, skips and their reasons, column order and legends.
"""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist

from tokenweave import comm as comm_mod
from tokenweave import ops
from tokenweave.bench import fused, harness
from tokenweave.reference import add_rmsnorm_reference

HIDDEN = 64
LAMPORT_MAX = 16 << 10  # the fake layout's Lamport limit: 128 tokens x 64 bf16
ONE_SHOT_MAX = 4 << 10  # the test config's one-shot limit: 32 tokens


class FakeKernels:
    """tokenweave's collective ops as a one-rank computation (``z = x + residual``), logging every launch.

    ``full_residual`` and ``first``: the whole residual and this rank's first row, for sharded calls (the op
    sees only this rank's rows); ``shard_shift``: take the sharded residual from rows shifted by this much
    (an injected bug).
    """

    def __init__(self):
        self.launches = []
        self.full_residual, self.first = None, 0
        self.shard_shift = 0

    def _finish(self, x, residual_rows, weight, eps, out):
        normed, z = add_rmsnorm_reference(x, residual_rows, weight, eps)
        out.copy_(normed)
        return z

    def allreduce(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta):
        self.launches.append(dict(algo={v: k for k, v in comm_mod.ALGOS.items()}[algo], ctas=ctas, out=out,
                                  residual=residual))
        residual.copy_(self._finish(x, residual, weight, eps, out))

    def allreduce_lean(self, x, residual, weight, out, eps, comm_id, algo, ctas, chunks_per_cta, sharded_residual):
        self.launches.append(dict(algo={v: k for k, v in comm_mod.ALGOS.items()}[algo], ctas=ctas, out=out,
                                  residual=residual, sharded=sharded_residual))
        if not sharded_residual:
            residual.copy_(self._finish(x, residual, weight, eps, out))
            return
        z = self._finish(x, self.full_residual, weight, eps, out)
        first = self.first + self.shard_shift
        residual.copy_(z[first:first + residual.shape[0]])


def _fake_comm(rank, world=2):
    """A p2p Communicator without a process group or extension; ``empty`` gives registered CPU buffers."""
    c = comm_mod.Communicator.__new__(comm_mod.Communicator)
    c.transport, c._closed, c._error, c._id, c._plans = "p2p", False, None, 7, {}
    c.rank, c.world_size, c.capacity_bytes, c._num_sms = rank, world, 64 << 20, 132
    c._layout = {"one_shot_bytes": 32 << 20, "lamport_max_bytes": LAMPORT_MAX}
    c._card = "fakecard"  # only the test's config file has entries for it
    c._symm_allocs = []
    c._err_view = np.zeros(8, dtype=np.int64)
    c.device, c.group = torch.device("cpu"), None
    c.order_stream = lambda: None
    c.empty_calls = []

    def empty(*shape, dtype=torch.bfloat16):
        c.empty_calls.append(shape)
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        buf = torch.empty(nbytes, dtype=torch.uint8)
        c._symm_allocs.append(SimpleNamespace(tensor=buf))
        return buf.view(dtype).view(shape)

    c.empty = empty
    return c


@pytest.fixture
def bench(monkeypatch, tmp_path):
    """A one-rank gloo group, the fake kernels, and a config for the fake card: lean on, Lamport off."""
    config = tmp_path / "fake.json"
    config.write_text(json.dumps({"entries": [{"world_size": 2, "one_shot_max_bytes": ONE_SHOT_MAX,
                                               "lamport_max_bytes": 0, "lean": True, "source": "test"}]}))
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(config))
    kernels = FakeKernels()
    monkeypatch.setattr(ops, "_OPS", kernels)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield kernels
    finally:
        dist.destroy_process_group()


def _ctx(rank):
    return SimpleNamespace(comm=_fake_comm(rank), norm=fused.make_norm(False), group=None, device=torch.device("cpu"),
                           rank=rank, world_size=2, symm=None, symm_skip="not here", timer=harness.time_wall,
                           args=SimpleNamespace(calls=2, replays=1), align=lambda: dist.barrier())


def _case(ctx, tokens, kernels):
    case = fused.Case(ctx, tokens, HIDDEN, seed=tokens)
    kernels.full_residual = case.residual
    kernels.first = ctx.comm.shard_rows(tokens)[0]
    return case


NEW = ("tokenweave_symm", "tokenweave_lamport", "tokenweave_lean", "tokenweave_lean_sharded",
       "tokenweave_lean_ctas4", "tokenweave_lean_ctas8", "tokenweave_lean_ctas16")


def test_variant_order_and_legends():
    v = list(fused.VARIANTS)
    assert v[0] == fused.BASELINE and v[-1] == fused.BASELINE_REPEAT
    assert v.index("tokenweave") + 1 == v.index("tokenweave_symm")  # the two dispatched calls side by side
    forced = ["tokenweave_one_shot", "tokenweave_two_shot", "tokenweave_lamport", "tokenweave_lean",
              "tokenweave_lean_sharded"]
    assert v[v.index("tokenweave_symm") + 1: v.index("tokenweave_symm") + 6] == forced
    sweeps = [x for x in v if x.startswith(("tokenweave_ctas", "tokenweave_lean_ctas"))]
    assert v[v.index("tokenweave_lean_sharded") + 1: -1] == sweeps  # the CTA sweeps last, plain then lean
    assert [x for x in sweeps if "lean" in x] == [f"tokenweave_lean_ctas{n}" for n in (4, 8, 16)]
    for name in NEW:
        legend = fused._legend(name)
        assert legend != name and "fused_allreduce_rmsnorm" in legend, name
    assert "comm.empty" in fused._legend("tokenweave_symm") and "never lean" in fused._legend("tokenweave")
    assert "ctas=8" in fused._legend("tokenweave_lean_ctas8") and "lean" in fused._legend("tokenweave_lean_ctas8")
    assert "shard_rows" in fused._legend("tokenweave_lean_sharded")


@pytest.mark.parametrize("rank", [0, 1])
def test_new_variants_launch_and_write_where_they_say(bench, rank):
    ctx = _ctx(rank)
    case = _case(ctx, 1024, bench)  # 128 KiB: above the config's one-shot and the layout's Lamport limit
    expect = {"tokenweave": ("two_shot", None), "tokenweave_symm": ("lean", None), "tokenweave_lean": ("lean", None),
              "tokenweave_lean_sharded": ("lean", None), "tokenweave_lean_ctas8": ("lean", 8),
              "tokenweave_ctas8": ("two_shot", 8)}
    for variant, (algo, ctas) in expect.items():
        fn, reset = fused.build(ctx, case, variant)
        reset()
        del bench.launches[:]
        out = fn()
        (launch,) = bench.launches
        assert launch["algo"] == algo and (ctas is None or launch["ctas"] == ctas), (variant, launch)
        kind = fused._tokenweave_spec(variant)[1]
        assert launch["out"] is out and ctx.comm.is_symmetric(out) == (kind != fused.PLAIN), variant
        assert ctx.comm.is_symmetric(launch["residual"]) == (kind == fused.SYMMETRIC), variant
        assert launch.get("sharded", False) == (variant == "tokenweave_lean_sharded")
    first, n = ctx.comm.shard_rows(1024)
    assert case.shard == (first, n) and case.res_shard.shape == (n, HIDDEN) and first == 512 * rank
    # reset restores exactly the rows the variant's residual holds
    _, reset = fused.build(ctx, case, "tokenweave_lean_sharded")
    case.res_shard.fill_(0)
    reset()
    assert torch.equal(case.res_shard, case.residual[first:first + n])
    assert len(ctx.comm.empty_calls) == 2  # out and residual, once for this size


def test_lamport_runs_where_it_applies_and_skips_with_the_reason_elsewhere(bench):
    ctx = _ctx(0)
    small = _case(ctx, 128, bench)  # 16 KiB: at the limit
    fn, reset = fused.build(ctx, small, "tokenweave_lamport")
    reset()
    fn()
    assert bench.launches[-1]["algo"] == "lamport"
    with pytest.raises(fused.Skip, match="lamport.*16384 bytes"):
        fused.build(ctx, _case(ctx, 129, bench), "tokenweave_lamport")
    with pytest.raises(fused.Skip, match="CTA sweeps start at 1024"):
        fused.build(ctx, small, "tokenweave_lean_ctas4")


def test_world_size_one_and_torch_transport_skip_with_reasons(bench):
    ctx = _ctx(0)
    ctx.world_size = 1
    case = _case(ctx, 8, bench)
    for variant in NEW:
        with pytest.raises(fused.Skip, match="world size 1"):
            fused.build(ctx, case, variant)
    ctx.world_size, ctx.comm.transport = 2, "torch"
    for variant in set(NEW) - {"tokenweave_symm"}:  # tokenweave_symm has no knob: it runs on the torch transport
        with pytest.raises(fused.Skip, match="'torch' transport"):
            fused.build(ctx, case, variant)
    assert not ctx.comm.empty_calls  # skipped before allocating anything


@pytest.mark.parametrize("rank", [0, 1])
def test_check_compares_the_sharded_variant_on_this_ranks_rows(bench, rank):
    ctx = _ctx(rank)
    variants = ["tokenweave", "tokenweave_symm", "tokenweave_lean", "tokenweave_lean_sharded"]
    results = fused.check(ctx, _case(ctx, 37, bench), variants)
    assert all(results[v]["ok"] and results[v]["max_err"] == 0 for v in variants), results
    bench.shard_shift = 1 if rank == 0 else -1  # the kernel writes its neighbour's rows: check must see it
    results = fused.check(ctx, _case(ctx, 37, bench), variants)
    assert not results["tokenweave_lean_sharded"]["ok"] and results["tokenweave_lean"]["ok"], results


def test_a_rank_that_owns_no_residual_rows_is_checked_on_its_output(bench):
    ctx = _ctx(1)
    results = fused.check(ctx, _case(ctx, 1, bench), ["tokenweave_lean_sharded"])  # rank 1 owns 0 of 1 rows
    assert results["tokenweave_lean_sharded"]["ok"]


def test_run_size_times_the_new_variants_and_allocates_once_per_size(bench):
    ctx = _ctx(0)
    variants = [fused.BASELINE, "tokenweave", *NEW, fused.BASELINE_REPEAT]
    rows = {}
    for tokens in (64, 1024):
        for row in fused.run_size(ctx, _case(ctx, tokens, bench), variants):
            rows[(tokens, row["variant"])] = row
    assert ctx.comm.empty_calls == [(64, HIDDEN), (64, HIDDEN), (1024, HIDDEN), (1024, HIDDEN)]
    for v in ("tokenweave_symm", "tokenweave_lean", "tokenweave_lean_sharded"):
        for tokens in (64, 1024):
            assert rows[(tokens, v)]["us"] > 0 and rows[(tokens, v)]["ok"], rows[(tokens, v)]
    assert rows[(64, "tokenweave_lamport")]["ok"] and "lamport" in rows[(1024, "tokenweave_lamport")]["skipped"]
    assert (64, "tokenweave_lean_ctas4") not in rows and rows[(1024, "tokenweave_lean_ctas4")]["ok"]
    # the dispatched rows name what ran: plain tensors never lean, comm.empty ones where the config says
    assert rows[(1024, "tokenweave")]["algo"] == "two_shot" and rows[(1024, "tokenweave_symm")]["algo"] == "lean"
    assert rows[(64, "tokenweave_symm")]["algo"] == "lean" and rows[(64, "tokenweave")]["algo"] == "two_shot"
