"""``tokenweave-tune``: measure the fused op's dispatch decisions on this machine and write them as a config.

Usage::

    tokenweave-tune --hidden 8192 --tp 4                      # 4 GPUs of this host, one process per GPU
    tokenweave-tune --hf-config /path/to/model --tp 8         # hidden (and dtype) from a local HF config
    tokenweave-tune --emulated 4 --hidden 8192                # one GPU: 4 emulated ranks (tokenweave.testing)
    tokenweave-tune --no-allreduce --hidden 4096 8192         # one GPU: only the "norm" and "launch" stages
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
``lean_pull``
    ``lean_pull`` (x from ``comm.empty`` too, read in place) against ``lean`` at the same sizes: on only when it
    won at every one of them. Used only for calls whose x is symmetric.
``bytes_per_cta``
    A CTA sweep with the algorithm the decisions above pick at each size: every candidate of
    :data:`BYTES_PER_CTA_CHOICES` is scored by the sum over sizes of (time at the CTA count it gives / best
    time at that size); the lowest score wins, and within :data:`CTA_TIE` of it the candidate with fewer CTAs
    (SMs left to overlapped compute).

The algorithms are timed at the heuristic's CTA count (:data:`tokenweave.tuning.HEURISTIC`) and the user's
``TOKENWEAVE_CONFIG`` is ignored while measuring, so a tune does not depend on an earlier one.

Two more stages need no communication: they run on one GPU in every mode (rank 0's, after the all-reduce stage;
``--no-allreduce`` runs only them, on one GPU without a world), each skipped with ``--no-launch`` / ``--no-norm``:

``launch`` (:func:`decide_programmatic`)
    Back-to-back ``tokenweave.add_rmsnorm`` calls (residual in place) at :data:`LAUNCH_TOKENS` tokens of the
    largest hidden, timed with programmatic dependent launch off, on, and off again; the process's setting is
    restored after. At a token count PDL wins when off - on exceeds the noise ``|off - off repeat|``, loses when
    on - off does. ``programmatic`` is on when PDL won at more than half of the token counts and lost at none.
``norm`` (:func:`norm_candidates`, :func:`decide_norm_shapes`; 2-byte dtypes, nothing for float32)
    Per hidden, every block shape of the standalone add + RMSNorm op (``torch.ops.tokenweave.add_rmsnorm(...,
    shape)``, csrc/kernels/launch.cu kNormConfigs) that holds the row (one that cannot raises at launch) and gives
    shape 0's bits in out and residual on a batch of :data:`NORM_PROBE_ROWS` random rows: only such shapes may be
    switched between by batch size, so a row's result never depends on its batch. Each is timed at every token
    count (with PDL as the launch stage decided), and shape 0 again after them; per count the fastest wins if it
    beats the faster of shape 0's two times (the kernel's own pick) by more than :data:`NORM_MARGIN` and by more
    than the noise (:func:`run_noise`: how far the two times were apart, at most, among calls of like length), else
    shape 0. Shapes that are right but sum a row in another order (``OTHER_ORDER``:
    the residual bitwise, out within :data:`NORM_ORDER_TOLERANCE`) are timed too, in families that sum a row in
    one order (:func:`norm_families`: equal threads per row and equal bits on the probe batch). A family may
    replace that choice at every count of the hidden, never at some, with one member at each count: where that is
    faster than the choice by more than the margin in geometric mean over the counts and at worst twice the margin
    slower at any. The member is the family's anchor (:func:`family_choice`: the best geometric mean) unless another
    is faster at that count by more than :data:`FAMILY_MARGIN`, the noise and :data:`FAMILY_MIN_US`. A measured count
    stands for the counts up to
    the next one (the first from 1, the last open); consecutive counts with one shape merge into one entry
    (``min_tokens``/``max_tokens``), and shape 0 needs none.

Output: the JSON format :mod:`tokenweave.tuning` reads (that of the shipped ``tokenweave/configs/<card>.json``).
``--key shape`` (default) writes one entry per hidden, matching only that world size, dtype size and hidden;
``--key world`` one entry per world size from every hidden measured (the smallest limits, lean only if it won
at every hidden, one CTA rule), matching any hidden: the shipped files' form. Entries already in the file for
other keys are kept; fields the tuner does not measure are kept from the entry it replaces. Each entry records
the card, torch, the git commit (or the package version), the date, whether the world was emulated, and the
times it decided from (``measured``: hidden -> variant -> tokens -> us; ``ctas``: tokens -> CTA count -> us).

``"norm"`` entries: ``--key shape`` names the ``hidden``; ``--key world`` writes, where every hidden measured chose
the same shape, entries without ``hidden`` and with ``max_hidden`` (the largest measured; they also match smaller
hiddens that were not measured), and per-hidden entries where the hiddens disagreed. A tune replaces every
``"norm"`` entry of what it measured (per hidden; with ``--key world`` also those of the dtype size that name no
hidden), since it re-decides their whole token range; the ``"launch"`` entry replaces the card's. Both record the
card, torch, commit, date and their times (``measured``: hidden -> tokens -> shape or PDL variant -> us); other
lists of the file (``"trigger"``) are kept as they are.
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
TUNED_FIELDS = ("one_shot_max_bytes", "lamport_max_bytes", "lean", "lean_pull", "bytes_per_cta", "source", "device",
                "device_name", "gpus", "emulated", "torch", "git", "date", "dtype", "measured")

# measure(variant, tokens, hidden, ctas) -> microseconds per call; variant is an algo of tokenweave.comm.ALGOS
Measure = Callable[[str, int, int, int], float]

# A block shape replaces shape 0 (the kernel's own pick) at a token count only when it is faster by more than this
# fraction. The committed add_rmsnorm run measured run-to-run noise of at most 0.58% and shape 0 against its own
# kernel timed as shape 1 at most 0.17% apart (bench/results/add_rmsnorm-h200-tp1.json, 845116f): 2% is over 3x
# that, so no shape is switched in on noise, and a switch must buy more than the noise it risks.
NORM_MARGIN = 0.02
# ... but at a few microseconds one run can be 9% off (bench/results/add_rmsnorm-h200-tp1.json, e6bb5c4: 2.2 vs 2.0 us
# at 1 x 4096), and then a shape running shape 0's own kernel "beat" shape 0 by more than 2%. So shape 0 is timed
# again after the others at each size: the faster of its two times is the reference, and a shape must beat it by
# more than the noise as well (run_noise: the two times' largest difference among calls of like length).
# Within a family of one summation order the bits are one, so choosing its member by count guards against noise only:
# a member displaces the family's anchor at a count when faster by more than this fraction, the run-to-run noise of
# calls of like length (run_noise), and FAMILY_MIN_US. Since harness.clean_l2 the tune and the bench timed each
# member of a family within 0.72% of each other from 4096 tokens (median 0.21%; 95d8f74, bench/results/variants/
# 95d8f74): 1% is above that. NORM_MARGIN there kept shape 18 at 4096 x 4096, and would have in each of the tunes of
# 95d8f74, 4c12610, 7314e38, 783db04 and f42ff0a, where 24 was 1.2-1.9% faster (docs/PERFORMANCE.md).
FAMILY_MARGIN = 0.01
# ... and at calls of a few microseconds one kernel timed twice in one norm bench differed by up to 0.15 us: the
# compiled norm and its repeat at 128 x 4096 (0.15 us, 7314e38), the op and its shape's own column at 1024 x 8192
# (0.14 us, 4c12610; bench/results/variants/). Without this floor the noise and 1% let 25 serve 1 x 4096 at 7314e38
# (1.68 against 18's 1.73 us in the tune, 1.90 against 1.78 in the bench); twice the noise instead kept 18 at 4096 x
# 4096 in the tune of 783db04 (24 1.2% faster; one sample of 0.78% noise at 2048 tokens, doubled).
FAMILY_MIN_US = 0.15
# Rows of the batch on which each shape's out and residual must equal shape 0's bits: more than one CTA of any
# shape takes at once (at most 1024 threads / 32 per row), and a prime, so full and partial CTAs both take part.
NORM_PROBE_ROWS = 257
# What norm_candidates says of each shape other than 0. OTHER_ORDER: right (the residual bitwise, out within
# NORM_ORDER_TOLERANCE of shape 0's) but a row summed in another order, so other last bits: such a shape's family
# (norm_families: the shapes that sum in its order) may serve every token count of a hidden or none
# (decide_norm_shapes), never be switched to by batch size from shape 0's.
SAME_BITS, CANNOT_HOLD_ROW, DIFFERENT_BITS = "same bits", "cannot hold the row", "different bits"
OTHER_ORDER = "another summation order"
# Relative difference from shape 0's out that a summation order may make: one rounding of the 2-byte output
# (2^-8 relative for bf16) after an fp32 rstd that differs in its last bits; 2^-6 leaves room and still rejects a
# wrong result (a missing residual or weight moves out by far more).
NORM_ORDER_TOLERANCE = 2.0 ** -6
# Small token counts, where a launch gap is a visible part of a call (bench/results/pdl-h200-tp1.json, b263809:
# at 1024 and 8192 tokens PDL changed nothing beyond the noise); timed at the largest hidden.
LAUNCH_TOKENS = (1, 16, 128)
# Timed in this order at each token count: the repeat of "off", last, gives the run-to-run noise.
LAUNCH_VARIANTS = (("pdl_off", False), ("pdl_on", True), ("pdl_off_repeat", False))


class NormOp:
    """What the norm stage runs (on a GPU: :class:`NormBench`; the CPU tests pass fakes).

    ``probe(shape, hidden)`` returns ``(out, residual)`` of one call of the add + RMSNorm op in that block shape
    on a batch of :data:`NORM_PROBE_ROWS` rows of fresh random data (raising ``RuntimeError`` when the shape cannot
    hold the row); ``time(shape, tokens, hidden)`` returns microseconds per call; ``row_group(shape, hidden)`` the
    shape's threads per row (shapes with other groups than shape 0's sum a row in another order).
    """

    def probe(self, shape: int, hidden: int) -> Sequence[torch.Tensor]:
        raise NotImplementedError

    def row_group(self, shape: int, hidden: int) -> int:
        raise NotImplementedError

    def time(self, shape: int, tokens: int, hidden: int) -> float:
        raise NotImplementedError


# launch_measure(programmatic, tokens) -> microseconds per call (it sets the launch mode itself)
LaunchMeasure = Callable[[bool, int], float]


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


def decide_lean(measured: dict, variant: str = "lean", against: str = "two_shot") -> bool | None:
    """Lean on when it beat two-shot at every size measured (None: no size measured, decided elsewhere).
    ``variant``/``against``: the same rule for another pair (lean_pull against lean)."""
    lean, two = measured.get(variant, {}), measured.get(against, {})
    pairs = [(lean[t], two[t]) for t in lean if t in two]
    if not pairs:
        return None
    return all(a < b for a, b in pairs)


def decide_lean_pull(measured: dict) -> bool | None:
    """lean_pull on (for calls whose x is symmetric) when it beat lean at every size measured."""
    return decide_lean(measured, "lean_pull", "lean")


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


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors hold the same bits (NaN equals NaN of the same bits; -0.0 differs from 0.0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def norm_candidates(run: Callable[[int], Sequence[torch.Tensor]], shapes: Iterable[int],
                    row_group: Callable[[int], int] | None = None) -> dict[int, str]:
    """What may replace shape 0 at one hidden: ``{shape: SAME_BITS | OTHER_ORDER | CANNOT_HOLD_ROW |
    DIFFERENT_BITS}``.

    ``run(shape)`` gives the tensors of one call (out, residual) on one batch; a shape that raises
    ``RuntimeError`` cannot hold the row. Only shapes with shape 0's bits may be switched between by batch size:
    then a row's result never depends on the batch it came in. Shape 0 itself must run. ``row_group(shape)``, where
    given, is the shape's threads per row, which fixes the order a row is summed in: a shape whose group differs
    from shape 0's has other bits even where one probe batch happens to agree (bf16 rounding hides most
    last-bit differences of the float32 sum), so it is never SAME_BITS. A shape whose bits differ only as another
    summation order makes them (:func:`same_but_order`) is OTHER_ORDER: a candidate for every count or none.
    """
    reference = [t.clone() for t in run(0)]
    status = {}
    for shape in shapes:
        if shape == 0:
            continue
        try:
            got = run(shape)
        except RuntimeError:
            status[shape] = CANNOT_HOLD_ROW
            continue
        same = len(got) == len(reference) and all(same_bits(g, r) for g, r in zip(got, reference))
        if row_group is not None and row_group(shape) != row_group(0):
            same = False
        status[shape] = SAME_BITS if same else OTHER_ORDER if same_but_order(got, reference) else DIFFERENT_BITS
    return status


def norm_families(run: Callable[[int], Sequence[torch.Tensor]], shapes: Iterable[int],
                  row_group: Callable[[int], int] | None = None) -> list[tuple[int, ...]]:
    """``shapes`` (the OTHER_ORDER ones of one hidden) in families that sum a row in one order, each sorted, in
    order of their first shape.

    Two shapes are of one family when they run a row on the same number of threads (``row_group``, as in
    :func:`norm_candidates`) and give the same bits in every tensor ``run(shape)`` returns on the probe batch: then
    a choice that switches between them by batch size still gives a row the same bits in any batch, as switching
    among shape 0's SAME_BITS shapes does (csrc/kernels/launch.cu: the 8-byte-piece shapes 16, 19, 20, 22, 23
    and 26 differ only in the order of their traffic and their registers, not of their sums).
    """
    families: list[tuple[int | None, list[torch.Tensor], list[int]]] = []  # (row group, first's bits, members)
    for shape in sorted(set(shapes)):
        got = [t.clone() for t in run(shape)]
        group = row_group(shape) if row_group is not None else None
        home = next((f for f in families if f[0] == group and len(f[1]) == len(got)
                     and all(same_bits(g, r) for g, r in zip(got, f[1]))), None)
        if home is None:
            families.append((group, got, [shape]))
        else:
            home[2].append(shape)
    return [tuple(members) for _, _, members in families]


def _as_families(whole_range: Iterable[int | Sequence[int]]) -> list[tuple[int, ...]]:
    """``whole_range`` as families: a bare shape number is a family of one."""
    return [tuple(sorted(int(s) for s in f)) if isinstance(f, (list, tuple, set, frozenset)) else (int(f),)
            for f in whole_range]


def same_but_order(got: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> bool:
    """Whether (out, residual, ...) differ from shape 0's only as another summation order makes them: every tensor
    after out bitwise (the residual is z, summed per element), out finite and within NORM_ORDER_TOLERANCE."""
    if len(got) != len(reference) or not got or got[0].shape != reference[0].shape:
        return False
    if not all(same_bits(g, r) for g, r in zip(got[1:], reference[1:])):
        return False
    out, ref = got[0].double(), reference[0].double()
    if not bool(torch.isfinite(out).all()):
        return False
    return bool(((out - ref).abs() <= NORM_ORDER_TOLERANCE * (ref.abs() + 1)).all())


def decide_norm_shapes(times: dict[int, dict[int, float]], margin: float = NORM_MARGIN,
                       repeat: dict[int, float] | None = None,
                       whole_range: Iterable[int | Sequence[int]] = (),
                       family_margin: float = FAMILY_MARGIN, family_min_us: float = FAMILY_MIN_US) -> dict[int, int]:
    """The block shape per token count from ``times`` (tokens -> shape -> us, shape 0 among them): the fastest
    shape where it beats shape 0 by more than ``margin`` (a fraction of shape 0's time), else 0. Ties go to the
    lower shape number.

    ``repeat`` (tokens -> us): shape 0 timed again after the others. Where given, shape 0's time is the faster of
    its two, and the margin at least the run-to-run noise of calls of like length (:func:`run_noise`).

    ``whole_range``: families of shapes with another summation order (:data:`OTHER_ORDER`, :func:`norm_families`;
    a bare shape number is a family of one), never mixed with the others. A family replaces the per-count choice
    at every count, with a member chosen by count (:func:`family_choice`), when over the counts that is
    faster than the choice by more than the margin in geometric mean and slower by at most twice the margin at any
    count (:func:`whole_range_gain`); of several, the one with the largest mean gain (ties: the lower shapes). Within
    the family a member displaces its anchor at a count only by more than ``family_margin``, that count's
    :func:`run_noise` and ``family_min_us`` microseconds (:data:`FAMILY_MARGIN`, :data:`FAMILY_MIN_US`: the bits
    are one, so only noise is at stake there)."""
    families = _as_families(whole_range)
    noise = run_noise(times, repeat)
    choice, reference = _per_count_choice(times, margin, repeat, noise, {s for f in families for s in f})
    gains = {f: whole_range_gain(times, reference, f, family_margin, noise, family_min_us) for f in families}
    adopted = [f for f, (g, worst) in gains.items() if g > 1 + margin and worst >= 1 - 2 * margin]
    if adopted:
        best = min(adopted, key=lambda f: (-gains[f][0], f))
        return family_choice(times, best, family_margin, noise, family_min_us)
    return choice


def run_noise(times: dict[int, dict[int, float]], repeat: dict[int, float] | None) -> dict[int, float]:
    """tokens -> the run-to-run noise there: the largest sample ``|shape 0 - shape 0 again| / the faster of the two``
    among the counts timed twice whose faster shape 0 time lies in [t0 / 2, 2 t0], t0 this count's (the faster of
    its two where it has two); counts with no such sample are left out. One repeat is one sample, and calls of like
    length share their noise: at 1 x 4096 the two times were equal, at 256 x 4096 (3.2 us against 2.3) 2.4% apart
    (the tune of 4c12610, bench/results/variants/4c12610)."""
    repeat = repeat or {}
    own = {t: min(by_shape[0], repeat.get(t, by_shape[0])) for t, by_shape in times.items() if 0 in by_shape}
    sample = [(abs(times[t][0] - repeat[t]) / own[t], own[t]) for t in own if t in repeat]
    noise = {t: [n for n, us in sample if t0 / 2 <= us <= 2 * t0] for t, t0 in own.items()}
    return {t: max(found) for t, found in noise.items() if found}


def family_choice(times: dict[int, dict[int, float]], family: int | Sequence[int],
                  margin: float = 0.0, noise: dict[int, float] | None = None,
                  min_us: float = 0.0) -> dict[int, int]:
    """tokens -> the shape of ``family`` that serves that count; counts where none of it was timed are left out.

    The family's anchor, its member timed at every count with the smallest geometric mean of time over the fastest
    member's (ties: the lower shape), serves each count unless another member is faster there by more than
    ``margin`` and that count's ``noise`` (fractions of the anchor's time; :func:`run_noise`) and ``min_us``
    microseconds; then the fastest
    (ties: the lower shape). So at ``margin=0`` without noise a tie with the anchor goes to the anchor. Where no
    member was timed at every count there is no anchor, and each count takes its fastest member. Before
    harness.clean_l2, members within a percent of each other swapped places between runs (16 and 22 at 1024-2047 x
    8192 in the runs of 90d5372, 01cc739 and 5674140; docs/PERFORMANCE.md): the margin keeps such a member out."""
    members = _as_families([family])[0]
    noise = noise or {}
    timed = {t: [s for s in members if s in by_shape] for t, by_shape in times.items()}
    everywhere = [s for s in members if all(s in by_shape for by_shape in times.values())]
    anchor = min(everywhere, key=lambda s: (sum(math.log(times[t][s] / min(times[t][m] for m in timed[t]))
                                                for t in times), s), default=None)
    choice = {}
    for tokens, by_shape in times.items():
        if not timed[tokens]:
            continue
        best = min(timed[tokens], key=lambda s: (by_shape[s], s))
        keep = anchor is not None and by_shape[anchor] - by_shape[best] <= max(
            max(margin, noise.get(tokens, 0.0)) * by_shape[anchor], min_us)
        choice[tokens] = anchor if keep else best
    return choice


def _per_count_choice(times: dict[int, dict[int, float]], margin: float, repeat: dict[int, float] | None,
                      noise: dict[int, float], whole: set[int]) -> tuple[dict[int, int], dict[int, float]]:
    """decide_norm_shapes' choice per count among the shapes not in ``whole`` (``noise``: :func:`run_noise` of
    ``times`` and ``repeat``), and the time of that choice (shape 0's: the faster of its two)."""
    choice, reference = {}, {}
    for tokens, by_shape in times.items():
        base, needed = by_shape[0], max(margin, noise.get(tokens, 0.0))
        if repeat is not None and tokens in repeat:
            base = min(by_shape[0], repeat[tokens])
        per_count = {s: us for s, us in by_shape.items() if s not in whole}
        best = min(per_count, key=lambda s: (per_count[s], s))
        choice[tokens] = best if best != 0 and per_count[best] < (1 - needed) * base else 0
        reference[tokens] = base if choice[tokens] == 0 else per_count[choice[tokens]]
    return choice, reference


def whole_range_gain(times: dict[int, dict[int, float]], reference: dict[int, float],
                     family: int | Sequence[int], margin: float = 0.0,
                     noise: dict[int, float] | None = None, min_us: float = 0.0) -> tuple[float, float]:
    """``(geometric mean, smallest)`` over the token counts of reference / time of the family's choice there
    (:func:`family_choice` with ``margin``, ``noise`` and ``min_us``; a bare shape number is a family of one; > 1:
    faster); (0, 0) where no shape of it was timed at some count."""
    choice = family_choice(times, family, margin, noise, min_us)
    if not times or len(choice) != len(times):
        return 0.0, 0.0
    ratios = [reference[t] / times[t][choice[t]] for t in times]
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)), min(ratios)


