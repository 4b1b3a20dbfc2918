"""``tokenweave-tune``: measure the fused op's dispatch decisions on this machine and write them as a config.

Usage::

    tokenweave-tune --hidden 8192 --tp 4                      # 4 GPUs of this host, one process per GPU
    tokenweave-tune --hf-config /path/to/model --tp 8         # hidden (and dtype) from a local HF config
    tokenweave-tune --emulated 4 --hidden 8192                # one GPU: 4 emulated ranks (tokenweave.testing)
    export TOKENWEAVE_CONFIG=$PWD/tokenweave-h200.json        # then every Communicator on this card uses it

What it measures, per hidden size (``--dtype``, bf16 by default; each time is the slowest rank's median over
CUDA-graph replays of ``--calls`` calls), and how it decides (:func:`decide_one_shot` and its siblings, pure
functions of the times, which the CPU tests drive with a fake timer):

``one_shot_max_bytes``
    Forced ``one_shot`` against ``two_shot`` at increasing token counts: the largest x (bytes per rank) up to
    which one-shot won at that size and every smaller one (0: it lost from the first size).
``lamport_max_bytes`` (2-byte dtypes)
    ``lamport`` against what the dispatcher would run instead (one-shot within its limit, else two-shot):
    the largest x of the leading run of Lamport wins.
``lean``
    ``lean`` (out and residual from ``comm.empty``) against ``two_shot`` at every size above those limits:
    on only when lean won at every one of them.
``bytes_per_cta``
    A CTA sweep with the algorithm the decisions above pick at each size: every candidate of
    :data:`BYTES_PER_CTA_CHOICES` is scored by the sum over sizes of (time at the CTA count it gives / best
    time at that size); the lowest score wins, and within :data:`CTA_TIE` of it the candidate with fewer CTAs
    (SMs left to overlapped compute).

The algorithms are timed at the heuristic's CTA count (:data:`tokenweave.tuning.HEURISTIC`) and the user's
``TOKENWEAVE_CONFIG`` is ignored while measuring, so a tune does not depend on an earlier one.

Output: the JSON format :mod:`tokenweave.tuning` reads (that of the shipped ``tokenweave/configs/<card>.json``).
``--key shape`` (default) writes one entry per hidden, matching only that world size, dtype size and hidden;
``--key world`` one entry per world size from every hidden measured (the smallest limits, lean only if it won
at every hidden, one CTA rule), matching any hidden: the shipped files' form. Entries already in the file for
other keys are kept; fields the tuner does not measure are kept from the entry it replaces. Each entry records
the card, torch, the git commit (or the package version), the date, whether the world was emulated, and the
times it decided from (``measured``: hidden -> variant -> tokens -> us; ``ctas``: tokens -> CTA count -> us).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from tokenweave.tuning import HEURISTIC

# Candidates of the CTA rule (bytes of x per CTA); the sweep times each distinct CTA count they give.
BYTES_PER_CTA_CHOICES = tuple(k << 10 for k in (4, 8, 16, 32, 64, 128))
# Within this fraction of the best CTA-rule score the rule with fewer CTAs is chosen.
CTA_TIE = 0.01
DEFAULT_MAX_TOKENS = 8192
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
EPS = 1e-5
# Fields an entry's decisions and provenance occupy; any other field of an entry it replaces is kept.
TUNED_FIELDS = ("one_shot_max_bytes", "lamport_max_bytes", "lean", "bytes_per_cta", "source", "device",
                "device_name", "gpus", "emulated", "torch", "git", "date", "dtype", "measured")

# measure(variant, tokens, hidden, ctas) -> microseconds per call; variant is an algo of tokenweave.comm.ALGOS
Measure = Callable[[str, int, int, int], float]


@dataclass(frozen=True)
class Limits:
    """What the measured communicator can run: its workspace and the CTAs one rank may use."""

    capacity_bytes: int    # largest x of one launch
    one_shot_bytes: int    # largest x one-shot takes (workspace / world)
    lamport_bytes: int     # largest x Lamport takes
    max_ctas: int          # SMs a rank may use (SMs // W in the emulated world)


def ctas_for(nbytes: int, bytes_per_cta: int, max_ctas: int) -> int:
    """CTAs of a call of ``nbytes`` under a CTA rule (the dispatcher's formula, Communicator.plan)."""
    return max(1, min(max_ctas, math.ceil(nbytes / bytes_per_cta)))


def token_grid(max_tokens: int) -> list[int]:
    """Powers of two from 1, and ``max_tokens`` itself."""
    grid = [1 << i for i in range(max(1, int(max_tokens)).bit_length()) if 1 << i <= max_tokens]
    return sorted(set(grid) | {int(max_tokens)})


# ---------------------------------------------------------------------------------------------- decisions
def leading_wins(points: Iterable[tuple[int, float, float]]) -> int:
    """The largest size of the leading run of wins: ``points`` are (nbytes, candidate us, alternative us).

    Sorted by size; a win is strictly faster. 0 when the smallest size already loses (or there is none).
    """
    limit = 0
    for nbytes, candidate, alternative in sorted(points):
        if not candidate < alternative:
            break
        limit = nbytes
    return limit


def decide_one_shot(measured: dict, row_bytes: int) -> int:
    """``one_shot_max_bytes`` from ``measured["one_shot"]`` and ``measured["two_shot"]`` (tokens -> us)."""
    one, two = measured.get("one_shot", {}), measured.get("two_shot", {})
    return leading_wins((t * row_bytes, one[t], two[t]) for t in one if t in two)


def alternative_us(measured: dict, tokens: int, row_bytes: int, one_shot_max: int) -> float | None:
    """What the dispatcher would run instead of Lamport at this size: one-shot within its limit, else two-shot."""
    if tokens * row_bytes <= one_shot_max and tokens in measured.get("one_shot", {}):
        return measured["one_shot"][tokens]
    return measured.get("two_shot", {}).get(tokens)


def decide_lamport(measured: dict, row_bytes: int, one_shot_max: int) -> int:
    """``lamport_max_bytes`` from ``measured["lamport"]`` against :func:`alternative_us`."""
    points = []
    for t, us in measured.get("lamport", {}).items():
        alt = alternative_us(measured, t, row_bytes, one_shot_max)
        if alt is not None:
            points.append((t * row_bytes, us, alt))
    return leading_wins(points)


def decide_lean(measured: dict) -> bool | None:
    """Lean on when it beat two-shot at every size measured (None: no size measured, decided elsewhere)."""
    lean, two = measured.get("lean", {}), measured.get("two_shot", {})
    pairs = [(lean[t], two[t]) for t in lean if t in two]
    if not pairs:
        return None
    return all(a < b for a, b in pairs)


def decide_bytes_per_cta(sweeps: Sequence[tuple[int, dict]], max_ctas: int,
                         choices: Sequence[int] = BYTES_PER_CTA_CHOICES) -> int | None:
    """The CTA rule from sweeps ``(nbytes, {ctas: us})``: see the module docstring. None without sweeps."""
    if not sweeps:
        return None
    scores = {}
    for bpc in choices:
        total = 0.0
        for nbytes, times in sweeps:
            us = times.get(ctas_for(nbytes, bpc, max_ctas))
            if us is None:
                break
            total += us / min(times.values())
        else:
            scores[bpc] = total
    if not scores:
        return None
    best = min(scores.values())
    return max(bpc for bpc, s in scores.items() if s <= best * (1 + CTA_TIE))


def dispatched_algo(nbytes: int, itemsize: int, decisions: dict, limits: Limits) -> str:
    """The algorithm :meth:`Communicator.plan` picks for ``nbytes`` under ``decisions`` (symmetric out/residual)."""
    if itemsize == 2 and nbytes <= min(decisions.get("lamport_max_bytes", 0), limits.lamport_bytes):
        return "lamport"
    if nbytes <= min(decisions["one_shot_max_bytes"], limits.one_shot_bytes):
        return "one_shot"
    return "lean" if decisions.get("lean") else "two_shot"


def cta_counts(nbytes: int, max_ctas: int, choices: Sequence[int] = BYTES_PER_CTA_CHOICES) -> list[int]:
    """The distinct CTA counts the candidate rules give at ``nbytes``."""
    return sorted({ctas_for(nbytes, bpc, max_ctas) for bpc in choices})


# ---------------------------------------------------------------------------------------------- the driver
class Progress:
    """A tqdm bar when tqdm is installed, else a plain counter on stderr; silent when not ``enabled``."""

    def __init__(self, total: int, enabled: bool = True, desc: str = "tokenweave-tune", use_tqdm: bool = True):
        self.n, self.total, self.desc, self.enabled = 0, total, desc, enabled
        self._bar = None
        if enabled and use_tqdm:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="timing", dynamic_ncols=True)
            except ImportError:
                pass

    def step(self, what: str) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(what, refresh=False)
            self._bar.update(1)
        else:
            print(f"{self.desc} [{self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def skip(self, count: int) -> None:
        """Planned timings that were not needed (a decision was reached early)."""
        if count > 0:
            self.n += count
            if self._bar is not None:
                self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def planned_timings(hiddens: Sequence[int], tokens: Sequence[int], itemsize: int, limits: Limits) -> int:
    """An upper bound of the timings :func:`tune_hidden` makes (the progress bar's total)."""
    total = 0
    for h in hiddens:
        sizes = [t * h * itemsize for t in tokens if t * h * itemsize <= limits.capacity_bytes]
        total += 2 * sum(b <= limits.one_shot_bytes for b in sizes)
        total += 2 * sum(b <= limits.lamport_bytes for b in sizes) if itemsize == 2 else 0
        total += 2 * len(sizes)
        total += sum(len(c) for c in (cta_counts(b, limits.max_ctas) for b in sizes) if len(c) > 1)
    return total


def tune_hidden(measure: Measure, hidden: int, tokens: Sequence[int], itemsize: int, limits: Limits,
                progress: Progress | None = None) -> dict:
    """Measure and decide for one hidden size; returns the decisions and ``measured`` (the times).

    Every call of ``measure`` must be made on every rank alike (it is collective on a real world): the
    sequence here depends only on the times, which are the same on every rank (the slowest rank's).
    """
    progress = progress or Progress(0, enabled=False)
    row_bytes = hidden * itemsize
    sizes = [t for t in sorted(set(tokens)) if t * row_bytes <= limits.capacity_bytes]
    m: dict = {"one_shot": {}, "two_shot": {}, "lamport": {}, "lean": {}, "ctas": {}}
    base_ctas = {t: ctas_for(t * row_bytes, HEURISTIC.bytes_per_cta, limits.max_ctas) for t in sizes}

    def timed(variant: str, t: int, ctas: int) -> float:
        us = float(measure(variant, t, hidden, ctas))
        progress.step(f"hidden={hidden} {variant} T={t} ctas={ctas}: {us:.1f} us")
        return us

    def two_shot(t: int) -> float:
        if t not in m["two_shot"]:
            m["two_shot"][t] = timed("two_shot", t, base_ctas[t])
        return m["two_shot"][t]

    def race(variant: str, cap: int, alternative: Callable[[int], float]) -> None:
        """Time ``variant`` at increasing sizes up to ``cap`` until it no longer beats ``alternative(t)``."""
        planned, start = 2 * sum(t * row_bytes <= cap for t in sizes), progress.n
        for t in sizes:
            if t * row_bytes > cap:
                break
            m[variant][t] = timed(variant, t, base_ctas[t])
            if not m[variant][t] < alternative(t):
                break
        progress.skip(planned - (progress.n - start))

    def lamport_alternative(t: int) -> float:
        alt = alternative_us(m, t, row_bytes, decisions["one_shot_max_bytes"])
        return two_shot(t) if alt is None else alt

    # 1. one-shot against two-shot, until one-shot loses
    race("one_shot", limits.one_shot_bytes, two_shot)
    decisions = {"one_shot_max_bytes": decide_one_shot(m, row_bytes)}

    # 2. Lamport against the dispatcher's alternative, until Lamport loses
    if itemsize == 2:
        race("lamport", limits.lamport_bytes, lamport_alternative)
        decisions["lamport_max_bytes"] = decide_lamport(m, row_bytes, decisions["one_shot_max_bytes"])

    # 3. lean against two-shot wherever two-shot would run
    planned, start = 2 * len(sizes), progress.n
    floor = max(decisions["one_shot_max_bytes"], decisions.get("lamport_max_bytes", 0))
    for t in sizes:
        if t * row_bytes > floor:
            two_shot(t)
            m["lean"][t] = timed("lean", t, base_ctas[t])
    progress.skip(planned - (progress.n - start))
    lean = decide_lean(m)
    if lean is not None:
        decisions["lean"] = lean

    # 4. the CTA sweep with the algorithm decided at each size
    for t in sizes:
        counts = cta_counts(t * row_bytes, limits.max_ctas)
        if len(counts) < 2:
            continue
        algo = dispatched_algo(t * row_bytes, itemsize, decisions, limits)
        m["ctas"][t] = {"algo": algo, "us": {c: timed(algo, t, c) for c in counts}}
    bpc = decide_bytes_per_cta([(t * row_bytes, s["us"]) for t, s in m["ctas"].items()], limits.max_ctas)
    if bpc is not None:
        decisions["bytes_per_cta"] = bpc
    decisions["measured"] = {k: v for k, v in m.items() if v}
    return decisions


def tune(measure: Measure, hiddens: Sequence[int], tokens: Sequence[int], itemsize: int, limits: Limits,
         progress: Progress | None = None) -> dict[int, dict]:
    """:func:`tune_hidden` for every hidden size: ``{hidden: decisions}``."""
    return {h: tune_hidden(measure, h, tokens, itemsize, limits, progress) for h in hiddens}


def combine(per_hidden: dict[int, dict], itemsize: int, max_ctas: int) -> dict:
    """One hidden-independent set of decisions (``--key world``): the smallest limits, lean only where it won at
    every hidden measured, one CTA rule scored over every hidden's sweeps."""
    decided = list(per_hidden.values())
    out = {"one_shot_max_bytes": min(d["one_shot_max_bytes"] for d in decided)}
    if all("lamport_max_bytes" in d for d in decided):
        out["lamport_max_bytes"] = min(d["lamport_max_bytes"] for d in decided)
    leans = [d["lean"] for d in decided if "lean" in d]
    if leans:
        out["lean"] = all(leans)
    sweeps = [(t * h * itemsize, s["us"]) for h, d in per_hidden.items()
              for t, s in d["measured"].get("ctas", {}).items()]
    bpc = decide_bytes_per_cta(sweeps, max_ctas)
    if bpc is not None:
        out["bytes_per_cta"] = bpc
    return out


# ---------------------------------------------------------------------------------------------- entries and files
@dataclass(frozen=True)
class Provenance:
    """Where a tune ran: written into every entry."""

    card: str
    device_name: str
    gpus: int
    emulated: bool
    torch_version: str
    git: str
    date: str
    dtype: str
    results_file: str | None = None

    @classmethod
    def here(cls, card: str, device_name: str, gpus: int, emulated: bool, dtype: torch.dtype,
             results_file: str | None = None) -> "Provenance":
        from tokenweave import __version__
        from tokenweave.bench.harness import git_sha

        sha = git_sha()
        return cls(card, device_name, gpus, emulated, torch.__version__,
                   sha if sha != "unknown" else f"tokenweave {__version__}",
                   datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), str(dtype).replace("torch.", ""),
                   results_file)


