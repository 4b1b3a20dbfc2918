"""Does CUDA run W streams' (or W graph branches') kernels side by side? The emulated world assumes so.

No tokenweave kernel is involved: each of W "ranks" runs a chain of (writer kernel, rendezvous, clone) x 6,
where the rendezvous is a one-CTA Triton kernel that bumps a counter of its call and spins (bounded) until all
W ranks' rendezvous of that call have arrived. A rendezvous that gives up means its peers' kernels were not
running beside it: CUDA serialised them. Structures (the ways tests and benchmarks launch the emulated ranks):

    one_graph     one CUDA graph holding all W chains as branches (tests/gpu/test_launch_gpu.py before this probe)
    layers        one CUDA graph, a fork/join per call (bench harness time_cuda_graph around world.run)
    rank_graphs   one graph per rank, replayed on W streams (EmulatedWorld.capture)
    eager         W streams, no graph

each measured fresh and again after a "history": many multi-branch graphs instantiated and kept alive, and
raw streams created, as a long pytest or benchmark process does. Prints one line per (history, structure) and
writes JSON to --out if given.

    python bench/debug/coschedule_probe.py [--world 4] [--rounds 20] [--out probe.json]
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

CALLS = 6


@triton.jit
def _rendezvous(counter_ptr, ok_ptr, W: tl.constexpr, max_spins):
    tl.atomic_add(counter_ptr, 1)
    seen = tl.atomic_add(counter_ptr, 0)
    spins = 0
    while (seen < W) & (spins < max_spins):
        seen = tl.atomic_add(counter_ptr, 0)
        spins += 1
    tl.store(ok_ptr, (seen >= W).to(tl.int32))


def chain(r, W, counters, ok, xs, snaps, max_spins):
    for k in range(CALLS):
        xs[r].mul_(1.0001).add_(0.5)  # the writer kernel of the test's chain
        _rendezvous[(1,)](counters[k], ok[r, k], W, max_spins, num_warps=1)
        snaps[r].append(xs[r].clone())


def run_structure(name, W, streams, max_spins):
    counters = torch.zeros(CALLS, dtype=torch.int32, device="cuda")
    ok = torch.full((W, CALLS), -1, dtype=torch.int32, device="cuda")
    xs = [torch.randn(40, 4096, device="cuda") for _ in range(W)]
    snaps = [[] for _ in range(W)]
    cur = torch.cuda.current_stream()

    def fork_join(fn, ranks=range(W)):
        cur = torch.cuda.current_stream()  # the capturing stream inside a capture
        for r in ranks:
            streams[r].wait_stream(cur)
            with torch.cuda.stream(streams[r]):
                fn(r)
        for r in ranks:
            cur.wait_stream(streams[r])

    keep = []
    if name == "eager":
        launch = lambda: fork_join(lambda r: chain(r, W, counters, ok, xs, snaps, max_spins))  # noqa: E731
    elif name == "one_graph":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fork_join(lambda r: chain(r, W, counters, ok, xs, snaps, max_spins))
        keep.append(g)
        launch = g.replay
    elif name == "layers":
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for k in range(CALLS):
                def one(r, k=k):
                    xs[r].mul_(1.0001).add_(0.5)
                    _rendezvous[(1,)](counters[k], ok[r, k], W, max_spins, num_warps=1)
                fork_join(one)
        keep.append(g)
        launch = g.replay
    elif name == "rank_graphs":
        graphs = []
        for r in range(W):
            g = torch.cuda.CUDAGraph()
            streams[r].wait_stream(cur)
            with torch.cuda.graph(g, stream=streams[r]):
                chain(r, W, counters, ok, xs, snaps, max_spins)
            cur.wait_stream(streams[r])
            graphs.append(g)
        keep += graphs

        def launch():
            for r, g in enumerate(graphs):
                streams[r].wait_stream(cur)
                with torch.cuda.stream(streams[r]):
                    g.replay()
            for r in range(W):
                cur.wait_stream(streams[r])
    else:
        raise ValueError(name)
    counters.zero_(), ok.fill_(-1)
    torch.cuda.synchronize()
    launch()
    torch.cuda.synchronize()
    failed = int((ok != 1).sum().item())
    return failed, keep


def make_history(n_graphs, W):
    """Multi-branch graphs kept alive and extra raw streams, as a long test process accumulates."""
    kept = []
    for i in range(n_graphs):
        branches = [torch.cuda.Stream() for _ in range(W + i % 5)]
        xs = [torch.randn(64, device="cuda") for _ in branches]
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            cur = torch.cuda.current_stream()  # the capturing stream
            for s, x in zip(branches, xs):
                s.wait_stream(cur)
                with torch.cuda.stream(s):
                    for _ in range(1 + i % 4):
                        x.add_(1)
                    x.clone()
            for s in branches:
                cur.wait_stream(s)
        g.replay()
        kept.append((g, xs))
    torch.cuda.synchronize()
    return kept


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=20, help="launches per (history, structure)")
    ap.add_argument("--max-spins", type=int, default=200000)
    ap.add_argument("--history", type=int, nargs="+", default=[0, 40, 200])
    ap.add_argument("--out")
    a = ap.parse_args()
    W = a.world
    streams = [torch.cuda.Stream() for _ in range(W)]
    rows, kept = [], []
    run_structure("eager", W, streams, a.max_spins)  # warm-up: compiles the rendezvous (not counted)
    done = 0
    for h in a.history:
        kept.append(make_history(h - done, W))
        done = h
        for name in ("eager", "rank_graphs", "layers", "one_graph"):
            fails = 0
            for _ in range(a.rounds):
                f, keep = run_structure(name, W, streams, a.max_spins)
                fails += f > 0
                kept.append(keep)
            rows.append({"history_graphs": h, "structure": name, "launches": a.rounds, "launches_with_a_lost_rendezvous": fails})
            print(f"history {h:4d} graphs  {name:12s}: {fails}/{a.rounds} launches lost a rendezvous", flush=True)
    if a.out:
        json.dump({"world": W, "calls_per_chain": CALLS, "device": torch.cuda.get_device_name(),
                   "git": os.environ.get("TOKENWEAVE_GIT_SHA", "unknown"), "torch": torch.__version__, "rows": rows},
                  open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