def token_ranges(choice: dict[int, object]) -> list[tuple[int, int | None, object]]:
    """Consecutive token counts with the same value merged: ``[(min_tokens, max_tokens or None, value)]``.

    A measured count stands for the counts from itself to the next measured count minus one; the first range
    starts at 1 and the last is open (None).
    """
    counts = sorted(choice)
    ranges: list[list] = []
    for i, t in enumerate(counts):
        lo = 1 if i == 0 else t
        hi = counts[i + 1] - 1 if i + 1 < len(counts) else None
        if ranges and ranges[-1][2] == choice[t]:
            ranges[-1][1] = hi
        else:
            ranges.append([lo, hi, choice[t]])
    return [tuple(r) for r in ranges]


def common_choice(choices: dict[int, dict[int, int]]) -> dict[int, int | None]:
    """tokens -> the shape every hidden chose there, or None where the hiddens disagree (``--key world``)."""
    common = {}
    for t in sorted(set.intersection(*(set(c) for c in choices.values()))):
        picked = {c[t] for c in choices.values()}
        common[t] = picked.pop() if len(picked) == 1 else None
    return common


def launch_noise(times: dict[str, float]) -> float:
    """The run-to-run noise of one token count's launch timings: ``|pdl_off - pdl_off_repeat|``."""
    return abs(times["pdl_off"] - times["pdl_off_repeat"])