def _size(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def describe(decisions: dict) -> str:
    """One line of what was decided."""
    parts = [f"one-shot up to {_size(decisions['one_shot_max_bytes'])}" if decisions["one_shot_max_bytes"]
             else "one-shot never"]
    if "lamport_max_bytes" in decisions:
        lam = decisions["lamport_max_bytes"]
        parts.append(f"Lamport up to {_size(lam)}" if lam else "Lamport off")
    if "lean" in decisions:
        parts.append(f"lean {'on' if decisions['lean'] else 'off'}")
    if "bytes_per_cta" in decisions:
        parts.append(f"{_size(decisions['bytes_per_cta'])} per CTA")
    return ", ".join(parts)


def make_entries(per_hidden: dict[int, dict], world_size: int, itemsize: int, key: str, prov: Provenance,
                 max_ctas: int) -> list[dict]:
    """Config entries (the format :func:`tokenweave.tuning.dispatch_config` reads) from :func:`tune`'s result."""
    where = (f"{prov.gpus} x {prov.device_name}" if not prov.emulated else
             f"an emulated world of {world_size} ranks on 1 x {prov.device_name} (no NVLink)")
    common = {"device": prov.card, "device_name": prov.device_name, "gpus": prov.gpus, "emulated": prov.emulated,
              "torch": prov.torch_version, "git": prov.git, "date": prov.date, "dtype": prov.dtype}
    times = f"; times in {prov.results_file}" if prov.results_file else ""

    def entry(match: dict, decisions: dict, measured: dict) -> dict:
        fields = {k: v for k, v in decisions.items() if k != "measured"}
        source = f"tokenweave-tune on {where} ({prov.git}, torch {prov.torch_version}, {prov.date}): " \
                 f"{describe(fields)}{times}"
        return {"world_size": world_size, **match, **fields, "source": source, **common,
                "measured": _rounded(measured)}

    if key == "shape":
        return [entry({"itemsize": itemsize, "hidden": h}, d, {h: d["measured"]}) for h, d in per_hidden.items()]
    if key != "world":
        raise ValueError(f"tokenweave-tune: key={key!r}; use 'shape' or 'world'")
    decided = combine(per_hidden, itemsize, max_ctas)
    return [entry({}, decided, {h: d["measured"] for h, d in per_hidden.items()})]


def _rounded(measured):
    if isinstance(measured, dict):
        return {k: _rounded(v) for k, v in measured.items()}
    if isinstance(measured, float):
        return round(measured, 2)
    return measured


def _match_key(entry: dict, default_device: str | None) -> tuple:
    return (entry.get("device", default_device), entry.get("world_size"), entry.get("itemsize"), entry.get("hidden"),
            bool(entry.get("emulated")))


def merge_entries(existing: list[dict], new: list[dict], default_device: str | None) -> list[dict]:
    """``existing`` with ``new`` in place of the entries of the same key (device, world size, itemsize, hidden,
    emulated); fields the tuner does not write survive from the entry replaced. Ordered so that the first match
    :func:`tokenweave.tuning.dispatch_config` finds is the most specific: entries naming a hidden first, then an
    itemsize, then the rest; measured on real GPUs before emulated."""
    merged = list(existing)
    for e in new:
        key = _match_key(e, default_device)
        for i, old in enumerate(merged):
            if _match_key(old, default_device) == key:
                kept = {k: v for k, v in old.items() if k not in TUNED_FIELDS}
                merged[i] = {**kept, **e}
                break
        else:
            merged.append(e)
    return sorted(merged, key=lambda e: ("hidden" not in e, "itemsize" not in e, bool(e.get("emulated"))))


def write_config(path: str | os.PathLike, card: str, device_name: str, entries: list[dict]) -> Path:
    """Merge ``entries`` into the config file at ``path`` (created if missing) and write it."""
    path = Path(path)
    doc = {"device": card,
           "about": f"Dispatch decisions measured on {device_name} by tokenweave-tune (see tokenweave/tuning.py for "
                    "the fields). Each entry names its run.",
           "entries": []}
    if path.exists():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict) or not isinstance(loaded.get("entries", []), list):
            raise SystemExit(f"tokenweave-tune: {path} is not a tokenweave config (a JSON object with 'entries'); "
                             "choose another --out")
        doc.update(loaded)
    doc["entries"] = merge_entries(doc.get("entries", []), entries, doc.get("device"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def result_rows(per_hidden: dict[int, dict], dtype: str) -> list[dict]:
    """The times as flat results rows (:mod:`tokenweave.bench.harness`): variant = algo, or algo_ctasN."""
    rows = []
    for h, d in per_hidden.items():
        m = d["measured"]
        for variant in ("one_shot", "two_shot", "lamport", "lean"):
            for t, us in sorted(m.get(variant, {}).items()):
                rows.append({"hidden": h, "tokens": t, "dtype": dtype, "variant": variant, "us": us})
        for t, sweep in sorted(m.get("ctas", {}).items()):
            for c, us in sweep["us"].items():
                rows.append({"hidden": h, "tokens": t, "dtype": dtype, "variant": f"{sweep['algo']}_ctas{c}",
                             "ctas": c, "us": us})
    return rows


# ---------------------------------------------------------------------------------------------- measuring
def _rank_input(device, numel: int, dtype, rank: int) -> torch.Tensor:
    """This rank's x (flat, fresh random data)."""
    gen = torch.Generator(device).manual_seed(1009 * (rank + 1))
    return torch.randn(numel, generator=gen, device=device).to(dtype)


def _shared_inputs(device, numel: int, hiddens: Sequence[int], dtype):
    """The residual (flat) and a norm weight per hidden: the same on every rank, as in TP."""
    gen = torch.Generator(device).manual_seed(7919)
    residual = torch.randn(numel, generator=gen, device=device).to(dtype)
    return residual, {h: (1 + 0.1 * torch.randn(h, generator=gen, device=device)).to(dtype) for h in hiddens}


def _rows(flat: torch.Tensor, tokens: int, hidden: int) -> torch.Tensor:
    return flat[: tokens * hidden].view(tokens, hidden)


def real_measure(comm, hiddens: Sequence[int], max_tokens: int, dtype, calls: int, replays: int) -> Measure:
    """``measure`` on this rank of a real world (collective: every rank calls it alike)."""
    import tokenweave as tw
    from tokenweave.bench import harness
    from tokenweave.comm import max_across_ranks

    dev, numel = comm.device, max_tokens * max(hiddens)
    x = _rank_input(dev, numel, dtype, comm.rank)
    residual, weights = _shared_inputs(dev, numel, hiddens, dtype)
    plain_out, plain_res = torch.empty_like(residual), torch.empty_like(residual)
    sym_out, sym_res = comm.empty(numel, dtype=dtype), comm.empty(numel, dtype=dtype)  # collective, same order

    def measure(variant: str, tokens: int, hidden: int, ctas: int) -> float:
        lean = variant == "lean"
        xv, src = _rows(x, tokens, hidden), _rows(residual, tokens, hidden)
        out = _rows(sym_out if lean else plain_out, tokens, hidden)
        res = _rows(sym_res if lean else plain_res, tokens, hidden)
        w = weights[hidden]

        def before_replay():
            res.copy_(src)
            harness.align_ranks(comm.group, dev)

        res.copy_(src)
        timer = harness.timer_for(dev)  # CUDA graphs; wall clock on CPU (the tests' gloo ranks)
        us = timer(lambda: tw.fused_allreduce_rmsnorm(comm, xv, res, w, EPS, out=out, algo=variant, ctas=ctas),
                   calls=calls, replays=replays, before_replay=before_replay)
        comm.synchronize()
        return max_across_ranks(us, comm.group, dev)

    return measure


def emulated_measure(world, hiddens: Sequence[int], max_tokens: int, dtype, calls: int, replays: int) -> Measure:
    """``measure`` on a :class:`tokenweave.testing.EmulatedWorld`: every rank's call per timed call."""
    import tokenweave as tw
    from tokenweave.bench import harness

    W, dev, numel = world.world_size, world.device, max_tokens * max(hiddens)
    xs = [_rank_input(dev, numel, dtype, r) for r in range(W)]
    residual, weights = _shared_inputs(dev, numel, hiddens, dtype)
    plain_out = [torch.empty_like(residual) for _ in range(W)]
    plain_res = [torch.empty_like(residual) for _ in range(W)]
    sym_out, sym_res = world.empty(numel, dtype=dtype), world.empty(numel, dtype=dtype)

    def measure(variant: str, tokens: int, hidden: int, ctas: int) -> float:
        lean = variant == "lean"
        src = _rows(residual, tokens, hidden)
        xv = [_rows(x, tokens, hidden) for x in xs]
        out = [_rows(o, tokens, hidden) for o in (sym_out if lean else plain_out)]
        res = [_rows(r, tokens, hidden) for r in (sym_res if lean else plain_res)]
        w = weights[hidden]

        def reset():
            for r in res:
                r.copy_(src)

        def fn():
            world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xv[r], res[r], w, EPS, out=out[r], algo=variant,
                                                                 ctas=ctas))
        reset()
        us = harness.time_cuda_graph(fn, calls=calls, replays=replays, before_replay=reset)
        world.synchronize()
        return us

    return measure


