"""An emulated world: W tokenweave ranks on one GPU.

Each emulated rank owns a workspace, device state and error record of its own, exactly like a rank of a
real process group, and its peer table points at the other ranks' workspaces on the same device. Rank
r's calls run on stream r; the W kernels of one collective run side by side and talk through the same
flags, slots and Lamport buffers as on W GPUs, so every algorithm's protocol (one-shot, two-shot,
Lamport, lean and lean_pull with a replicated or a sharded residual), its failure modes and its per-CTA throughput
can be tested and measured without a multi-GPU machine. What it cannot show is the NVLink itself: peer
stores (and lean_pull's peer loads) land in local HBM.

A whole model runs here too, with care: no rank's host may block while another rank's kernels spin waiting for
it. Our reading, not isolated: a first use of a library handle or plan (cuBLAS, cuDNN) in a thread can synchronise
the context, which waits for those kernels. Issued rank by rank from one thread, the reference TP Llama deadlocked in its first collective call
(bench/results/logs/device_run_21_h200x1_lean_pull.txt). It runs when each rank issues from one persistent thread
of its own, after a warm-up forward with a local stand-in for the collective, with SDPA off cuDNN
(tests/gpu/test_emulated_gpu.py::test_llama_stack_on_symmetric_rows_runs_lean_pull_with_a_sharded_residual).

The W grids must be resident at once (every rank's CTAs wait for its peers' CTAs): the dispatcher of an
emulated rank uses at most ``SMs // W`` CTAs, and an explicit ``ctas`` must keep ``W * ctas <= SMs``. And no rank's
kernel may be ordered behind another's: every fork from the caller's stream is recorded before any rank's work
(``on_rank_streams`` says why).

Example
-------
>>> world = EmulatedWorld(4, max_tokens=1024, hidden=4096)
>>> outs = world.run(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], w))
>>> graphs = world.capture(lambda comm, r: tw.fused_allreduce_rmsnorm(comm, xs[r], res[r], w))  # one per rank
>>> graphs.replay()
>>> world.close()
"""
from __future__ import annotations

from types import SimpleNamespace
from typing import Callable, Sequence

import torch

from tokenweave import env
from tokenweave._ext import _C
from tokenweave.comm import Communicator, fill_lamport_sentinel

_P2P = 0  # transport code (comm.py _TRANSPORT_CODE["p2p"])


class EmulatedRank(Communicator):
    """One rank of an :class:`EmulatedWorld`: a Communicator whose peers are on the same GPU.

    Built by :class:`EmulatedWorld`, never directly. Works with every tokenweave op.
    """

    def __init__(self, world: "EmulatedWorld", rank: int, workspace: torch.Tensor, peer_ptrs: Sequence[int]):
        # No process group: the fields Communicator's per-call methods use, set directly.
        self.group = None
        self.rank = rank
        self.world_size = world.world_size
        self.backend = "emulated"
        self.device = world.device
        self.capacity_bytes = world.capacity_bytes
        self.timeout_ms = world.timeout_ms
        self.transport, self.transport_reason = "p2p", "emulated world (W ranks on one GPU)"
        self._closed = False
        self._error = None
        self._plans = {}
        self._tracker = None
        self._last_stream = None
        self._last_raw_stream = None
        self._symm_allocs = []
        self._layout = world.layout
        # Co-residency of the W grids: each rank gets its share of the SMs.
        self._num_sms = world.num_sms // world.world_size
        self._buffer = SimpleNamespace(tensor=workspace)
        self._state = torch.zeros(int(_C.STATE_WORDS), dtype=torch.int32, device=self.device)
        self._err = torch.zeros(8, dtype=torch.int64).pin_memory()
        self._err_view = self._err.numpy()
        self._id = _C.comm_create(self.device.index, rank, self.world_size, list(peer_ptrs), 0, self._state.data_ptr(),
                                  self._err.data_ptr(), self.capacity_bytes, self.timeout_ms * 1_000_000, _P2P)

    def close(self):
        if self._closed:
            return
        if self._id is not None:
            _C.comm_destroy(self._id)
            self._id = None
        self._closed = True