def decide_programmatic(measured: dict[int, dict[str, float]]) -> bool | None:
    """PDL on or off from ``measured`` (tokens -> {pdl_off, pdl_on, pdl_off_repeat} -> us); None without times.

    At a token count PDL wins when ``pdl_off - pdl_on`` exceeds the noise (:func:`launch_noise`), loses when
    ``pdl_on - pdl_off`` does, and is a tie otherwise. On when it won at more than half of the token counts and
    lost at none: a tie (noise as large as the gain, as at 1 token on the H200) neither votes for nor vetoes it.
    """
    if not measured:
        return None
    wins = losses = 0
    for times in measured.values():
        gain, noise = times["pdl_off"] - times["pdl_on"], launch_noise(times)
        wins += gain > noise
        losses += -gain > noise
    return losses == 0 and 2 * wins > len(measured)


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
        total += 3 * len(sizes)
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
    m: dict = {"one_shot": {}, "two_shot": {}, "lamport": {}, "lean": {}, "lean_pull": {}, "ctas": {}}
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

    # 3. lean against two-shot wherever two-shot would run, and lean_pull against lean there
    planned, start = 3 * len(sizes), progress.n
    floor = max(decisions["one_shot_max_bytes"], decisions.get("lamport_max_bytes", 0))
    for t in sizes:
        if t * row_bytes > floor:
            two_shot(t)
            m["lean"][t] = timed("lean", t, base_ctas[t])
            m["lean_pull"][t] = timed("lean_pull", t, base_ctas[t])
    progress.skip(planned - (progress.n - start))
    for field, decide in (("lean", decide_lean), ("lean_pull", decide_lean_pull)):
        if (on := decide(m)) is not None:
            decisions[field] = on

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
    for field in ("lean", "lean_pull"):
        ons = [d[field] for d in decided if field in d]
        if ons:
            out[field] = all(ons)
    sweeps = [(t * h * itemsize, s["us"]) for h, d in per_hidden.items()
              for t, s in d["measured"].get("ctas", {}).items()]
    bpc = decide_bytes_per_cta(sweeps, max_ctas)
    if bpc is not None:
        out["bytes_per_cta"] = bpc
    return out