def comm_limits(comm) -> Limits:
    """The :class:`Limits` of a Communicator (or an emulated rank) on a device transport."""
    layout = comm._layout
    return Limits(capacity_bytes=int(comm.capacity_bytes), one_shot_bytes=int(layout["one_shot_bytes"]),
                  lamport_bytes=int(layout["lamport_max_bytes"]), max_ctas=int(comm._num_sms))


# ---------------------------------------------------------------------------------------------- command line
@dataclass(frozen=True)
class Plan:
    """What to tune, resolved from the command line."""

    world_size: int
    emulated: bool
    hiddens: tuple[int, ...]
    tokens: tuple[int, ...]
    dtype: str
    key: str
    out: str | None
    results_dir: str | None
    calls: int
    replays: int
    show_progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tokenweave-tune", description=__doc__.split("\n\n")[0].replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Then: export TOKENWEAVE_CONFIG=<the file written> (searched before the shipped "
                                       "configs).")
    shape = p.add_argument_group("shapes")
    shape.add_argument("--hidden", type=int, nargs="+", help="hidden size(s) of the model")
    shape.add_argument("--hf-config", metavar="PATH_OR_NAME",
                       help="read hidden_size (and dtype) from a Hugging Face config in a local folder or cache")
    shape.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                       help=f"largest token count per call (default {DEFAULT_MAX_TOKENS}); the grid is powers of two "
                            "up to it")
    shape.add_argument("--tokens", type=int, nargs="+", help="token counts to measure instead of the grid")
    shape.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                       help="element type (default: the HF config's when it is one of these, else bfloat16)")
    world = p.add_argument_group("world")
    world.add_argument("--tp", type=int, help="GPUs (processes) of the world (default: every visible GPU)")
    world.add_argument("--emulated", type=int, metavar="W",
                       help="measure W emulated ranks on one GPU (tokenweave.testing.EmulatedWorld) instead")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="config file to write or update (default ./tokenweave-<card>.json)")
    out.add_argument("--key", choices=("shape", "world"), default="shape",
                     help="'shape': an entry per hidden (default); 'world': one entry per world size for any hidden "
                          "(the shipped configs' form)")
    out.add_argument("--results-dir", help="also write the times as a results file (tune-<card>-tp<W>.json) here")
    timing = p.add_argument_group("timing")
    timing.add_argument("--calls", type=int, default=20, help="calls captured per CUDA graph")
    timing.add_argument("--replays", type=int, default=5, help="timed replays (the median counts)")
    return p


