"""Where a lean CTA's time goes, in the emulated world: per-phase cycle totals printed by the kernel.

Needs an extension built with -DTOKENWEAVE_PHASE_TIMERS (csrc/kernels/call.cuh PhaseTimers), e.g.

    NVCC_APPEND_FLAGS=-DTOKENWEAVE_PHASE_TIMERS bash bench/debug/variant.sh timers - - build
    bash bench/debug/variant.sh timers - - run python bench/debug/lean_phases.py --out-dir OUT_DIR

One eager call per (variant, CTAs) after a warm-up call; thread 0 of CTA 0 of every rank prints its cycles
in: stream (phase A copies), signal_a / signal_b (barrier + system fence + flags), wait_a / wait_b (flag
waits), finish (the owner's rows: loads, reduction, norm, stores to every rank). A diagnostic, not a
benchmark: the timers add registers and spills, and printf runs at the end.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import torch

import tokenweave as tw
from tokenweave.bench import harness
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


def collect(out_dir: str) -> None:
    """Run main() in a child (the kernels' printf goes to its stdout), parse the timers, write JSON."""
    child = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, env=dict(os.environ),
                           timeout=300)  # bounded: a kernel that hangs (it cannot: every wait is bounded) still ends
    print(child.stdout, child.stderr[-2000:], flush=True)
    rows, label = [], None
    for line in child.stdout.splitlines():
        if line.startswith("---"):
            label = line
        m = re.match(r"phase_timers (\w+) rank (\d+) ctas (\d+) cycles: (.*)", line)
        if m and label and "measured" in label:
            cycles = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", m.group(4))}
            total = sum(cycles.values())
            rows.append({"kernel": m.group(1), "W": W, "tokens": TOKENS, "hidden": HIDDEN, "rank": int(m.group(2)),
                         "ctas": int(m.group(3)), "cycles": cycles,
                         "share": {k: round(v / total, 4) for k, v in cycles.items()}})
    doc = {"bench": "lean_phases", "device": harness.device_slug(), "torch": torch.__version__,
           "git": os.environ.get("TOKENWEAVE_GIT_SHA", "unknown"), "what": __doc__, "rows": rows}
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"lean_phases-{doc['device']}-tp{W}.json")
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    print("wrote", path, f"({len(rows)} rows)")
    if child.returncode != 0 or not rows:
        raise SystemExit(f"lean_phases: child rc={child.returncode}, {len(rows)} timer rows (built with the timers?)")


if __name__ == "__main__":
    if "--child" in sys.argv:
        main()
    else:
        collect(sys.argv[sys.argv.index("--out-dir") + 1] if "--out-dir" in sys.argv else "tokenweave-results")