def planned_norm_timings(hiddens: Sequence[int], tokens: Sequence[int], num_shapes: int) -> int:
    """An upper bound of the timings :func:`tune_norm` makes (every shape at every size, and shape 0 again)."""
    return len(hiddens) * len(tokens) * (num_shapes + 1)


def tune_norm(op: NormOp, hiddens: Sequence[int], tokens: Sequence[int], num_shapes: int,
              progress: Progress | None = None, margin: float = NORM_MARGIN) -> dict[int, dict]:
    """The norm stage: per hidden, the shapes with shape 0's bits (:func:`norm_candidates`), each timed at every
    token count, and the choice (:func:`decide_norm_shapes`).

    Shapes with another summation order (:data:`OTHER_ORDER`) are timed too, their families
    (:func:`norm_families`) candidates for every count at once.
    Returns ``{hidden: {"shapes": {shape: status}, "families": [(shape, ...)], "measured": {tokens: {shape: us}},
    "repeat": {tokens: us}, "choice": {tokens: shape}}}`` ("families": the OTHER_ORDER shapes by summation order,
    :func:`norm_families`; "repeat": shape 0 timed again after the others); where no shape but 0 qualifies nothing
    is timed and the choice is 0 everywhere.
    """
    progress = progress or Progress(0, enabled=False)
    counts = sorted(set(tokens))
    result = {}
    for hidden in hiddens:
        status = norm_candidates(lambda shape: op.probe(shape, hidden), range(num_shapes),
                                 lambda shape: op.row_group(shape, hidden))
        whole = [s for s, why in status.items() if why == OTHER_ORDER]
        families = norm_families(lambda shape: op.probe(shape, hidden), whole,
                                 lambda shape: op.row_group(shape, hidden)) if whole else []
        shapes = [0] + [s for s, why in status.items() if why == SAME_BITS] + whole
        measured: dict[int, dict[int, float]] = {}
        repeat: dict[int, float] = {}
        if len(shapes) > 1:
            for t in counts:
                measured[t] = {}
                for s in shapes:
                    measured[t][s] = us = float(op.time(s, t, hidden))
                    progress.step(f"norm hidden={hidden} T={t} shape={s}: {us:.2f} us")
                repeat[t] = us = float(op.time(0, t, hidden))
                progress.step(f"norm hidden={hidden} T={t} shape=0 again: {us:.2f} us")
        progress.skip(len(counts) * (num_shapes + 1) - sum(len(m) for m in measured.values()) - len(repeat))
        choice = decide_norm_shapes(measured, margin, repeat, families) if measured else {t: 0 for t in counts}
        result[hidden] = {"shapes": status, "families": families, "measured": measured, "repeat": repeat,
                          "choice": choice}
    return result


def tune_launch(measure: LaunchMeasure, tokens: Sequence[int] = LAUNCH_TOKENS,
                progress: Progress | None = None) -> dict:
    """The launch stage: each token count timed PDL off, on, off again (:data:`LAUNCH_VARIANTS`); returns
    ``{"programmatic": bool, "measured": {tokens: {variant: us}}}`` (:func:`decide_programmatic`)."""
    progress = progress or Progress(0, enabled=False)
    measured = {}
    for t in tokens:
        measured[t] = {}
        for name, on in LAUNCH_VARIANTS:
            measured[t][name] = us = float(measure(on, t))
            progress.step(f"launch T={t} {name}: {us:.2f} us")
    return {"programmatic": decide_programmatic(measured), "measured": measured}


@dataclass
class OneGpu:
    """The one-GPU stages' measuring callables (:func:`one_gpu_measures` on a GPU; fakes in the CPU tests).

    ``set_programmatic`` switches PDL for the norm stage (to the launch stage's decision) and restores
    ``programmatic``, the process's setting before the stages, after them.
    """

    norm: NormOp | None = None
    num_shapes: int = 0
    launch: LaunchMeasure | None = None
    set_programmatic: Callable[[bool], None] | None = None
    programmatic: bool = False


def tune_one_gpu(one_gpu: OneGpu, hiddens: Sequence[int], tokens: Sequence[int], do_norm: bool, do_launch: bool,
                 progress: Progress | None = None) -> tuple[dict | None, dict | None]:
    """The launch stage (at the largest hidden), then the norm stage under the PDL setting it decided (how the
    kernel will run); the process's PDL setting is restored after. Returns ``(norm, launch)``, None where skipped."""
    norm = launch = None
    try:
        if do_launch:
            launch = tune_launch(one_gpu.launch, LAUNCH_TOKENS, progress)
        if do_norm:
            if launch is not None and one_gpu.set_programmatic is not None:
                one_gpu.set_programmatic(bool(launch["programmatic"]))
            norm = tune_norm(one_gpu.norm, hiddens, tokens, one_gpu.num_shapes, progress)
    finally:
        if one_gpu.set_programmatic is not None:
            one_gpu.set_programmatic(one_gpu.programmatic)
    return norm, launch


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


