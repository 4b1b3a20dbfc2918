"""Where a lean CTA's time goes, in the emulated world: per-phase cycle totals printed by the kernel.

Needs an extension built with -DTOKENWEAVE_PHASE_TIMERS (csrc/kernels/call.cuh PhaseTimers), e.g.

    NVCC_APPEND_FLAGS=-DTOKENWEAVE_PHASE_TIMERS bash bench/debug/variant.sh timers - - build
    bash bench/debug/variant.sh timers - - run python bench/debug/lean_phases.py

One eager call per (variant, CTAs) after a warm-up call; thread 0 of CTA 0 of every rank prints its cycles
in: stream (phase A copies), signal_a / signal_b (barrier + system fence + flags), wait_a / wait_b (flag
waits), finish (the owner's rows: loads, reduction, norm, stores to every rank). A diagnostic, not a
benchmark: the timers add registers and spills, and printf runs at the end.
"""
from __future__ import annotations

import torch

import tokenweave as tw
from tokenweave.testing import EmulatedWorld

W, TOKENS, HIDDEN, DTYPE, EPS = 4, 4096, 8192, torch.bfloat16, 1e-5


def main():
    with EmulatedWorld(W, max_tokens=TOKENS, hidden=HIDDEN, dtype=DTYPE) as world:
        gen = torch.Generator(world.device).manual_seed(0)
        xs = [torch.randn(TOKENS, HIDDEN, generator=gen, device=world.device).to(DTYPE) for _ in range(W)]
        weight = torch.ones(HIDDEN, device=world.device, dtype=DTYPE)
        out = world.empty(TOKENS, HIDDEN, dtype=DTYPE)
        shards = [xs[0][a:a + n].clone() for a, n in (c.shard_rows(TOKENS) for c in world.ranks)]
        for ctas in (1, 8):
            for rep in ("warm-up", "measured"):
                print(f"--- lean_sharded W={W} T={TOKENS} H={HIDDEN} ctas={ctas} ({rep})", flush=True)
                world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], shards[r], weight, EPS, out=out[r],
                                                                     algo="lean", sharded_residual=True, ctas=ctas))
                world.synchronize()


if __name__ == "__main__":
    main()
