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
        self._draw = (lambda: torch.cuda.Stream(device=device, priority=-1)) if on_gpu else None
        self.stream = self._draw() if on_gpu else None
        self.copy_stream = self._draw() if on_gpu else None
        self.broken = False  # a failed copy-engine enqueue may leave `go`/group counters armed
        self._warm: set = set()

    def keep_streams_apart(self, compute) -> None:
        """Make sure neither of this Tracker's streams is ``compute`` (the caller's stream) or the other one.

        torch hands out ``torch.cuda.Stream()`` round-robin from a pool of 32 per priority, so with enough
        Trackers (two streams each) or a caller that also draws from the high-priority pool, a Tracker's stream
        can BE the caller's: the consumer would then be enqueued ahead of its own producer on one stream (a
        timeout), or the copy stream's unbounded counter waits ahead of the GEMM that satisfies them (a hang).
        A stream that coincides is replaced by the pool's next one; the caller joins the old one every call.
        """
        if self._draw is None:
            return
        taken = {compute.cuda_stream}
        for name in ("stream", "copy_stream"):
            for _ in range(64):  # the pool's next streams differ from this one within 32 draws
                if getattr(self, name).cuda_stream not in taken:
                    break
                setattr(self, name, self._draw())
            taken.add(getattr(self, name).cuda_stream)

    def is_warm(self, key) -> bool:
        """Whether a call of this shape (``TriggerPlan.warm_key``) already ran once on this Tracker, so every
        kernel it launches is loaded (see the package docstring, "Forward progress")."""
        return key in self._warm

    def mark_warm(self, key) -> None:
        self._warm.add(key)
