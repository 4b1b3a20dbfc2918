"""Wave-aware token splitting and its on-disk tuner.

TokenWeave overlaps the fused all-reduce + RMSNorm of one part of the tokens with the attention or
MLP of the other part. Where to split matters because every GEMM of a part runs in *waves* of
output tiles over the SMs: a part whose last wave is nearly empty wastes most of a wave, and that
waste is paid twice (once per part) instead of once for the unsplit batch.

This module

* derives split candidates from the SM count and the GEMM tile shapes (:func:`split_candidates`),
  restricted to sequence boundaries when attention cannot cross a split;
* keeps a policy (:class:`SplitPolicy`) that answers "where do I split T tokens?" without timing
  anything, from a per-(device, TP, hidden, token bucket) choice cached on disk;
* tunes that choice in seconds (:meth:`SplitPolicy.tune`): a handful of candidates, plus "no split"
  (so the token threshold below which only fusion pays is *measured*), plus the CTA count of the
  communication kernel, plus (where SM partitions exist) the number of SMs reserved for communication
  against "no partition" (:mod:`tokenweave.partition`), each timed once and agreed on by every rank.

Nothing here knows about models or streams; the caller provides a ``time_fn(Split) -> us``.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

from tokenweave.comm import all_ranks_true, max_across_ranks

# cuBLAS / CUTLASS on Hopper mostly picks 128-row tiles with 128 or 256 columns for bf16 prefill
# GEMMs; the cost model averages the two instead of guessing which one a given shape gets.
DEFAULT_TILE_SHAPES: tuple[tuple[int, int], ...] = ((128, 256), (128, 128))
# Below this many tokens the untuned policy does not split (TokenWeave: overlap pays from ~1024).
# A tuned bucket replaces this with a measurement.
DEFAULT_MIN_SPLIT_TOKENS = 1024
# Buckets smaller than this are never tuned nor split: each part would be under one 128-row tile
# per GEMM and two launches cost more than any overlap can hide.
MIN_TUNABLE_TOKENS = 256
# CTAs of the communication kernel while it overlaps compute. ANCHORS: remote writes saturate
# NVLink with ~8 CTAs, reads need ~32; 16 hid the most at 8192 tokens.
DEFAULT_OVERLAP_CTAS = 16
OVERLAP_CTAS_CHOICES = (8, 16, 32)
CACHE_FILE_NAME = "split_tuning.json"
CACHE_VERSION = 1


@dataclass(frozen=True)
class GemmShape:
    """One GEMM of a layer, per rank: ``[M, k] @ [k, n]`` with M the token count."""

    n: int
    k: int


@dataclass(frozen=True)
class Split:
    """How ``tokens`` rows are divided: part A is ``[0, point)``, part B is ``[point, tokens)``.

    ``point is None`` means no split (fuse only). ``ctas`` is the CTA count for the communication
    kernel while it overlaps compute (``None``: the dispatcher's default). ``comm_sms`` is the number of
    SMs reserved for communication (an SM partition, :mod:`tokenweave.partition`); ``None``: no partition.
    """

    tokens: int
    point: int | None = None
    ctas: int | None = None
    comm_sms: int | None = None

    def __post_init__(self):
        if self.point is not None and not 0 < self.point < self.tokens:
            raise ValueError(f"Split: point {self.point} must lie strictly inside (0, {self.tokens})")
        if self.comm_sms is not None and self.comm_sms < 1:
            raise ValueError(f"Split: comm_sms {self.comm_sms} must be a positive number of SMs or None")

    @property
    def is_split(self) -> bool:
        return self.point is not None

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """Row ranges ``[(start, stop), ...]`` of the parts, in order; one range when not split."""
        if self.point is None:
            return [(0, self.tokens)]
        return [(0, self.point), (self.point, self.tokens)]


# --------------------------------------------------------------------------- wave model
def gemm_wave_cost(rows: int, gemms: Iterable[GemmShape], sm_count: int,
                   tile_shapes: Sequence[tuple[int, int]] = DEFAULT_TILE_SHAPES) -> float:
    """Modelled time of a layer's GEMMs on ``rows`` tokens, counting whole waves.

    Each GEMM of ``rows x n`` output in ``tm x tn`` tiles runs ``ceil(tiles / sm_count)`` waves,
    each as long as one tile's work ``tm * tn * k``; the result is averaged over ``tile_shapes``.
    Units are multiply-adds per SM, comparable across ``rows`` for the same layer.
    """
    if rows <= 0:
        return 0.0
    total = 0.0
    for tm, tn in tile_shapes:
        for g in gemms:
            tiles = math.ceil(rows / tm) * math.ceil(g.n / tn)
            total += math.ceil(tiles / sm_count) * tm * tn * g.k
    return total / len(tile_shapes)


def split_candidates(tokens: int, gemms: Sequence[GemmShape], sm_count: int, *,
                     boundaries: Sequence[int] | None = None, granule: int | None = None,
                     tile_shapes: Sequence[tuple[int, int]] = DEFAULT_TILE_SHAPES,
                     max_candidates: int = 3) -> list[int]:
    """Split points for ``tokens`` rows, best first by the wave model.

    Parameters
    ----------
    tokens : int
    gemms : sequence of GemmShape
        The layer's GEMMs per rank (e.g. QKV, O, gate_up, down).
    sm_count : int
        SMs of the device (132 on H100 SXM / H200).
    boundaries : sequence of int, optional
        Allowed split points (e.g. sequence starts) when attention cannot cross a split. Only
        those leaving each part between a quarter and three quarters of the tokens count: a smaller
        part has too little compute to hide the other's communication. Default: any multiple of
        ``granule``.
    granule : int, optional
        Spacing of free split points; defaults to the tile height (128), so that no part ends in a
        partly filled tile row other than the batch's own last one.
    tile_shapes : sequence of (int, int)
    max_candidates : int

    Returns
    -------
    list of int
        Up to ``max_candidates`` distinct points, ordered by modelled GEMM time of both parts
        (fewest total waves), ties broken by balance (closest to ``tokens / 2``). Free points are
        searched within ``tokens / 2 +- max(2 granules, tokens / 8)``: the overlap needs parts of
        similar length. Empty when no point is allowed.
    """
    if granule is None:
        granule = min(tm for tm, _ in tile_shapes)
    half = tokens / 2
    if boundaries is None:
        window = max(2 * granule, tokens // 8)
        lo = max(granule, math.floor((half - window) / granule) * granule)
        hi = min(tokens - 1, half + window)
        points = list(range(lo, int(hi) + 1, granule))
    else:
        lo, hi = tokens / 4, tokens * 3 / 4
        points = sorted({int(b) for b in boundaries if lo <= int(b) <= hi and 0 < int(b) < tokens})

    def score(p):
        both = gemm_wave_cost(p, gemms, sm_count, tile_shapes) + gemm_wave_cost(tokens - p, gemms, sm_count,
                                                                               tile_shapes)
        return both, abs(p - half)

    return sorted(points, key=score)[:max_candidates]


def published_split_point(tokens: int, offset: int = 0) -> int:
    """The published TokenWeave rule: half of ``tokens`` rounded to 256, plus ``offset`` (0/128/256)."""
    return int(round(tokens / 2 / 256)) * 256 + offset


def token_bucket(tokens: int) -> int:
    """The power of two at or above ``tokens``: the granularity at which tuning is cached."""
    if tokens < 1:
        raise ValueError(f"token_bucket: tokens must be >= 1, got {tokens}")
    return 1 << (tokens - 1).bit_length()


# --------------------------------------------------------------------------- cache on disk
def cache_dir(environ: Mapping[str, str] = os.environ) -> str:
    """``$TOKENWEAVE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tokenweave``, else ``~/.cache/tokenweave``."""
    if environ.get("TOKENWEAVE_CACHE_DIR"):
        return environ["TOKENWEAVE_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tokenweave")


class TuningCache:
    """A JSON file of tuned choices, keyed by strings; written atomically (rename).

    A missing, unreadable or foreign-version file reads as empty (with a warning for the latter two)
    so that a bad cache costs a re-tune, never a crash.
    """

    def __init__(self, path: str | None = None):
        self.path = path or os.path.join(cache_dir(), CACHE_FILE_NAME)

    def load(self) -> dict:
        try:
            with open(self.path) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            warnings.warn(f"tokenweave: ignoring unreadable split cache {self.path}: {e}", stacklevel=2)
            return {}
        if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
            warnings.warn(f"tokenweave: ignoring split cache {self.path} of another version", stacklevel=2)
            return {}
        return data.get("entries", {})

    def get(self, key: str) -> dict | None:
        return self.load().get(key)

    def put(self, key: str, entry: dict) -> None:
        entries = self.load()
        entries[key] = entry
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".split_tuning.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # readers see the old or the new file, never half of one
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise


# --------------------------------------------------------------------------- policy + tuner
@dataclass(frozen=True)
class TunedChoice:
    """What the tuner stored for one bucket.

    ``candidate`` is a rank in :func:`split_candidates`' list (so it transfers to every token count
    of the bucket), ``split`` False means "fuse only" was fastest. ``comm_sms`` is the SM partition that
    won (``None``: no partition was faster, or none was timed).
    """

    split: bool
    candidate: int = 0
    ctas: int = DEFAULT_OVERLAP_CTAS
    tuned_tokens: int = 0
    timings_us: dict | None = None
    comm_sms: int | None = None


class SplitPolicy:
    """Decides where to split; tuned choices come from a :class:`TuningCache`.

    Parameters
    ----------
    gemms : sequence of GemmShape
        The layer's GEMMs per rank.
    sm_count : int
    key_prefix : str
        Identifies device, TP size, transport, dtype, hidden size and model shape; the token bucket
        is appended. Build it with :func:`policy_key`.
    cache : TuningCache, optional
        Default: the file under :func:`cache_dir`. ``None`` entries are never written when
        ``persist`` is False.
    min_split_tokens : int
        Threshold used for buckets that were not tuned.
    granule : int, optional
    tile_shapes : sequence of (int, int)
    max_candidates : int
        Split points the tuner times per bucket.
    persist : bool
        Write tuned choices to the cache file.
    partition_choices : sequence of int
        Communication SM counts the tuner times against "no partition" (empty: partitions are not tried; see
        :func:`tokenweave.partition.tuner_choices`).
    """

    def __init__(self, gemms: Sequence[GemmShape], sm_count: int, key_prefix: str, *,
                 cache: TuningCache | None = None, min_split_tokens: int = DEFAULT_MIN_SPLIT_TOKENS,
                 granule: int | None = None, tile_shapes: Sequence[tuple[int, int]] = DEFAULT_TILE_SHAPES,
                 max_candidates: int = 3, persist: bool = True, partition_choices: Sequence[int] = ()):
        self.gemms = tuple(gemms)
        self.sm_count = int(sm_count)
        self.key_prefix = key_prefix
        self.cache = cache if cache is not None else TuningCache()
        self.min_split_tokens = int(min_split_tokens)
        self.granule = granule
        self.tile_shapes = tuple(tile_shapes)
        self.max_candidates = int(max_candidates)
        self.persist = persist
        self.partition_choices = tuple(int(c) for c in partition_choices)
        self._memo: dict[str, TunedChoice | None] = {}

    def key(self, tokens: int) -> str:
        return f"{self.key_prefix}/b{token_bucket(tokens)}"

    def candidates(self, tokens: int, boundaries: Sequence[int] | None = None) -> list[int]:
        return split_candidates(tokens, self.gemms, self.sm_count, boundaries=boundaries, granule=self.granule,
                                tile_shapes=self.tile_shapes, max_candidates=self.max_candidates)

    def tuned(self, tokens: int) -> TunedChoice | None:
        """The cached choice for the bucket of ``tokens``, or None (read once, then memoised)."""
        key = self.key(tokens)
        if key not in self._memo:
            entry = self.cache.get(key)
            self._memo[key] = _choice_from_entry(entry)
        return self._memo[key]

    def choose(self, tokens: int, boundaries: Sequence[int] | None = None) -> Split:
        """Where to split ``tokens`` rows (no timing, no communication; same answer on every rank
        provided the ranks see the same cache file)."""
        if tokens < MIN_TUNABLE_TOKENS:
            return Split(tokens)
        choice = self.tuned(tokens)
        if choice is None:
            if tokens < self.min_split_tokens:
                return Split(tokens)
            choice = TunedChoice(split=True)
        if not choice.split:
            return Split(tokens)
        points = self.candidates(tokens, boundaries)
        if not points:
            return Split(tokens)
        return Split(tokens, points[min(choice.candidate, len(points) - 1)], choice.ctas, choice.comm_sms)

    def tune(self, tokens: int, time_fn: Callable[[Split], float], *, boundaries: Sequence[int] | None = None,
             group=None, device=None, ctas_choices: Sequence[int] = OVERLAP_CTAS_CHOICES,
             partition_choices: Sequence[int] | None = None, partition_ok: Callable[[int], bool] | None = None,
             force: bool = False) -> Split:
        """Time a few splits of ``tokens`` rows, cache the fastest for its bucket, return it.

        Collective over ``group`` when torch.distributed is initialised: every rank must call it
        with the same arguments. Timings are reduced with MAX across ranks, so every rank picks the
        same choice (and the slowest rank, which sets the pace, decides).

        Order: the wave-model candidates at the default CTA count, then the CTA choices for the
        best point, then each SM partition for the best point and CTA count (the kernel's CTAs capped to
        the partition's SMs by the schedule), then no split. That is ``max_candidates + len(ctas_choices)
        + len(partition_choices)`` timings at most.

        Parameters
        ----------
        tokens : int
        time_fn : callable
            ``time_fn(split) -> microseconds``; must run the same collective work on every rank.
        boundaries : sequence of int, optional
            As in :func:`split_candidates`.
        group : ProcessGroup, optional
        device : torch.device, optional
            Where the reduction tensor lives (CUDA for NCCL groups, CPU for gloo).
        ctas_choices : sequence of int
        partition_choices : sequence of int, optional
            Default: the policy's ``partition_choices``. Must be the same list on every rank.
        partition_ok : callable, optional
            ``partition_ok(comm_sms) -> bool``: whether this rank can make that partition; one that any rank
            cannot make is skipped on all of them (default: all can).
        force : bool
            Re-tune even when the bucket is cached.
        """
        distributed = dist.is_available() and dist.is_initialized()
        if not force and all_ranks_true(self.tuned(tokens) is not None, group, device):
            return self.choose(tokens, boundaries)
        points = self.candidates(tokens, boundaries) if tokens >= MIN_TUNABLE_TOKENS else []
        if not points:  # nothing to choose between (and nothing worth caching for the bucket)
            return Split(tokens)
        timings: dict[str, float] = {}

        def measure(label, split):
            us = time_fn(split)
            timings[label] = max_across_ranks(float(us), group, device)
            return timings[label]

        best_rank, best_us = 0, math.inf
        for rank, point in enumerate(points):
            us = measure(f"point={point},ctas={DEFAULT_OVERLAP_CTAS}", Split(tokens, point, DEFAULT_OVERLAP_CTAS))
            if us < best_us:
                best_rank, best_us = rank, us
        best_ctas = DEFAULT_OVERLAP_CTAS
        for ctas in ctas_choices:
            if ctas == DEFAULT_OVERLAP_CTAS:
                continue
            us = measure(f"point={points[best_rank]},ctas={ctas}", Split(tokens, points[best_rank], ctas))
            if us < best_us:
                best_ctas, best_us = ctas, us
        best_comm_sms = None
        point = points[best_rank]
        for comm_sms in self.partition_choices if partition_choices is None else partition_choices:
            ok = partition_ok is None or bool(partition_ok(int(comm_sms)))
            if not all_ranks_true(ok, group, device):
                continue
            us = measure(f"point={point},ctas={best_ctas},comm_sms={comm_sms}",
                         Split(tokens, point, best_ctas, int(comm_sms)))
            if us < best_us:
                best_comm_sms, best_us = int(comm_sms), us
        unsplit_us = measure("no_split", Split(tokens))
        choice = TunedChoice(split=best_us < unsplit_us, candidate=best_rank, ctas=best_ctas, tuned_tokens=tokens,
                             timings_us=timings, comm_sms=best_comm_sms)
        key = self.key(tokens)
        self._memo[key] = choice
        if self.persist and _is_rank_zero(distributed, group):
            self.cache.put(key, asdict(choice))
        return self.choose(tokens, boundaries)


def policy_key(*, device_name: str, sm_count: int, world_size: int, transport: str, dtype: torch.dtype,
               hidden: int, model: str) -> str:
    """The cache key prefix: everything that changes which split is fastest, except the tokens."""
    dtype_name = str(dtype).replace("torch.", "")
    return f"{device_name}/sm{sm_count}/tp{world_size}/{transport}/{dtype_name}/h{hidden}/{model}"


def device_sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; 1 on CPU (there the wave model reduces to balancing the parts)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("/", "_").replace(" ", "_")
    return "cpu"


def time_call_us(fn, device: torch.device, warmup: int = 2, iters: int = 5) -> float:
    """Median wall time of ``fn()`` in microseconds (CUDA events on CUDA devices): for the tuner."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return times[len(times) // 2]


def _choice_from_entry(entry) -> TunedChoice | None:
    if not isinstance(entry, dict):
        return None
    try:
        return TunedChoice(**entry)
    except TypeError:  # written by another version of the fields: treat as untuned
        return None


def _is_rank_zero(distributed: bool, group) -> bool:
    return not distributed or dist.get_rank(group) == 0
