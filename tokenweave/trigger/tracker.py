"""The Tracker: progress counters, streams and first-call state of one producer/consumer pair."""
from __future__ import annotations

import torch

from tokenweave import _abi


class Tracker:
    """Progress counters, streams and warm-up state of one producer/consumer pair, on one GPU.

    Parameters
    ----------
    device : torch.device
        The GPU the producer and the consumer run on.

    Notes
    -----
    One Tracker serves one sequence of calls at a time (calls on it are ordered by the compute stream).
    Make one per layer position and reuse it; CUDA graphs need it to outlive the graph.
    """

    def __init__(self, device):
        device = torch.device(device)
        max_chunks = _abi.MAX_CHUNKS
        self.ready = torch.zeros(max_chunks, dtype=torch.int32, device=device)       # per chunk, only grows
        self.consumed = torch.zeros_like(self.ready)                                 # the SM consumer's copy
        self.group_ready = torch.zeros_like(self.ready)                              # copy engine: re-armed to 0
        self.go = torch.zeros(1, dtype=torch.int32, device=device)                   # copy engine handshake
        self.ones = torch.ones(max_chunks, dtype=torch.int32, device=device)         # the staged flags' value
        on_gpu = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device, priority=-1) if on_gpu else None
        self.copy_stream = torch.cuda.Stream(device=device, priority=-1) if on_gpu else None
        self.broken = False  # a failed copy-engine enqueue may leave `go`/group counters armed
        self._warm: set = set()

    def is_warm(self, key) -> bool:
        """Whether a call of this shape (``TriggerPlan.warm_key``) already ran once on this Tracker, so every
        kernel it launches is loaded (see the package docstring, "Forward progress")."""
        return key in self._warm

    def mark_warm(self, key) -> None:
        self._warm.add(key)
