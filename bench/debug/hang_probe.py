"""Diagnostics (emulated world, one GPU): the two timeouts seen at 60fff9c, reproduced with every rank's state.

1. lean_bulk at 16 CTAs after other lean calls in the same world (bench/emulated_world.py's per-CTA table).
2. Lamport in a graph-replayed chain (tests/gpu/test_launch_gpu.py), eager vs graph.
On a failure it prints, per rank: the device state (epoch, ticket, abort, Lamport sequence), the error record, and
for the chunk a rank gave up on, the flags its peer should have raised. Prints only.

    python bench/debug/hang_probe.py
"""
from __future__ import annotations

import os

import torch

os.environ.setdefault("TOKENWEAVE_EXPERIMENTAL_LEAN_BULK", "1")

import tokenweave as tw  # noqa: E402
from tokenweave.testing import EmulatedWorld  # noqa: E402

EPS = 1e-5
MAX_WORLD, MAX_CHUNKS = 8, 4096


def dump(world, label):
    flags = [ws[: 2 * 2 * MAX_WORLD * MAX_CHUNKS * 8].view(torch.int64).cpu() for ws in world.workspaces]
    for comm in world.ranks:
        st = comm._state.cpu().tolist()
        code, rank, peer, epoch, chunk, own_sig, peer_sig, op = (int(v) for v in comm._err_view)
        line = (f"  [{label}] rank {comm.rank}: state epoch={st[0]} ticket={st[1]} claimed={st[2]} abort={st[3]} "
                f"lamport_seq={st[4]} | error code={code} peer={peer} epoch={epoch} chunk={chunk} "
                f"own_sig={own_sig:#x} peer_sig={peer_sig:#x}")
        if code and 0 <= chunk < MAX_CHUNKS:
            parity = epoch & 1
            for phase in (0, 1):
                v = int(flags[comm.rank][((parity * 2 + phase) * MAX_WORLD + peer) * MAX_CHUNKS + chunk]) & (2**64 - 1)
                line += f" | flag phase {phase} from {peer}: epoch {v & 0xffffffff} sig {v >> 32:#x}"
        print(line, flush=True)
    print(world.error_report(), flush=True)


def lean_sequence(before, then, ctas, calls_before=30, calls_then=5, T=4096, H=8192, W=4):
    with EmulatedWorld(W, max_tokens=T, hidden=H, timeout_ms=3000) as world:
        gen = torch.Generator(world.device).manual_seed(1)
        xs = [torch.randn(T, H, generator=gen, device=world.device, dtype=torch.bfloat16) for _ in range(W)]
        residual = torch.randn(T, H, generator=gen, device=world.device, dtype=torch.bfloat16)
        weight = torch.ones(H, device=world.device, dtype=torch.bfloat16)
        outs = world.empty(T, H, dtype=torch.bfloat16)
        sym_res = world.empty(T, H, dtype=torch.bfloat16)
        shard_res = [residual[a:a + n].clone() for a, n in (c.shard_rows(T) for c in world.ranks)]

        def call(variant):
            sharded = variant.endswith("_sharded")
            algo = variant.removesuffix("_sharded")
            res = shard_res if sharded else sym_res
            world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r],
                                                                 algo=algo, ctas=ctas, sharded_residual=sharded))
        label = f"{'+'.join(before) or 'fresh'} -> {then} @ {ctas} CTAs"
        try:
            for b in before:
                for _ in range(calls_before):
                    call(b)
                world.synchronize()
            for _ in range(calls_then):
                call(then)
            world.synchronize()
            print(f"ok     {label}", flush=True)
        except tw.errors.TokenweaveError as e:
            print(f"FAILED {label}: {str(e)[:140]}", flush=True)
            dump(world, label)


def lamport_chain(algo, writer_kernels, graph, W=4, T=40, H=4096):
    with EmulatedWorld(W, max_tokens=512, hidden=H, timeout_ms=3000) as world:
        gen = torch.Generator("cuda").manual_seed(W * 10 + len(algo))
        xs0 = [torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(W)]
        residual = torch.randn(T, H, generator=gen, device="cuda").to(torch.bfloat16)
        weight = (1 + 0.1 * torch.randn(H, generator=gen, device="cuda")).to(torch.bfloat16)
        xs = [x.clone() for x in xs0]
        outs = [torch.empty_like(residual) for _ in xs]
        res = [residual.clone() for _ in xs]

        def step(comm, r):
            for i in range(6):
                for _ in range(writer_kernels):
                    xs[r].mul_(1.0 + 1.0 / 32)
                tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], weight, EPS, out=outs[r], algo=algo)
                outs[r].clone()
        label = f"{algo} writer_kernels={writer_kernels} graph={graph}"
        try:
            world.run(step)
            world.synchronize()
            if graph:  # "one": every rank's chain a branch of one graph; "rank": a graph per rank
                if graph == "one":
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g):
                        world.run(step)
                else:
                    g = world.capture(step)
                for _ in range(3):
                    g.replay()
                    world.synchronize()
            else:
                for _ in range(3):
                    world.run(step)
                    world.synchronize()
            print(f"ok     {label}", flush=True)
        except tw.errors.TokenweaveError as e:
            print(f"FAILED {label}: {str(e)[:140]}", flush=True)
            dump(world, label)


if __name__ == "__main__":
    import argparse
    import sys
    ap = argparse.ArgumentParser()
    ap.add_argument("--after-pytest", default=None,
                    help="pytest arguments (one string) run in this process first (the history the failures "
                         "needed), then only the Lamport chains, combined graph vs per-rank graphs")
    a = ap.parse_args()
    if a.after_pytest is not None:
        import shlex

        import pytest
        print("pytest exit:", pytest.main(["-q", "-p", "no:cacheprovider", *shlex.split(a.after_pytest)]), flush=True)
        tw.set_programmatic_launch(False)
        for graph in ("one", "rank", "one", "rank"):
            for algo in ("lamport", "lamport_two_shot", "one_shot"):
                lamport_chain(algo, 1, graph)
        sys.exit(0)
    tw.set_programmatic_launch(False)
    for algo in ("lamport", "lamport_two_shot", "one_shot"):
        for writer_kernels in (1, 2, 3):
            for graph in (None, "one", "rank"):
                lamport_chain(algo, writer_kernels, graph)
    tw.set_programmatic_launch(True)
    lean_sequence([], "lean_bulk", 16)
    lean_sequence(["lean_sharded"], "lean_bulk", 16)
    lean_sequence(["lean"], "lean_bulk", 16)
    lean_sequence(["two_shot"], "lean_bulk", 16)
    lean_sequence(["lean_sharded"], "lean", 16)
    lean_sequence(["lean_sharded"], "lean_bulk_sharded", 16)
    lean_sequence(["lean_sharded"], "lean_bulk", 8)
    lean_sequence(["two_shot", "lean", "lean_sharded"], "lean_bulk", 16)
