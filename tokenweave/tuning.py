"""Measured dispatch decisions as data: per-GPU JSON files, not constants in code.

``tokenweave/configs/<card>.json`` (shipped) and the file named by ``TOKENWEAVE_CONFIG`` (the user's own,
searched first) hold entries keyed by world size (and optionally dtype size and hidden); each entry names
the run it came from. Where no entry matches, :data:`HEURISTIC` applies: the documented fallback.

Fields of an entry (all optional; missing ones come from the heuristic):

``one_shot_max_bytes``   largest x (bytes per rank) for which the flagged one-shot beats the two-shot
``lamport_max_bytes``    largest x for the flag-free Lamport one-shot (0: never; 2-byte dtypes only)
``lamport_two_shot_max_bytes``  largest x for the flag-free Lamport two-shot, tried after the one-shots (0: never;
                         2-byte dtypes, hidden <= 16384, a rank's shard of ceil(T / W) rows within a Lamport slot)
``lean``                 whether the lean two-shot is used where out/residual are symmetric
``lean_bulk``            where lean is used: its copy-warp variant (bulk copies) instead of the plain kernel
``lean_pull``            where lean is used and x is symmetric too: the variant that reads every rank's x in place
                         (no scatter) instead of the plain kernel
``bytes_per_cta``        CTAs = ceil(bytes / bytes_per_cta), capped at the SM count
``pipeline_from_bytes``  from this size each CTA pipelines ``chunks_per_cta`` chunks
``chunks_per_cta``

Track-and-trigger (:mod:`tokenweave.trigger`) has its own list, ``"trigger"``, in the same files: see
:class:`TriggerConfig` and :func:`trigger_config`. The ``"launch"`` list says whether kernels use programmatic
dependent launch on the card (:func:`programmatic_launch`); the ``"norm"`` list picks the standalone add +
RMSNorm kernel's block shape by size (:func:`norm_shape`).
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).with_name("configs")


@dataclass(frozen=True)
class DispatchConfig:
    one_shot_max_bytes: int
    lamport_max_bytes: int
    lean: bool
    bytes_per_cta: int
    pipeline_from_bytes: int
    chunks_per_cta: int
    lamport_two_shot_max_bytes: int = 0
    lean_bulk: bool = False
    lean_pull: bool = False
    source: str = "heuristic"


# The fallback where no measured entry matches. One-shot pushes (W-1) x S per rank against two-shot's
# 2(W-1)/W x S, so its limit shrinks with W: 256 KiB is below every measured crossover (512 KiB at TP4,
# 8 MiB at TP2 on 4 x H200). One CTA moved ~40-50 GB/s in the flagged kernels, so one CTA per 16 KiB of x
# keeps every CTA busy for a few microseconds. The new algorithms stay off until measured on the card.
HEURISTIC = DispatchConfig(one_shot_max_bytes=256 << 10, lamport_max_bytes=0, lean=False, bytes_per_cta=16 << 10,
                           pipeline_from_bytes=8 << 20, chunks_per_cta=4)


def device_slug(device: torch.device | int | None = None) -> str:
    """The card's short name in config and results file names ("h100", "h200", "gh200"; "cpu" without CUDA).

    'NVIDIA H200' -> 'h200', 'NVIDIA A100-SXM4-80GB' -> 'a100'; a name without a model number is lower-cased
    with dashes ('NVIDIA GeForce RTX 4090' -> 'geforce-rtx-4090').
    """
    if not torch.cuda.is_available():
        return "cpu"
    if isinstance(device, torch.device) and device.type != "cuda":
        return "cpu"
    return slug_of(torch.cuda.get_device_name(device))


def slug_of(name: str) -> str:
    """:func:`device_slug` of a device name string."""
    match = re.search(r"\b([A-Z]{1,3}\d{2,4}[A-Z]?)\b", name.upper())
    if match:
        return match.group(1).lower()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-") or "gpu"


def _entries(path: Path, section: str = "entries") -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [dict(e, _file=str(path)) for e in doc.get(section, [])]


@functools.lru_cache(maxsize=None)
def _all_entries(card: str, user_file: str | None, section: str = "entries") -> tuple:
    found = []
    if user_file:
        found += [e for e in _entries(Path(user_file), section) if e.get("device", card) == card]
    found += _entries(CONFIG_DIR / f"{card}.json", section)
    return tuple(json.dumps(e, sort_keys=True) for e in found)


def dispatch_config(card: str, world_size: int, itemsize: int, hidden: int) -> DispatchConfig:
    """The decisions for one call shape: the first matching entry (user file first), else the heuristic.

    An entry matches when its ``world_size`` equals and its optional ``itemsize`` / ``hidden`` equal.
    """
    known = {f.name for f in fields(DispatchConfig)}
    for text in _all_entries(card, os.environ.get("TOKENWEAVE_CONFIG") or None):
        e = json.loads(text)
        if e.get("world_size") != world_size or e.get("itemsize", itemsize) != itemsize:
            continue
        if e.get("hidden", hidden) != hidden:
            continue
        values = {k: v for k, v in e.items() if k in known and k != "source"}
        return replace(HEURISTIC, **values, source=f"{e['_file']}: {e.get('source', '?')}")
    return HEURISTIC


# ------------------------------------------------------------------------------------------- add + RMSNorm
def norm_shape(card: str, tokens: int, hidden: int, itemsize: int) -> int:
    """Block shape of the standalone add + RMSNorm kernel for one call (csrc/kernels/launch.cu kNormConfigs).

    The first file (user file first, then ``configs/<card>.json``) with a ``"norm"`` entry whose optional
    ``itemsize``, ``hidden`` and ``max_hidden`` admit the call decides every token count of that hidden alone: its
    first such entry whose optional ``min_tokens`` and ``max_tokens`` admit the call gives ``shape``; else 0, the
    kernel's own pick (a tune writes no entry where shape 0 won). Shapes that entries switch between for one hidden
    size must share their summation order (threads per row and element order), so that a row's result never depends
    on the batch it came in: a family of shapes with another order than shape 0 serves every token count of its
    hidden (tokenweave.tune), so a file that left some counts to shape 0 must not have them filled from another
    file's family.
    """
    return _norm_shape(card, tokens, hidden, itemsize, _user_file())


@functools.lru_cache(maxsize=4096)
def _norm_shape(card, tokens, hidden, itemsize, user_file) -> int:
    deciding = None  # the file whose entries speak for this hidden and dtype size
    for text in _all_entries(card, user_file, "norm"):
        e = json.loads(text)
        if e.get("itemsize", itemsize) != itemsize or e.get("hidden", hidden) != hidden:
            continue
        if hidden > e.get("max_hidden", hidden):
            continue
        deciding = deciding or e["_file"]
        if e["_file"] != deciding:
            break
        if e.get("min_tokens", 0) <= tokens <= e.get("max_tokens", tokens):
            return int(e["shape"])
    return 0


# ------------------------------------------------------------------------------------------------ launches
def programmatic_launch(card: str) -> tuple[bool, str]:
    """Whether kernels are launched with programmatic dependent launch (PDL) on this card, and why.

    ``TOKENWEAVE_PDL=0|1`` decides when set; else the ``"launch"`` section's ``programmatic`` (user file
    first, then ``configs/<card>.json``); else off (the heuristic: PDL only where a run measured it).
    """
    env = os.environ.get("TOKENWEAVE_PDL")
    if env in ("0", "1"):
        return env == "1", "TOKENWEAVE_PDL"
    for text in _all_entries(card, _user_file(), "launch"):
        e = json.loads(text)
        if "programmatic" in e:
            return bool(e["programmatic"]), f"{e['_file']}: {e.get('source', '?')}"
    return False, "heuristic"


# ------------------------------------------------------------------------------------------ track-and-trigger
@dataclass(frozen=True)
class TriggerConfig:
    """Track-and-trigger decisions for one card, world size and row-parallel GEMM shape (:mod:`tokenweave.trigger`).

    Attributes
    ----------
    auto_min_tokens : int or None
        ``mode="auto"`` overlaps the GEMM with its all-reduce from this many rows (M) on, with
        ``auto_producer`` and ``auto_consumer``; None: never (the sequential path: cuBLAS, then the fused op).
    auto_producer : {"cublas", "triton"}
    auto_consumer : {"sm", "copy_engine", "stream"}
    default_consumer : {"sm", "copy_engine", "stream"}
        The consumer of ``mode="trigger"`` without ``consumer=``.
    stream_group_bytes, stream_max_groups : int
        ``consumer="stream"`` without ``groups=``: one row group (one collective call) per
        ``stream_group_bytes`` of GEMM output, 1..``stream_max_groups`` groups.
    source : str
        Where the fields came from: ``"<file>: <the entry's source>"`` for each entry that set one, joined by
        ``"; "``, or ``"heuristic"``.
    """

    auto_min_tokens: int | None
    auto_producer: str
    auto_consumer: str
    default_consumer: str
    stream_group_bytes: int
    stream_max_groups: int
    source: str = "heuristic"


# The fallback for a card, world size or shape no entry covers (including every card without a config file).
# mode="auto" never overlaps there: across the 48 measured (card, world size, shape, M) points of
# bench/results/gemm_allreduce-{h100,h200}-tp{2,4}.json the best overlap beat the sequential path by more
# than 2% at one point (TP4 o_proj M = 16384 on 4 x H200, 1.07x) and took up to 1.64x as long elsewhere
# (TP4 down_proj M = 512 on 4 x H100), so a crossover measured on one card is not carried to another.
# mode="trigger" defaults to the stream consumer: with the cuBLAS producer it was the fastest of the three
# consumers at all 36 shapes where all three were measured (2 x H100, 2 x H200, 4 x H200), and it spins on no
# SMs while it waits. Stream groups: one per 16 MiB of output, at most 4 (each group is one collective with
# its own barriers and tail: 4 groups beat 8 at 11 of the 12 (layer, M >= 4096) points measured on 2 x H100
# and 2 x H200, and 16 lost at every point; configs/h100.json and h200.json cite the runs).
TRIGGER_HEURISTIC = TriggerConfig(auto_min_tokens=None, auto_producer="cublas", auto_consumer="stream",
                                  default_consumer="stream", stream_group_bytes=16 << 20, stream_max_groups=4)
# What a "trigger" entry may be keyed by (world_size is required; the others match any value when absent).
TRIGGER_KEYS = ("world_size", "K", "N", "itemsize", "transport")


def trigger_config(card: str, world_size: int, K: int, N: int, itemsize: int, transport: str) -> TriggerConfig:
    """The track-and-trigger decisions for ``y = x @ w.T`` (x [M, K], w [N, K]) on ``world_size`` ranks.

    Entries of the ``"trigger"`` list (user file first, then ``configs/<card>.json``, each in file order)
    match when their ``world_size`` equals and each of their optional ``K``, ``N``, ``itemsize`` and
    ``transport`` equals. Fields are decided one by one: the first matching entry that sets a field decides
    it (so an entry for one shape goes before the world size's general entry); fields no entry sets come
    from :data:`TRIGGER_HEURISTIC`. Called on every call of the trigger ops, so cached per shape, and
    ``TOKENWEAVE_CONFIG`` is read once: call :func:`clear_cache` after editing a config file or changing it.
    """
    return _trigger_config(card, world_size, K, N, itemsize, transport, _user_file())


@functools.lru_cache(maxsize=1)
def _user_file() -> str | None:
    return os.environ.get("TOKENWEAVE_CONFIG") or None


@functools.lru_cache(maxsize=4096)
def _trigger_config(card, world_size, K, N, itemsize, transport, user_file) -> TriggerConfig:
    wanted = {"world_size": world_size, "K": K, "N": N, "itemsize": itemsize, "transport": transport}
    settable = {f.name for f in fields(TriggerConfig)} - {"source"}
    values, sources = {}, []
    for text in _all_entries(card, user_file, "trigger"):
        e = json.loads(text)
        if e.get("world_size") != world_size or any(e.get(k, v) != v for k, v in wanted.items()):
            continue
        new = {k: v for k, v in e.items() if k in settable and k not in values}
        if new:
            values.update(new)
            sources.append(f"{e['_file']}: {e.get('source', '?')}")
    return replace(TRIGGER_HEURISTIC, **values, source="; ".join(sources)) if values else TRIGGER_HEURISTIC


def clear_cache() -> None:
    """Forget the parsed config files (after editing one, or changing ``TOKENWEAVE_CONFIG``'s file)."""
    _all_entries.cache_clear()
    _trigger_config.cache_clear()
    _norm_shape.cache_clear()
    _user_file.cache_clear()