def _one_gpu_common(prov: Provenance) -> dict:
    """Provenance of a one-GPU stage's entry (measured on one real GPU in every mode: no "emulated")."""
    return {"device": prov.card, "device_name": prov.device_name, "gpus": 1, "torch": prov.torch_version,
            "git": prov.git, "date": prov.date, "dtype": prov.dtype}


def _one_gpu_where(prov: Provenance) -> str:
    return f"tokenweave-tune on 1 x {prov.device_name} ({prov.git}, torch {prov.torch_version}, {prov.date})"


def _times_in(prov: Provenance) -> str:
    return f"; times in {prov.results_file}" if prov.results_file else ""


def _families_of(result: dict) -> list[tuple[int, ...]]:
    """One hidden's OTHER_ORDER families (tune_norm's "families"; each such shape alone where it has none)."""
    orders = sorted(s for s, why in result["shapes"].items() if why == OTHER_ORDER)
    families = [tuple(f) for f in result.get("families", [])]
    return families + [(s,) for s in orders if not any(s in f for f in families)]


def _family_of(result: dict, shape: int) -> tuple[int, ...]:
    return next((f for f in _families_of(result) if shape in f), (shape,))


def _whole_range_gain_of(result: dict, shape: int, margin: float) -> tuple[float, float]:
    """:func:`whole_range_gain` of the family of ``shape`` over the per-count choice, from one hidden's tune_norm
    result."""
    orders = {s for s, why in result["shapes"].items() if why == OTHER_ORDER}
    noise = run_noise(result["measured"], result.get("repeat"))
    _, reference = _per_count_choice(result["measured"], margin, result.get("repeat"), noise, orders)
    return whole_range_gain(result["measured"], reference, _family_of(result, shape), FAMILY_MARGIN, noise,
                            FAMILY_MIN_US)


def _range_text(lo: int, hi: int | None) -> str:
    return f"{lo}-{hi} tokens" if hi is not None else f"{lo}+ tokens"


def make_norm_entries(norm: dict[int, dict], itemsize: int, key: str, prov: Provenance,
                      margin: float = NORM_MARGIN) -> list[dict]:
    """``"norm"`` entries (:func:`tokenweave.tuning.norm_shape`'s format) from :func:`tune_norm`'s result.

    One entry per range of token counts (:func:`token_ranges`) whose shape is not 0 (0 needs no entry).
    ``key="shape"``: per hidden (``"hidden"``). ``key="world"``: where every hidden chose the same shape, one
    entry without ``"hidden"`` and with ``"max_hidden"`` (the largest hidden measured), as the shipped files have
    it; where the hiddens disagreed, or the shape sums in another order (``OTHER_ORDER``) at any of them, per-hidden
    entries for those token counts (their ranges do not overlap).
    """
    if key not in ("shape", "world"):
        raise ValueError(f"tokenweave-tune: key={key!r}; use 'shape' or 'world'")
    if not norm:
        return []

    def entry(match: dict, lo: int, hi: int | None, shape: int, hiddens: Sequence[int]) -> dict:
        in_range = [t for t in sorted(norm[hiddens[0]]["choice"]) if t >= lo and (hi is None or t <= hi)]
        # a shape of another order was decided over every count (its family's): its entry holds every count's times
        whole = any(norm[h]["shapes"].get(shape) == OTHER_ORDER for h in hiddens)
        counts = sorted(norm[hiddens[0]]["choice"]) if whole else in_range
        times = {h: {t: norm[h]["measured"][t] for t in counts} for h in hiddens}
        again = {h: {t: norm[h]["repeat"][t] for t in counts if t in norm[h].get("repeat", {})} for h in hiddens}
        beat = "; ".join(f"{times[h][t][shape]:.2f} vs {times[h][t][0]:.2f}"
                         + (f" and {again[h][t]:.2f}" if t in again[h] else "") + f" us at {t} x {h}"
                         for h in hiddens for t in in_range)
        others = sorted({s for h in hiddens for s, why in norm[h]["shapes"].items() if why == SAME_BITS} - {shape})
        orders = sorted({s for h in hiddens for s, why in norm[h]["shapes"].items() if why == OTHER_ORDER})
        families = sorted({f for h in hiddens for f in _families_of(norm[h])})
        twice = " (timed before and after the others)" if any(again.values()) else ""
        if shape in orders:  # its family serves every count (decide_norm_shapes): say so, with its gain
            family = sorted({s for h in hiddens for s in _family_of(norm[h], shape)})
            gains = "; ".join(f"{g:.3f}x in geometric mean, at worst {w:.3f}x, at hidden {h}"
                              for h in hiddens for g, w in [_whole_range_gain_of(norm[h], shape, margin)])
            kin = (f"its family (shapes {', '.join(map(str, family))}: one summation order; at each count its anchor "
                   f"unless another member is faster by more than {FAMILY_MARGIN:.1%}, the run-to-run noise of "
                   f"shape 0 at calls of like length and {FAMILY_MIN_US} us)" if len(family) > 1 else "it")
            beat = (f"it sums a row in another order than shape 0, so {kin} serves every token count or none; over "
                    f"the per-count choice: {gains} (needs more than {1 + margin:.2f}x, and at least "
                    f"{1 - 2 * margin:.2f}x at every count); its times against shape 0's: {beat}")
        else:
            beat = (f"beat shape 0 (the kernel's own pick){twice} by more than {margin:.0%} and its run-to-run "
                    f"noise at calls of like length: {beat}")
        source = (f"{_one_gpu_where(prov)}: at {_range_text(lo, hi)} shape {shape}: {beat}; also timed (shape 0's "
                  f"bits): {', '.join(map(str, others)) or 'none'}"
                  + (f"; (another summation order): {', '.join(map(str, orders))}" if orders else "")
                  + _times_in(prov))
        bounds = {"min_tokens": lo, **({"max_tokens": hi} if hi is not None else {})}
        repeat = {"shape0_again": _rounded(again)} if any(again.values()) else {}
        other = {"other_order": [list(f) for f in families]} if orders else {}
        return {"itemsize": itemsize, **match, **bounds, "shape": int(shape), "source": source,
                **_one_gpu_common(prov), "measured": _rounded(times), **repeat, **other}

    def per_hidden(choices: dict[int, dict[int, int]]) -> list[dict]:
        return [entry({"hidden": h}, lo, hi, s, [h]) for h, c in choices.items()
                for lo, hi, s in token_ranges(c) if s != 0]

    choices = {h: d["choice"] for h, d in norm.items()}
    if key == "shape":
        return per_hidden(choices)
    # a shape with another summation order at any measured hidden stays in that hidden's own entries: a
    # "max_hidden" entry would hand it to hiddens never measured, at some token counts only (their rows' bits would
    # then depend on the batch) or where it cannot hold the row (launch.cu shape 16: rows of 4097-8192 elements)
    orders = {s for d in norm.values() for s, why in d["shapes"].items() if why == OTHER_ORDER}
    common = {t: None if s in orders else s for t, s in common_choice(choices).items()}
    hiddens = sorted(norm)
    world = [entry({"max_hidden": hiddens[-1]}, lo, hi, s, hiddens) for lo, hi, s in token_ranges(common)
             if s not in (0, None)]
    # where the hiddens disagreed, each hidden's own choice (0 elsewhere: the world entries cover those counts)
    split = {h: {t: (c[t] if common.get(t, None) is None else 0) for t in c} for h, c in choices.items()}
    return per_hidden(split) + world


