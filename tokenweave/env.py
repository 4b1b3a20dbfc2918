"""Environment variables tokenweave reads, in one place.

Multicast (and so the ``multimem`` transport) is off when any of these is set to its "off" value:
``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``,
``TOKENWEAVE_DISABLE_MULTIMEM=1``. tokenweave only reads them; it never changes them.
"""
from __future__ import annotations

import os
from typing import Mapping

MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "TOKENWEAVE_DISABLE_MULTIMEM": "1",
}
TRANSPORTS = ("multimem", "p2p", "torch")
DEFAULT_TIMEOUT_MS = 30_000
SM_PARTITION_MODES = ("auto", "off")


def multicast_blockers(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Names of the variables that switch multicast off, as ``NAME=value``."""
    return [f"{k}={v}" for k, v in MULTICAST_OFF.items() if environ.get(k) == v]


def requested_transport(environ: Mapping[str, str] = os.environ) -> str | None:
    value = environ.get("TOKENWEAVE_TRANSPORT")
    if value is None or value == "":
        return None
    if value not in TRANSPORTS:
        raise ValueError(f"TOKENWEAVE_TRANSPORT={value!r}: use one of {', '.join(TRANSPORTS)} or leave it unset")
    return value


def experimental_lean_bulk(environ: Mapping[str, str] = os.environ) -> bool:
    """``TOKENWEAVE_EXPERIMENTAL_LEAN_BULK=1``: ``algo="lean_bulk"`` may be forced (docs/PERFORMANCE.md says why
    it is gated: slower than lean in every measured case, and one unexplained timeout in the emulated world)."""
    return environ.get("TOKENWEAVE_EXPERIMENTAL_LEAN_BULK") == "1"


def timeout_ms(environ: Mapping[str, str] = os.environ) -> int:
    value = environ.get("TOKENWEAVE_TIMEOUT_MS")
    if value is None or value == "":
        return DEFAULT_TIMEOUT_MS
    ms = int(value)
    if ms <= 0:
        raise ValueError(f"TOKENWEAVE_TIMEOUT_MS={value}: must be a positive number of milliseconds")
    return ms


def sm_partition(environ: Mapping[str, str] = os.environ) -> str | int:
    """``TOKENWEAVE_SM_PARTITION``: ``auto`` (default: the tuner's choice), ``off``, or a number of SMs for
    communication (see :mod:`tokenweave.partition`)."""
    value = environ.get("TOKENWEAVE_SM_PARTITION")
    if value is None or value == "":
        return "auto"
    return parse_sm_partition(value, "TOKENWEAVE_SM_PARTITION")


def parse_sm_partition(value, what: str = "sm_partition") -> str | int:
    """``"auto"``, ``"off"`` or a positive int (also given as a string of digits); else ValueError naming ``what``."""
    if isinstance(value, str) and value.strip().lower() in SM_PARTITION_MODES:
        return value.strip().lower()
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    raise ValueError(f"{what}={value!r}: use 'auto' (the tuner decides), 'off', or a positive number of SMs for "
                     "communication")
