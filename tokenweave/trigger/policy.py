"""Which path a call takes: sequential or overlapped, and with which producer and consumer.

Nothing measured lives here: the decisions (where ``mode="auto"`` overlaps, the default consumer, the stream
consumer's row groups) are entries of the per-card configs, read through
:func:`tokenweave.tuning.trigger_config`, with :data:`tokenweave.tuning.TRIGGER_HEURISTIC` where no entry
matches. This module applies them and checks what the caller asked for.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenweave import tuning
from tokenweave.tuning import TriggerConfig

MODES = ("auto", "sequential", "trigger")
PRODUCERS = ("cublas", "triton")
CONSUMERS = ("sm", "copy_engine", "stream")
# An explicit groups=: more collectives than this would cost more in barriers than they hide.
MAX_GROUPS = 64
# CTAs of the spinning consumers (sm, copy_engine) without ctas=, and the SMs the producer leaves free for
# the stream consumer's calls; always capped at half the SMs (see the package docstring, "Forward progress").
DEFAULT_CONSUMER_CTAS = 32
# The kernels overlap 2-byte types only (the tracked feed takes bfloat16 / float16).
_OVERLAP_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Choice:
    """The path of one call: ``mode`` "sequential" (no roles) or "trigger" with its producer and consumer."""

    mode: str
    producer: str | None = None
    consumer: str | None = None


def can_trigger(transport: str, dtype: torch.dtype, is_cuda: bool) -> bool:
    """Whether the overlap can run at all: a device transport and bfloat16/float16 CUDA tensors."""
    return transport in ("p2p", "multimem") and dtype in _OVERLAP_DTYPES and is_cuda


def auto_roles(cfg: TriggerConfig, tokens: int) -> tuple[str, str] | None:
    """(producer, consumer) where the config says the overlap measured faster at ``tokens`` rows, else None.

    A Triton producer counts only where triton is installed (else the sequential path).
    """
    if cfg.auto_min_tokens is None or tokens < cfg.auto_min_tokens:
        return None
    if cfg.auto_producer == "triton":
        from tokenweave import producer_triton

        if not producer_triton.HAS_TRITON:
            return None
    return cfg.auto_producer, cfg.auto_consumer


def choose(op: str, mode: str, cfg: TriggerConfig | None, *, transport: str, dtype: torch.dtype, is_cuda: bool,
           tokens: int, producer: str | None = None, consumer: str | None = None) -> Choice:
    """The path of one call from its arguments and the shape's config (pure: no Communicator, no GPU).

    ``cfg`` may be None where the overlap cannot run (it is not consulted then). Explicit ``producer`` /
    ``consumer`` win over the config's; trigger mode's producer defaults to cuBLAS (always available).
    """
    if mode not in MODES:
        raise ValueError(f"tokenweave.{op}: mode={mode!r}; use one of {MODES}")
    possible = can_trigger(transport, dtype, is_cuda)
    if mode == "trigger" and not possible:
        raise ValueError(f"tokenweave.{op}: mode='trigger' needs the p2p or multimem transport and bfloat16/float16 "
                         f"CUDA tensors (transport is {transport!r}, dtype {dtype}); use mode='sequential'")
    if mode == "sequential" or not possible:
        return Choice("sequential")
    auto = auto_roles(cfg, tokens) if mode == "auto" else None
    if mode == "auto" and auto is None:
        return Choice("sequential")
    auto_producer, auto_consumer = auto or (None, None)
    return Choice("trigger", producer or auto_producer or "cublas", consumer or auto_consumer or cfg.default_consumer)


def config_for(comm, x: torch.Tensor, w: torch.Tensor) -> TriggerConfig:
    """The config entry (or the heuristic) for ``x @ w.T`` on ``comm``'s card, world size and transport."""
    return tuning.trigger_config(comm.card, comm.world_size, x.shape[1], w.shape[0], x.element_size(),
                                 comm.transport)


def choose_for(op: str, comm, mode: str, x: torch.Tensor, w: torch.Tensor, producer: str | None = None,
               consumer: str | None = None) -> tuple[Choice, TriggerConfig | None]:
    """:func:`choose` for a call on ``comm``; the config is looked up only where the overlap could run."""
    lookup = mode in ("auto", "trigger") and can_trigger(comm.transport, x.dtype, x.is_cuda)
    cfg = config_for(comm, x, w) if lookup else None
    return choose(op, mode, cfg, transport=comm.transport, dtype=x.dtype, is_cuda=x.is_cuda, tokens=x.shape[0],
                  producer=producer, consumer=consumer), cfg


def check_roles(op: str, transport: str, producer: str, consumer: str) -> None:
    """Raise ValueError for a producer or consumer that does not exist or cannot run here."""
    if producer not in PRODUCERS:
        raise ValueError(f"tokenweave.{op}: producer={producer!r}; use one of {PRODUCERS}")
    if consumer not in CONSUMERS:
        raise ValueError(f"tokenweave.{op}: consumer={consumer!r}; use one of {CONSUMERS}")
    if consumer == "copy_engine" and transport != "p2p":
        raise ValueError(f"tokenweave.{op}: consumer='copy_engine' needs the p2p transport (the copy engines write "
                         f"peers' unicast buffers); transport is {transport!r}: use consumer='sm'")
    if producer == "triton":
        from tokenweave import producer_triton

        if not producer_triton.HAS_TRITON:
            raise ValueError(f"tokenweave.{op}: producer='triton' needs the triton package; use producer='cublas'")


def stream_groups(rows: int, row_bytes: int, groups: int | None = None,
                  cfg: TriggerConfig = tuning.TRIGGER_HEURISTIC) -> tuple[int, int]:
    """(rows per group, groups) of consumer="stream": ``groups`` if given, else one per
    ``cfg.stream_group_bytes`` of output, 1..``cfg.stream_max_groups``; the last group holds the remainder."""
    n = groups or min(cfg.stream_max_groups, max(1, rows * row_bytes // cfg.stream_group_bytes))
    group_rows = -(-rows // min(n, rows))
    return group_rows, -(-rows // group_rows)