def norm_scopes(card: str, itemsize: int, hiddens: Iterable[int], key: str) -> set[tuple]:
    """The ``"norm"`` entries a tune replaces, as (device, itemsize, hidden or None) keys: those naming a hidden
    it measured and, with ``key="world"``, every entry for the dtype size that names no hidden."""
    scopes = {(card, itemsize, h) for h in hiddens}
    return scopes | {(card, itemsize, None)} if key == "world" else scopes


def _norm_scope(entry: dict, default_device: str | None) -> tuple:
    return entry.get("device", default_device), entry.get("itemsize"), entry.get("hidden")


def merge_norm_entries(existing: list[dict], new: list[dict], scopes: Iterable[tuple],
                       default_device: str | None) -> list[dict]:
    """``existing`` less every entry in ``scopes`` (:func:`norm_scopes`: a tune re-decides the whole token range
    of what it measured, so stale ranges must not survive), plus ``new``. Entries naming a hidden first, then
    those naming an itemsize (the first match wins in :func:`tokenweave.tuning.norm_shape`)."""
    scopes = set(scopes)
    kept = [e for e in existing if _norm_scope(e, default_device) not in scopes]
    return sorted(kept + list(new), key=lambda e: ("hidden" not in e, "itemsize" not in e))


def make_launch_entry(launch: dict, hidden: int, prov: Provenance) -> dict:
    """The ``"launch"`` entry (:func:`tokenweave.tuning.programmatic_launch`'s format) from :func:`tune_launch`."""
    measured = launch["measured"]
    wins = [t for t, m in measured.items() if m["pdl_off"] - m["pdl_on"] > launch_noise(m)]
    losses = [t for t, m in measured.items() if m["pdl_on"] - m["pdl_off"] > launch_noise(m)]
    times = "; ".join(f"{m['pdl_on']:.2f} vs {m['pdl_off']:.2f} us (noise {launch_noise(m):.2f}) at {t} x {hidden}"
                      for t, m in sorted(measured.items()))
    on = bool(launch["programmatic"])
    source = (f"{_one_gpu_where(prov)}: back-to-back add_rmsnorm calls in a CUDA graph, PDL on vs off: {times}; "
              f"PDL won (by more than the noise |off - off repeat|) at {len(wins)} of {len(measured)} token counts "
              f"and lost at {len(losses)}: {'on' if on else 'off'} (on needs wins at more than half and no loss)"
              f"{_times_in(prov)}")
    return {"programmatic": on, "source": source, **_one_gpu_common(prov),
            "measured": _rounded({hidden: measured})}


def merge_launch_entries(existing: list[dict], new: dict, default_device: str | None) -> list[dict]:
    """``existing`` with ``new`` in place of the first entry for its device (fields the tuner does not write
    survive from it) and without that device's other entries (only the first is ever read)."""
    device = new.get("device", default_device)
    merged, placed = [], False
    for old in existing:
        if old.get("device", default_device) != device:
            merged.append(old)
        elif not placed:
            kept = {k: v for k, v in old.items() if k not in TUNED_FIELDS and k != "programmatic"}
            merged.append({**kept, **new})
            placed = True
    return merged if placed else [new] + merged


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


