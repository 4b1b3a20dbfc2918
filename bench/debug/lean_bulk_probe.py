"""Diagnostics (emulated world, one GPU): does lean_bulk finish at every CTA count, with PDL on and off, and
what does PDL cost the lean kernels' per-CTA time? Not a benchmark of record: prints only.

    python bench/debug/lean_bulk_probe.py
"""
from __future__ import annotations

import os

import time

import torch

# lean_bulk is experimental (tokenweave/env.py): measured here on purpose
os.environ.setdefault("TOKENWEAVE_EXPERIMENTAL_LEAN_BULK", "1")

import tokenweave as tw
from tokenweave.bench import harness
from tokenweave.testing import EmulatedWorld

W, T, H, EPS = 4, 4096, 8192, 1e-5


def _setup(world, sharded):
    gen = torch.Generator(world.device).manual_seed(1)
    xs = [torch.randn(T, H, generator=gen, device=world.device, dtype=torch.bfloat16) for _ in range(W)]
    residual = torch.randn(T, H, generator=gen, device=world.device, dtype=torch.bfloat16)
    weight = torch.ones(H, device=world.device, dtype=torch.bfloat16)
    outs = world.empty(T, H, dtype=torch.bfloat16)
    if sharded:
        res = [residual[a:a + n].clone() for a, n in (c.shard_rows(T) for c in world.ranks)]
    else:
        res = world.empty(T, H, dtype=torch.bfloat16)
    return xs, res, weight, outs


def finishes(algo, ctas, pdl, calls=60):
    tw.set_programmatic_launch(pdl)
    with EmulatedWorld(W, max_tokens=T, hidden=H, timeout_ms=3000) as world:
        xs, res, weight, outs = _setup(world, False)
        t0 = time.time()
        try:
            for _ in range(calls):
                world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r],
                                                                     algo=algo, ctas=ctas))
            world.synchronize()
            for comm in world.ranks:
                comm.check()
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a diagnostic: print whatever went wrong
            status = f"{type(e).__name__}: {str(e)[:160]}"
            for comm in world.ranks:
                err = getattr(comm, "_error", None)
                if err is not None:
                    status += f" | rank {comm.rank}: peer {getattr(err, 'peer', '?')}"
        print(f"finish {algo:10s} ctas={ctas:3d} pdl={int(pdl)} {calls} calls: {status} ({time.time() - t0:.1f} s)",
              flush=True)


def timing(algo, sharded, ctas, pdl):
    tw.set_programmatic_launch(pdl)
    with EmulatedWorld(W, max_tokens=T, hidden=H, timeout_ms=10000) as world:
        xs, res, weight, outs = _setup(world, sharded)

        def fn():
            world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r],
                                                                 algo=algo, ctas=ctas, sharded_residual=sharded))
        us = harness.time_cuda_graph(fn, calls=10, replays=3)
        print(f"time {algo}{'_sharded' if sharded else '':9s} ctas={ctas:3d} pdl={int(pdl)} {us:9.1f} us", flush=True)


if __name__ == "__main__":
    for pdl in (True, False):
        for ctas in (16, 32, 24, 12):
            finishes("lean_bulk", ctas, pdl)
    finishes("lean", 16, True)
    for ctas in (1, 8):
        for pdl in (True, False, True):
            timing("lean", True, ctas, pdl)