def hf_shape(name_or_path: str) -> tuple[int, str | None]:
    """``(hidden_size, dtype name or None)`` of a Hugging Face config, read without network access."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise SystemExit("tokenweave-tune: --hf-config needs transformers (pip install transformers); "
                         "or pass --hidden") from None
    try:
        cfg = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SystemExit(f"tokenweave-tune: cannot read a Hugging Face config from {name_or_path!r} ({e}); pass a "
                         "folder holding config.json, or --hidden") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(text, "hidden_size", None)
    if not hidden:
        raise SystemExit(f"tokenweave-tune: the config at {name_or_path!r} has no hidden_size; pass --hidden")
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else None
    return int(hidden), name if name in DTYPES else None


def resolve(args: argparse.Namespace, visible_gpus: int) -> Plan:
    """Check the command line and resolve shapes and world size (no GPU work)."""
    from tokenweave.ops import _MAX_HIDDEN

    hiddens = list(args.hidden or [])
    hf_dtype = None
    if args.hf_config:
        hidden, hf_dtype = hf_shape(args.hf_config)
        hiddens.append(hidden)
    if not hiddens:
        raise SystemExit("tokenweave-tune: give the model's --hidden or --hf-config")
    dtype = args.dtype or hf_dtype or "bfloat16"
    itemsize = DTYPES[dtype].itemsize
    for h in hiddens:
        if h < 8 or h % 8 or h > _MAX_HIDDEN[itemsize]:
            raise SystemExit(f"tokenweave-tune: hidden {h}: tokenweave takes multiples of 8 up to "
                             f"{_MAX_HIDDEN[itemsize]} for {dtype}")
    if args.max_tokens < 1 or any(t < 1 for t in args.tokens or []):
        raise SystemExit("tokenweave-tune: token counts must be >= 1")
    tokens = sorted(set(args.tokens)) if args.tokens else token_grid(args.max_tokens)
    if args.emulated is not None:
        if args.tp is not None:
            raise SystemExit("tokenweave-tune: --emulated W runs on one GPU; leave out --tp")
        if not 2 <= args.emulated <= 8:
            raise SystemExit(f"tokenweave-tune: --emulated {args.emulated}: use 2..8 ranks")
        world, emulated = args.emulated, True
    else:
        world, emulated = (args.tp or visible_gpus), False
        if world > visible_gpus:
            raise SystemExit(f"tokenweave-tune: --tp {world}: only {visible_gpus} GPUs are visible")
        if world < 2:
            raise SystemExit(f"tokenweave-tune: a world of {world} GPU has nothing to all-reduce; measure an emulated "
                             "world on it with --emulated W (W = your tensor-parallel size)")
    if args.calls < 1 or args.replays < 1:
        raise SystemExit("tokenweave-tune: --calls and --replays must be >= 1")
    return Plan(world, emulated, tuple(sorted(set(hiddens))), tuple(tokens), dtype, args.key, args.out,
                args.results_dir, args.calls, args.replays)


def run_plan(plan: Plan, measure: Measure, limits: Limits, prov: Provenance) -> tuple[Path, list[dict], dict]:
    """Tune with ``measure`` and write the config (rank 0's part); returns its path, the entries written and
    :func:`tune`'s result."""
    itemsize = DTYPES[plan.dtype].itemsize
    progress = Progress(planned_timings(plan.hiddens, plan.tokens, itemsize, limits), enabled=plan.show_progress)
    try:
        per_hidden = tune(measure, plan.hiddens, plan.tokens, itemsize, limits, progress)
    finally:
        progress.close()
    entries = make_entries(per_hidden, plan.world_size, itemsize, plan.key, prov, limits.max_ctas)
    path = write_config(plan.out or f"tokenweave-{prov.card}.json", prov.card, prov.device_name, entries)
    return path, entries, per_hidden


def _tune_and_report(plan: Plan, measure: Measure, limits: Limits, gpus: int, rank0: bool) -> None:
    from tokenweave.bench import harness
    from tokenweave.tuning import device_slug

    if not rank0:  # the same collective sequence as rank 0; rank 0 writes
        tune(measure, plan.hiddens, plan.tokens, DTYPES[plan.dtype].itemsize, limits)
        return
    card, name = device_slug(), torch.cuda.get_device_name()
    results = None
    bench = "tune_emulated" if plan.emulated else "tune"
    if plan.results_dir:
        results = str(Path(plan.results_dir) / f"{harness.result_stem(bench, plan.world_size, card)}.json")
    prov = Provenance.here(card, name, gpus, plan.emulated, DTYPES[plan.dtype], results)
    path, entries, per_hidden = run_plan(plan, measure, limits, prov)
    if plan.results_dir:
        harness.write_results(bench, plan.world_size, result_rows(per_hidden, plan.dtype), plan.results_dir,
                              {"device_name": name, "emulated": plan.emulated, "config": str(path)},
                              device=card, baseline="two_shot")
    print(f"tokenweave-tune: wrote {len(entries)} entr{'y' if len(entries) == 1 else 'ies'} to {path.resolve()}")
    for e in entries:
        what = f"hidden {e['hidden']}" if "hidden" in e else "any hidden"
        print(f"  {card}, world {e['world_size']}{' (emulated)' if plan.emulated else ''}, {plan.dtype}, {what}: "
              f"{describe(e)}")
    if plan.emulated:
        print("  emulated entries compare data paths without NVLink; an entry measured on real GPUs for the same "
              "shape is listed first and wins")
    print(f"Use it:  export TOKENWEAVE_CONFIG={path.resolve()}\n(searched before the shipped configs; "
          "entries for other cards are ignored)", flush=True)


@contextlib.contextmanager
def _without_user_config():
    """Measure at the shipped/heuristic settings: a previous tune's file must not steer this one."""
    saved = os.environ.pop("TOKENWEAVE_CONFIG", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TOKENWEAVE_CONFIG"] = saved


def worker(plan: Plan) -> None:
    """One rank of a real world (the default process group is initialised)."""
    import tokenweave as tw

    with _without_user_config():
        comm = tw.Communicator(max_tokens=max(plan.tokens), hidden=max(plan.hiddens), dtype=DTYPES[plan.dtype])
        try:
            _tune_rank(plan, comm)
        finally:
            comm.close()


def _tune_rank(plan: Plan, comm) -> None:
    import torch.distributed as dist

    if comm.transport == "torch":
        raise SystemExit(f"tokenweave-tune: the Communicator uses the 'torch' transport ({comm.transport_reason}): "
                         "there is no algorithm to choose")
    measure = real_measure(comm, plan.hiddens, max(plan.tokens), DTYPES[plan.dtype], plan.calls, plan.replays)
    _tune_and_report(plan, measure, comm_limits(comm), dist.get_world_size(), dist.get_rank() == 0)


def run_emulated(plan: Plan) -> None:
    """Tune on an emulated world on the current GPU (one process)."""
    from tokenweave.testing import EmulatedWorld

    with _without_user_config(), EmulatedWorld(plan.world_size, max_tokens=max(plan.tokens),
                                               hidden=max(plan.hiddens), dtype=DTYPES[plan.dtype]) as world:
        measure = emulated_measure(world, plan.hiddens, max(plan.tokens), DTYPES[plan.dtype], plan.calls, plan.replays)
        _tune_and_report(plan, measure, comm_limits(world.ranks[0]), 1, True)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: ``tokenweave-tune [options]``."""
    import tokenweave as tw
    from tokenweave.bench import harness

    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not visible or not tw.HAS_EXTENSION:
        raise SystemExit("tokenweave-tune measures tokenweave's CUDA kernels: it needs a CUDA GPU and tokenweave "
                         "installed with its extension (pip install --no-build-isolation -e .)")
    plan = resolve(args, visible)
    if plan.emulated:
        run_emulated(plan)
    else:
        harness.spawn(worker, plan.world_size, "nccl", plan)


if __name__ == "__main__":  # python -m tokenweave.tune; spawned ranks re-import this module and skip this
    from tokenweave.tune import main as _main  # the importable module's functions and Plan pickle by their name

    _main()