def write_config(path: str | os.PathLike, card: str, device_name: str, entries: list[dict], *,
                 norm: list[dict] | None = None, scopes: Iterable[tuple] = (), launch: dict | None = None) -> Path:
    """Merge ``entries`` into the config file at ``path`` (created if missing) and write it.

    ``norm`` and ``scopes`` update the ``"norm"`` list (:func:`merge_norm_entries`; untouched when both are
    empty), ``launch`` the ``"launch"`` list (:func:`merge_launch_entries`); every other key of the file
    (``"trigger"`` among them) is kept as it is.
    """
    path = Path(path)
    doc = {"device": card,
           "about": f"Dispatch decisions measured on {device_name} by tokenweave-tune (see tokenweave/tuning.py for "
                    "the fields). Each entry names its run.",
           "entries": []}
    if path.exists():
        loaded = json.loads(path.read_text())
        if not isinstance(loaded, dict) or not all(isinstance(loaded.get(k, []), list)
                                                   for k in ("entries", "norm", "launch")):
            raise SystemExit(f"tokenweave-tune: {path} is not a tokenweave config (a JSON object with lists "
                             "'entries', 'norm', 'launch'); choose another --out")
        doc.update(loaded)
    doc["entries"] = merge_entries(doc.get("entries", []), entries, doc.get("device"))
    scopes = set(scopes)
    if norm or scopes:
        doc["norm"] = merge_norm_entries(doc.get("norm", []), norm or [], scopes, doc.get("device"))
    if launch is not None:
        doc["launch"] = merge_launch_entries(doc.get("launch", []), launch, doc.get("device"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def result_rows(per_hidden: dict[int, dict], dtype: str) -> list[dict]:
    """The times as flat results rows (:mod:`tokenweave.bench.harness`): variant = algo, or algo_ctasN."""
    rows = []
    for h, d in per_hidden.items():
        m = d["measured"]
        for variant in ("one_shot", "two_shot", "lamport", "lean", "lean_pull"):
            for t, us in sorted(m.get(variant, {}).items()):
                rows.append({"hidden": h, "tokens": t, "dtype": dtype, "variant": variant, "us": us})
        for t, sweep in sorted(m.get("ctas", {}).items()):
            for c, us in sweep["us"].items():
                rows.append({"hidden": h, "tokens": t, "dtype": dtype, "variant": f"{sweep['algo']}_ctas{c}",
                             "ctas": c, "us": us})
    return rows


def one_gpu_rows(norm: dict[int, dict] | None, launch: dict | None, launch_hidden: int, dtype: str) -> list[dict]:
    """The one-GPU stages' times as results rows: ``table`` "norm" (variant shapeK) and "launch" (pdl_*)."""
    rows = []
    for h, d in (norm or {}).items():
        for t, by_shape in sorted(d["measured"].items()):
            for s, us in by_shape.items():
                rows.append({"table": "norm", "hidden": h, "tokens": t, "dtype": dtype, "variant": f"shape{s}",
                             "shape": s, "us": us})
            if t in d.get("repeat", {}):
                rows.append({"table": "norm", "hidden": h, "tokens": t, "dtype": dtype, "variant": "shape0_again",
                             "shape": 0, "us": d["repeat"][t]})
    for t, times in sorted((launch or {}).get("measured", {}).items()):
        for variant, us in times.items():
            rows.append({"table": "launch", "hidden": launch_hidden, "tokens": t, "dtype": dtype,
                         "variant": variant, "us": us})
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
    sym_x = comm.empty(numel, dtype=dtype)  # lean_pull reads x in place
    sym_x.copy_(x)

    def measure(variant: str, tokens: int, hidden: int, ctas: int) -> float:
        lean = variant in ("lean", "lean_pull")
        xv, src = _rows(sym_x if variant == "lean_pull" else x, tokens, hidden), _rows(residual, tokens, hidden)
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
    sym_xs = world.empty(numel, dtype=dtype)  # lean_pull reads x in place
    for s, x in zip(sym_xs, xs):
        s.copy_(x)

    def measure(variant: str, tokens: int, hidden: int, ctas: int) -> float:
        lean = variant in ("lean", "lean_pull")
        src = _rows(residual, tokens, hidden)
        xv = [_rows(x, tokens, hidden) for x in (sym_xs if variant == "lean_pull" else xs)]
        out = [_rows(o, tokens, hidden) for o in (sym_out if lean else plain_out)]
        res = [_rows(r, tokens, hidden) for r in (sym_res if lean else plain_res)]
        w = weights[hidden]

        def reset():
            for r in res:
                r.copy_(src)

        def fn(comm, r):
            tw.fused_allreduce_rmsnorm(comm, xv[r], res[r], w, EPS, out=out[r], algo=variant, ctas=ctas)
        reset()
        us = harness.time_cuda_graph(fn, calls=calls, replays=replays, before_replay=reset, world=world)
        world.synchronize()
        return us

    return measure


class NormBench(NormOp):
    """The standalone add + RMSNorm op (``torch.ops.tokenweave.add_rmsnorm``) in a given block shape, on one GPU.

    ``time`` runs on tensors of their own for each (tokens, hidden), allocated in the order bench/add_rmsnorm.py
    allocates them (x, residual, weight, the residual worked on, out), as the bench that reports the result does.
    ``fresh_per_size=False``: views of buffers sized for the largest batch instead (the probe's tensors), as before
    1ed6e1f. Where the working set is near the L2's size (1024-4096 tokens) the two timed some shapes 5-10% apart
    (bench/results/variants/1ed6e1f: shape 16 at 64.33 us in the tune and 67.9 in the bench at 4096 x 8192, shape
    22 64.68 and 64.5), and the tune then picked what the bench timed slower."""

    def __init__(self, device, hiddens: Sequence[int], max_tokens: int, dtype, calls: int, replays: int,
                 fresh_per_size: bool = True):
        numel = max(max_tokens, NORM_PROBE_ROWS) * max(hiddens)
        self.device, self.dtype, self.calls, self.replays = device, dtype, calls, replays
        self.fresh_per_size, self._fresh, self._fresh_size = fresh_per_size, None, None
        self.x = _rank_input(device, numel, dtype, 0)
        self.residual, self.weights = _shared_inputs(device, numel, hiddens, dtype)
        self.work, self.out = torch.empty_like(self.residual), torch.empty_like(self.residual)
        self.op = torch.ops.tokenweave.add_rmsnorm.default

    def _views(self, tokens: int, hidden: int):
        return (_rows(self.x, tokens, hidden), _rows(self.residual, tokens, hidden), _rows(self.work, tokens, hidden),
                _rows(self.out, tokens, hidden), self.weights[hidden])

    def _timed_tensors(self, tokens: int, hidden: int):
        """(x, residual, residual worked on, out, weight) for timing (see the class)."""
        if not self.fresh_per_size:
            return self._views(tokens, hidden)
        if self._fresh_size != (tokens, hidden):
            self._fresh = None  # the previous size's memory goes back to the allocator first, as the bench's does
            gen = torch.Generator(self.device).manual_seed(tokens * 100003 + hidden)
            x = torch.randn(tokens, hidden, generator=gen, device=self.device, dtype=self.dtype)
            residual = torch.randn(tokens, hidden, generator=gen, device=self.device, dtype=self.dtype)
            weight = (1 + 0.1 * torch.randn(hidden, generator=gen, device=self.device)).to(self.dtype)
            work = residual.clone()
            out = torch.full_like(x, float("nan"))
            self._fresh, self._fresh_size = (x, residual, work, out, weight), (tokens, hidden)
        return self._fresh

    def row_group(self, shape: int, hidden: int) -> int:
        from tokenweave._ext import _C

        return int(_C.add_rmsnorm_row_group(shape, hidden, self.x.element_size()))

    def probe(self, shape: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, src, res, out, w = self._views(NORM_PROBE_ROWS, hidden)
        res.copy_(src)
        out.fill_(float("nan"))  # poisoned: a shape that writes nothing cannot match
        self.op(x, res, w, out, EPS, shape)  # RuntimeError before launch when the shape cannot hold the row
        torch.cuda.synchronize(self.device)
        return out.clone(), res.clone()

    def time(self, shape: int, tokens: int, hidden: int) -> float:
        from tokenweave.bench import harness

        x, src, res, out, w = self._timed_tensors(tokens, hidden)
        res.copy_(src)
        return harness.time_cuda_graph(lambda: self.op(x, res, w, out, EPS, shape), calls=self.calls,
                                       replays=self.replays, before_replay=lambda: res.copy_(src), clean=True)


def launch_measure(device, hidden: int, dtype, calls: int, replays: int) -> LaunchMeasure:
    """``(programmatic, tokens) -> us`` of back-to-back ``tokenweave.add_rmsnorm`` calls in a CUDA graph (each
    reads the residual the previous one wrote), PDL set as asked while the graph is captured."""
    import tokenweave as tw
    from tokenweave.bench import harness

    numel = max(LAUNCH_TOKENS) * hidden
    x = _rank_input(device, numel, dtype, 0)
    residual, weights = _shared_inputs(device, numel, [hidden], dtype)
    work, out = torch.empty_like(residual), torch.empty_like(residual)

    def measure(programmatic: bool, tokens: int) -> float:
        xv, src, res, o = (_rows(t, tokens, hidden) for t in (x, residual, work, out))
        tw.set_programmatic_launch(programmatic)  # recorded into the graph's kernel nodes at capture
        res.copy_(src)
        return harness.time_cuda_graph(lambda: tw.add_rmsnorm(xv, res, weights[hidden], EPS, out=o), calls=calls,
                                       replays=replays, before_replay=lambda: res.copy_(src))

    return measure


def one_gpu_measures(plan: "Plan") -> OneGpu:
    """The one-GPU stages' :class:`OneGpu` on the current GPU."""
    import tokenweave as tw
    from tokenweave._ext import _C
    from tokenweave.ops import _ops

    _ops()  # the first op sets the card's PDL default; read the setting to restore after it
    dev, dtype = torch.device("cuda", torch.cuda.current_device()), DTYPES[plan.dtype]
    norm = NormBench(dev, plan.hiddens, max(plan.tokens), dtype, plan.calls, plan.replays) \
        if plan.norm and dtype.itemsize == 2 else None
    launch = launch_measure(dev, max(plan.hiddens), dtype, plan.calls, plan.replays) if plan.launch else None
    return OneGpu(norm=norm, num_shapes=int(_C.add_rmsnorm_configs()), launch=launch,
                  set_programmatic=tw.set_programmatic_launch, programmatic=tw.programmatic_launch())


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
    allreduce: bool = True   # the fused op's dispatch decisions ("entries"; needs a world)
    norm: bool = True        # the add + RMSNorm block shapes ("norm"; one GPU)
    launch: bool = True      # PDL on or off ("launch"; one GPU)


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
    stages = p.add_argument_group("stages (all run by default)")
    stages.add_argument("--no-allreduce", action="store_true",
                        help="skip the fused all-reduce's decisions ('entries'): only the one-GPU stages run, on one "
                             "GPU without --tp or --emulated")
    stages.add_argument("--no-norm", action="store_true",
                        help="skip the add + RMSNorm block shapes ('norm'; measured on one GPU, 2-byte dtypes)")
    stages.add_argument("--no-launch", action="store_true",
                        help="skip the programmatic-dependent-launch decision ('launch'; measured on one GPU)")
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
    if args.no_allreduce and args.no_norm and args.no_launch:
        raise SystemExit("tokenweave-tune: --no-allreduce, --no-norm and --no-launch leave nothing to measure")
    if args.no_allreduce:
        if args.tp is not None or args.emulated is not None:
            raise SystemExit("tokenweave-tune: --no-allreduce measures the one-GPU stages on one GPU; leave out --tp "
                             "and --emulated")
        world, emulated = 1, False
    elif args.emulated is not None:
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
                args.results_dir, args.calls, args.replays, allreduce=not args.no_allreduce, norm=not args.no_norm,
                launch=not args.no_launch)


@dataclass
class Tuned:
    """What :func:`run_plan` measured and wrote (None / empty for a stage that did not run)."""

    path: Path
    entries: list[dict]
    per_hidden: dict[int, dict]
    norm: dict[int, dict] | None
    norm_entries: list[dict]
    launch: dict | None
    launch_entry: dict | None
    notes: list[str]


def run_plan(plan: Plan, measure: Measure | None, limits: Limits | None, prov: Provenance,
             one_gpu: OneGpu | None = None) -> Tuned:
    """Tune and write the config (rank 0's part): the all-reduce stage with ``measure`` (None: skipped), then the
    one-GPU stages with ``one_gpu`` (None: skipped), as the plan asks."""
    itemsize = DTYPES[plan.dtype].itemsize
    do_allreduce = plan.allreduce and measure is not None
    do_norm = plan.norm and itemsize == 2 and one_gpu is not None and one_gpu.norm is not None
    do_launch = plan.launch and one_gpu is not None and one_gpu.launch is not None
    notes = []
    if plan.norm and itemsize != 2:
        notes.append(f"norm: block shapes are measured for 2-byte dtypes only; {plan.dtype} keeps shape 0 (the "
                     "kernel's own pick): nothing measured or written")
    total = planned_timings(plan.hiddens, plan.tokens, itemsize, limits) if do_allreduce else 0
    total += planned_norm_timings(plan.hiddens, plan.tokens, one_gpu.num_shapes) if do_norm else 0
    total += len(LAUNCH_TOKENS) * len(LAUNCH_VARIANTS) if do_launch else 0
    progress = Progress(total, enabled=plan.show_progress)
    norm = launch = None
    try:
        per_hidden = tune(measure, plan.hiddens, plan.tokens, itemsize, limits, progress) if do_allreduce else {}
        if do_norm or do_launch:
            norm, launch = tune_one_gpu(one_gpu, plan.hiddens, plan.tokens, do_norm, do_launch, progress)
    finally:
        progress.close()
    entries = make_entries(per_hidden, plan.world_size, itemsize, plan.key, prov, limits.max_ctas) if per_hidden else []
    norm_entries = make_norm_entries(norm, itemsize, plan.key, prov) if norm is not None else []
    scopes = norm_scopes(prov.card, itemsize, plan.hiddens, plan.key) if norm is not None else set()
    launch_entry = make_launch_entry(launch, max(plan.hiddens), prov) if launch is not None else None
    path = write_config(plan.out or f"tokenweave-{prov.card}.json", prov.card, prov.device_name, entries,
                        norm=norm_entries, scopes=scopes, launch=launch_entry)
    return Tuned(path, entries, per_hidden, norm, norm_entries, launch, launch_entry, notes)


def report(plan: Plan, tuned: Tuned, card: str) -> None:
    """Print what was written (rank 0)."""
    n_launch = 1 if tuned.launch_entry else 0
    print(f"tokenweave-tune: wrote {len(tuned.entries)} dispatch, {len(tuned.norm_entries)} norm and {n_launch} "
          f"launch entr{'y' if len(tuned.entries) + len(tuned.norm_entries) + n_launch == 1 else 'ies'} to "
          f"{tuned.path.resolve()}")
    for e in tuned.entries:
        what = f"hidden {e['hidden']}" if "hidden" in e else "any hidden"
        print(f"  {card}, world {e['world_size']}{' (emulated)' if plan.emulated else ''}, {plan.dtype}, {what}: "
              f"{describe(e)}")
    if tuned.entries and plan.emulated:
        print("  emulated entries compare data paths without NVLink; an entry measured on real GPUs for the same "
              "shape is listed first and wins")
    for h, d in (tuned.norm or {}).items():
        same = [s for s, why in d["shapes"].items() if why == SAME_BITS]
        families = "; ".join(", ".join(map(str, f)) for f in _families_of(d))
        print(f"  norm, {plan.dtype}, hidden {h}: shapes with shape 0's bits: {', '.join(map(str, same)) or 'none'}"
              f"; with another summation order, by family (every count or none): {families or 'none'}")
    for e in tuned.norm_entries:
        what = f"hidden {e['hidden']}" if "hidden" in e else f"hidden <= {e['max_hidden']}"
        print(f"  norm, {plan.dtype}, {what}, {_range_text(e['min_tokens'], e.get('max_tokens'))}: shape {e['shape']}")
    if tuned.norm is not None and not tuned.norm_entries:
        print("  norm: shape 0 (the kernel's own pick) at every size measured: no entry (older ones for these "
              "hiddens removed)")
    if tuned.launch_entry:
        print(f"  launch: programmatic dependent launch {'on' if tuned.launch_entry['programmatic'] else 'off'}")
    for note in tuned.notes:
        print(f"  {note}")
    print(f"Use it:  export TOKENWEAVE_CONFIG={tuned.path.resolve()}\n(searched before the shipped configs; "
          "entries for other cards are ignored)", flush=True)


def _tune_and_report(plan: Plan, measure: Measure | None, limits: Limits | None, gpus: int, rank0: bool) -> None:
    from tokenweave.bench import harness
    from tokenweave.tuning import device_slug

    if not rank0:  # the same collective sequence as rank 0; rank 0 writes (and alone runs the one-GPU stages,
        # while this rank waits in Communicator.close's barrier)
        tune(measure, plan.hiddens, plan.tokens, DTYPES[plan.dtype].itemsize, limits)
        return
    card, name = device_slug(), torch.cuda.get_device_name()
    results = None
    bench = "tune_emulated" if plan.emulated else "tune"
    if plan.results_dir:
        results = str(Path(plan.results_dir) / f"{harness.result_stem(bench, plan.world_size, card)}.json")
    prov = Provenance.here(card, name, gpus, plan.emulated, DTYPES[plan.dtype], results)
    one_gpu = one_gpu_measures(plan) if plan.norm or plan.launch else None
    tuned = run_plan(plan, measure, limits, prov, one_gpu)
    if plan.results_dir:
        rows = result_rows(tuned.per_hidden, plan.dtype) + one_gpu_rows(tuned.norm, tuned.launch, max(plan.hiddens),
                                                                         plan.dtype)
        extra = {"device_name": name, "emulated": plan.emulated, "config": str(tuned.path)}
        if tuned.norm is not None:
            extra["norm_shapes"] = {h: d["shapes"] for h, d in tuned.norm.items()}
            extra["norm_families"] = {h: [list(f) for f in _families_of(d)] for h, d in tuned.norm.items()}
        harness.write_results(bench, plan.world_size, rows, plan.results_dir, extra, device=card,
                              baseline="two_shot", panel_keys=("table", "hidden"))
    report(plan, tuned, card)


@contextlib.contextmanager
def _without_user_config():
    """Measure at the shipped/heuristic settings: a previous tune's file must not steer this one. The parsed
    configs are forgotten on the way in and out (they are cached per process), so the file written is read
    afresh after the tune."""
    from tokenweave import tuning

    def forget():
        tuning.clear_cache()

    saved = os.environ.pop("TOKENWEAVE_CONFIG", None)
    forget()
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TOKENWEAVE_CONFIG"] = saved
        forget()


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


def run_one_gpu(plan: Plan) -> None:
    """Only the one-GPU stages (``--no-allreduce``), on the current GPU, in this process."""
    with _without_user_config():
        _tune_and_report(plan, None, None, 1, True)


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
    if not plan.allreduce:
        run_one_gpu(plan)
    elif plan.emulated:
        run_emulated(plan)
    else:
        harness.spawn(worker, plan.world_size, "nccl", plan)


if __name__ == "__main__":  # python -m tokenweave.tune; spawned ranks re-import this module and skip this
    from tokenweave.tune import main as _main  # the importable module's functions and Plan pickle by their name

    _main()
