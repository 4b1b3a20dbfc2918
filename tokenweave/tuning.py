"""Measured dispatch decisions as data: per-GPU JSON files, not constants in code.

``tokenweave/configs/<card>.json`` (shipped) and the file named by ``TOKENWEAVE_CONFIG`` (the user's own,
searched first) hold entries keyed by world size (and optionally dtype size and hidden); each entry names
the run it came from. Where no entry matches, :data:`HEURISTIC` applies: the documented fallback.

Fields of an entry (all optional; missing ones come from the heuristic):

``one_shot_max_bytes``   largest x (bytes per rank) for which the flagged one-shot beats the two-shot
``lamport_max_bytes``    largest x for the flag-free Lamport one-shot (0: never; 2-byte dtypes only)
``lean``                 whether the lean two-shot is used where out/residual are symmetric
``bytes_per_cta``        CTAs = ceil(bytes / bytes_per_cta), capped at the SM count
``pipeline_from_bytes``  from this size each CTA pipelines ``chunks_per_cta`` chunks
``chunks_per_cta``
"""
from __future__ import annotations

import functools
import json
import os
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
    source: str = "heuristic"


# The fallback where no measured entry matches. One-shot pushes (W-1) x S per rank against two-shot's
# 2(W-1)/W x S, so its limit shrinks with W: 256 KiB is below every measured crossover (512 KiB at TP4,
# 8 MiB at TP2 on 4 x H200). One CTA moved ~40-50 GB/s in the flagged kernels, so one CTA per 16 KiB of x
# keeps every CTA busy for a few microseconds. The new algorithms stay off until measured on the card.
HEURISTIC = DispatchConfig(one_shot_max_bytes=256 << 10, lamport_max_bytes=0, lean=False, bytes_per_cta=16 << 10,
                           pipeline_from_bytes=8 << 20, chunks_per_cta=4)


def device_slug(device: torch.device | int | None = None) -> str:
    """Short lower-case card name used in config and result file names: 'NVIDIA H200' -> 'h200'."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    return name.split()[0] if name else "gpu"


def _entries(path: Path) -> list[dict]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    return [dict(e, _file=str(path)) for e in doc.get("entries", [])]


@functools.lru_cache(maxsize=None)
def _all_entries(card: str, user_file: str | None) -> tuple:
    found = []
    if user_file:
        found += [e for e in _entries(Path(user_file)) if e.get("device", card) == card]
    found += _entries(CONFIG_DIR / f"{card}.json")
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
