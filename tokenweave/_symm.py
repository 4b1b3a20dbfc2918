"""Adapter over torch.distributed._symmetric_memory: the one place that knows its API differences.

Seen: torch 2.11 (GPU image) and 2.13 both offer ``empty(*size, dtype=, device=)`` and
``rendezvous(tensor, group)``; older releases also need ``enable_symm_mem_for_group(group_name)``
first. The handle has ``buffer_ptrs`` and ``multicast_ptr`` (0 when multicast is off or unsupported).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class SymmetricBuffer:
    tensor: torch.Tensor  # this rank's buffer (uint8)
    handle: object        # keeps the mapping alive
    peer_ptrs: list[int]  # every rank's buffer, unicast, in rank order
    multicast_ptr: int    # 0 if none


def allocate(nbytes: int, device: torch.device, group: dist.ProcessGroup) -> SymmetricBuffer:
    """Collective: allocate ``nbytes`` of symmetric memory on every rank and map the peers' buffers."""
    from torch.distributed import _symmetric_memory as symm

    group_name = group.group_name
    enable = getattr(symm, "enable_symm_mem_for_group", None)
    if enable is not None:
        with warnings.catch_warnings():  # deprecated (a no-op) from torch 2.11 on; still needed before
            warnings.simplefilter("ignore", FutureWarning)
            try:
                if not symm.is_symm_mem_enabled_for_group(group_name):
                    enable(group_name)
            except (AttributeError, TypeError):
                enable(group_name)
    tensor = symm.empty(nbytes, dtype=torch.uint8, device=device)
    handle = symm.rendezvous(tensor, group_name)
    peer_ptrs = [int(p) for p in handle.buffer_ptrs]
    multicast_ptr = int(getattr(handle, "multicast_ptr", 0) or 0)
    return SymmetricBuffer(tensor, handle, peer_ptrs, multicast_ptr)