class EmulatedWorld:
    """W tokenweave ranks on one CUDA device, for tests and per-CTA measurements.

    Parameters
    ----------
    world_size : int
        2..8 emulated ranks.
    max_tokens, hidden, dtype
        Size every rank's workspace, as for :class:`tokenweave.Communicator`.
    device : torch.device or int, optional
        Default: the current CUDA device.
    timeout_ms : int, optional
        Bound of every wait (default ``TOKENWEAVE_TIMEOUT_MS`` or 30 s); tests of failures use a short one.
    """

    def __init__(self, world_size: int, max_tokens: int = 1024, hidden: int = 4096, dtype=torch.bfloat16,
                 device=None, timeout_ms: int | None = None):
        if _C is None:
            raise RuntimeError("tokenweave.testing.EmulatedWorld needs the CUDA extension (tokenweave.HAS_EXTENSION)")
        if not 2 <= world_size <= int(_C.MAX_WORLD):
            raise ValueError(f"EmulatedWorld: world_size={world_size}; use 2..{int(_C.MAX_WORLD)}")
        self.world_size = world_size
        device = torch.cuda.current_device() if device is None else device
        self.device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        self.capacity_bytes = int(max_tokens) * int(hidden) * torch.empty((), dtype=dtype).element_size()
        self.timeout_ms = int(timeout_ms) if timeout_ms is not None else env.timeout_ms()
        self.num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.layout = _C.layout(self.capacity_bytes, world_size)
        self.workspaces = [_new_workspace(self.layout, self.device) for _ in range(world_size)]
        peer_ptrs = [ws.data_ptr() for ws in self.workspaces]
        self.ranks = [EmulatedRank(self, r, ws, peer_ptrs) for r, ws in enumerate(self.workspaces)]
        self.streams = [torch.cuda.Stream(self.device) for _ in range(world_size)]
        self._allocations: list[list[torch.Tensor]] = []

    def empty(self, *shape, dtype=torch.bfloat16) -> list[torch.Tensor]:
        """One symmetric tensor per rank (what ``Communicator.empty`` gives each rank of a real group)."""
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = max(16, numel * torch.empty((), dtype=dtype).element_size())
        bufs = [torch.empty(nbytes + 16, dtype=torch.uint8, device=self.device) for _ in range(self.world_size)]
        peers = [b.data_ptr() for b in bufs]
        for comm in self.ranks:
            _C.comm_register(comm._id, peers[comm.rank], nbytes, peers, 0)
            comm._symm_allocs.append(SimpleNamespace(tensor=bufs[comm.rank]))
        self._allocations.append(bufs)
        return [b[:numel * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape) for b in bufs]

    def run(self, fn: Callable[[EmulatedRank, int], object], ranks: Sequence[int] | None = None) -> list:
        """Call ``fn(comm, rank)`` for every rank (or those in ``ranks``), rank r on stream r.

        Every rank's work is enqueued before any of it is waited for; the current stream then waits for
        all of them. CUDA-graph capturable (the streams fork from and join the capturing stream).
        """
        ranks = range(self.world_size) if ranks is None else ranks
        results = [None] * self.world_size
        for r, result in self.on_rank_streams(ranks, lambda r: fn(self.ranks[r], r)).items():
            results[r] = result
        return results

    def on_rank_streams(self, ranks: Sequence[int], body: Callable[[int], object]) -> dict:
        """``body(r)`` with stream r current, for each rank r in ``ranks``, forked from and joined to the current
        stream; returns ``{r: body(r)}``.

        Every fork is recorded before any rank's work is enqueued. torch hands out its streams round-robin from a
        pool of 32, so the current stream may be one of the rank streams; a fork recorded after rank r's kernels
        would make the later ranks wait for kernels that wait for them: a deadlock until the timeout, which is
        what the harness's per-variant side stream hit once the pool wrapped (docs/PERFORMANCE.md, "Emulated
        world and CUDA graphs").
        """
        current = torch.cuda.current_stream(self.device)
        for r in ranks:
            self.streams[r].wait_stream(current)
        out = {}
        for r in ranks:
            with torch.cuda.stream(self.streams[r]):
                out[r] = body(r)
        for r in ranks:
            current.wait_stream(self.streams[r])
        return out

    def capture(self, fn: Callable[[EmulatedRank, int], object], ranks: Sequence[int] | None = None) -> "RankGraphs":
        """Capture ``fn(comm, rank)`` into one CUDA graph per rank, as each process of a real group would;
        :meth:`RankGraphs.replay` launches them on the rank streams. (One graph captured around :meth:`run`
        works too: the ranks are its branches.)
        """
        ranks = list(range(self.world_size) if ranks is None else ranks)

        def one(r):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=self.streams[r]):
                fn(self.ranks[r], r)
            return g
        return RankGraphs(self, self.on_rank_streams(ranks, one))

    def error_report(self) -> str:
        """Every rank's error record and device state, one line each (what a timeout needs to be read)."""
        lines = []
        for comm in self.ranks:
            code, rank, peer, epoch, chunk = (int(v) for v in comm._err_view[:5])
            st = comm._state[:5].tolist()
            what = (f"code {code}: waited for rank {peer} at call #{epoch}, chunk {chunk}" if code else "no error")
            lines.append(f"rank {comm.rank}: {what}; state epoch={st[0]} ticket={st[1]} claimed={st[2]} "
                         f"abort={st[3]} lamport_seq={st[4]}")
        return "\n".join(lines + self._lamport_report())

    def _lamport_report(self) -> list[str]:
        """Per rank, Lamport buffer and region S: each slot's header (seq it carries, or "-" for the sentinel) and
        how many of the previous call's data vectors in it are not the sentinel (arrived and not re-armed)."""
        W, l = self.world_size, self.layout
        slot, off = int(l["lamport_slot_bytes"]), int(l["lamport_off"])
        lines = []
        for comm, ws in zip(self.ranks, self.workspaces):
            vecs = comm._state[5:8].tolist()  # LocalState.lamport_vecs (types.h)
            cells = []
            for b in range(3):
                used = int(vecs[b]) & 0x7fffffff  # minus the region-G flag bit (kLamportUsedG)
                heads = []
                for s in range(W):
                    base = off + ((b * 2 + 0) * W + s) * slot
                    lanes = ws[base: base + 16].view(torch.int16).tolist()
                    if any(v == -32768 for v in lanes):
                        heads.append("-")
                        continue
                    seq = sum((lanes[4 + i] & 0xff) << (8 * i) for i in range(4))
                    data = ws[base + 16: base + 16 + 16 * min(used, 4096)].view(torch.int16)
                    heads.append(f"{seq}:{int((data != -32768).sum().item()) // 8}")
                cells.append(f"buf{b}(vecs {used}) [{' '.join(heads)}]")
            lines.append(f"rank {comm.rank} Lamport region S, slot header seq:vectors arrived: {'; '.join(cells)}")
        return lines

    def synchronize(self):
        """Wait for every rank's work, then raise the first error a rank's kernels recorded, with every
        rank's record appended (which ranks waited, for whom, and how far each got)."""
        torch.cuda.synchronize(self.device)
        for comm in self.ranks:
            try:
                comm.check()
            except Exception as e:
                e.args = (f"{e.args[0] if e.args else e}\nemulated world, every rank:\n{self.error_report()}",
                          *e.args[1:])
                raise

    def close(self):
        torch.cuda.synchronize(self.device)
        for comm in self.ranks:
            comm.close()
        self._allocations.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class RankGraphs:
    """The per-rank CUDA graphs of :meth:`EmulatedWorld.capture`; :meth:`replay` launches all of them."""

    def __init__(self, world: EmulatedWorld, graphs: dict):
        self.world, self.graphs = world, graphs

    def replay(self):
        """Replay every rank's graph on its rank stream, forked from and joined to the current stream."""
        self.world.on_rank_streams(list(self.graphs), lambda r: self.graphs[r].replay())

    def reset(self):
        for g in self.graphs.values():
            g.reset()


def _new_workspace(layout: dict, device: torch.device) -> torch.Tensor:
    ws = torch.zeros(int(layout["total_bytes"]), dtype=torch.uint8, device=device)
    fill_lamport_sentinel(ws, layout)
    return ws
