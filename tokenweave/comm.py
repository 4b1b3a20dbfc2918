"""Communicator: one object per process group owning tokenweave's workspace and state.

It owns the symmetric workspace (peer-mapped on every rank), this rank's device-side epoch and
abort words, the pinned error record the kernels write when they give up, and the choice of
transport. ``close()`` (collective) releases it; it is also a context manager.
"""
from __future__ import annotations

import math
import socket
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokenweave import _abi, env
from tokenweave._ext import HAS_EXTENSION, _C
from tokenweave.errors import (CollectiveMismatchError, CollectiveTimeoutError, CommunicatorClosedError,
                               TokenweaveError)

# The kernels' codes, from the extension where it is built (tokenweave/_abi.py).
_TRANSPORT_CODE = _abi.TRANSPORT_CODES
ALGOS = _abi.ALGO_CODES
_ERR_TIMEOUT, _ERR_MISMATCH, _ERR_PRODUCER_TIMEOUT = (_abi.ERROR_CODES[k] for k in ("timeout", "mismatch",
                                                                                   "producer_timeout"))
_OP_RESIDUAL, _OP_NORM = _abi.OP_BITS["residual"], _abi.OP_BITS["norm"]
_DTYPE_NAMES = {code: name for name, code in _abi.DTYPE_CODES.items()}
_ALGO_NAMES = {code: name for name, code in ALGOS.items()}
# The row-owning two-shots that write every rank's out themselves (out, a replicated residual: symmetric tensors).
_LEAN_ALGOS = ("lean", "lean_bulk", "lean_pull")
_PROBE_MAGIC = 0x7EAF << 48
# Row length the Lamport kernels take (2-byte types): kBlockThreads x kLamportVecs (lamport.cuh) x 8 lanes.
_LAMPORT_MAX_HIDDEN = _abi.ROW_THREADS * 4 * 8


def plan_transport(requested, *, device_is_cuda, has_extension, world_size, same_host, blockers):
    """Decide the transport before any memory is allocated.

    Returns ``(transport, reason)``; ``multimem`` is tentative: it still needs a multicast address
    from the rendezvous on every rank. Never returns ``multimem`` while a multicast blocker is set.
    """
    if requested == "multimem" and blockers:
        raise ValueError(f"transport 'multimem' was requested but multicast is disabled by {', '.join(blockers)}; "
                         "use transport='p2p' or leave it unset")
    if requested == "torch":
        return "torch", "requested"
    if world_size == 1:
        return "torch", "a single rank needs no transport (ops run locally)"
    why_not = None
    if not device_is_cuda:
        why_not = "the process group's device is not CUDA"
    elif not has_extension:
        why_not = ("tokenweave was installed without its CUDA extension (torch without CUDA, no nvcc, or an "
                   "isolated build: reinstall with pip install --no-build-isolation -e .)")
    elif world_size > 8:
        why_not = f"world size {world_size} exceeds the 8 ranks the kernels are built for"
    elif not same_host:
        why_not = "the ranks are on more than one host (P2P needs one NVLink domain)"
    if why_not:
        if requested in ("p2p", "multimem"):
            raise ValueError(f"transport {requested!r} was requested but {why_not}")
        return "torch", why_not
    if requested == "p2p":
        return "p2p", "requested"
    if blockers:
        return "p2p", f"multicast is disabled by {', '.join(blockers)}"
    return "multimem", "multicast allowed"


def max_across_ranks(value: float, group=None, device=None) -> float:
    """The largest ``value`` over the ranks of ``group`` (collective); ``value`` itself without a process group.

    ``device``: where the one-element reduction lives (the group's device: CUDA for NCCL, CPU for gloo).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return float(t.item())


def all_ranks_true(flag: bool, group=None, device=None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (collective); ``flag`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


def fill_lamport_sentinel(workspace: torch.Tensor, layout: dict) -> None:
    """Fill a workspace's Lamport buffers with the sentinel: -0.0 (0x8000) in every 2-byte lane.

    ``layout["lamport_bytes"]`` covers all of them: 3 buffers x 2 regions (pushed x; the Lamport two-shot's
    reduced rows) x world slots (csrc/include/tokenweave/types.h, Layout).
    """
    off, n = int(layout["lamport_off"]), int(layout["lamport_bytes"])
    workspace[off: off + n].view(torch.int16).fill_(-32768)


def shard_range(tokens: int, world_size: int, rank: int) -> tuple[int, int]:
    """``(first_row, n_rows)`` that ``rank`` owns under the lean algorithms: contiguous shards of ceil(T / W) rows."""
    shard = -(-int(tokens) // world_size)
    first = rank * shard
    return first, max(0, min(shard, int(tokens) - first))


def traffic_per_byte(algo: str, world_size: int, residual: str = "replicated") -> dict[str, float]:
    """SM-issued memory traffic per byte of x (per rank) of one fused call, counted from the kernels.

    ``residual``: ``"none"``, ``"replicated"`` (every rank holds all rows) or ``"sharded"`` (the lean algorithms
    and lamport_two_shot only).
    Returns local reads, remote (NVLink) reads, local writes and remote writes, and their total. Reads of slots
    that peers filled count as local reads; polling (Lamport) counts one extra read of every slot. Only
    ``lean_pull`` reads remotely (its owners read every rank's x in place).
    """
    W = world_size
    res = residual != "none"
    remote_reads = 0.0
    if residual == "sharded" and algo not in (*_LEAN_ALGOS, "lamport_two_shot"):
        raise ValueError(f"traffic_per_byte: a sharded residual exists only for algos 'lean', 'lean_bulk', "
                         f"'lean_pull' and 'lamport_two_shot', not {algo!r}")
    if algo in ("one_shot", "lamport"):
        # push: read x, my slot here + W-1 peers; finish: read W slots (+ residual), write out (+ residual)
        reads, local, remote = 1 + W + res, 1 + 1 + res, W - 1
        if algo == "lamport":  # poll every slot once more; re-fill the previous call's W slots with the sentinel
            reads, local = reads + W, local + W
    elif algo == "two_shot":
        # scatter: read x, stage my piece here; reduce: W pieces of 1/W (+ residual piece), push the sum to W-1
        # gather buffers and mine; epilogue: read the gather buffer, write out (+ residual)
        reads = 1 + 1 + res / W + 1
        local = 1 / W + 1 / W + 1 + res
        remote = 2 * (W - 1) / W
    elif algo in ("lean", "lean_bulk"):  # lean_bulk moves the same bytes (the scatter by bulk copies)
        # scatter: (W-1)/W of x to its owners; owner: W-1 staged pieces + my x piece (+ residual piece), out to
        # every rank (residual: mine only if sharded, else every rank too)
        reads = (W - 1) / W + (W - 1) / W + 1 / W + res / W
        local = 1 / W + res / W
        remote = (W - 1) / W + (W - 1) / W + (W - 1) / W * (residual == "replicated")
    elif algo == "lean_pull":
        # no scatter; owner: my x piece here, the W-1 others where they lie (+ residual piece), out to every rank
        # (residual: mine only if sharded, else every rank too)
        reads = 1 / W + res / W
        remote_reads = (W - 1) / W
        local = 1 / W + res / W
        remote = (W - 1) / W + (W - 1) / W * (residual == "replicated")
    elif algo == "lamport_two_shot":
        # scatter: (W-1)/W of x to its owners' S slots; owner: W-1 S pieces of 1/W, polled once more, my x piece
        # (+ residual piece), z to every rank's G slot (mine local), the sharded residual piece; epilogue: every G
        # row, polled once more, out (+ a replicated residual); re-arm: 2W slots of a shard (1/W) each
        reads = (W - 1) / W + 2 * (W - 1) / W + 1 / W + res / W + 2
        local = 1 / W + (residual == "sharded") / W + 1 + (residual == "replicated") + 2
        remote = 2 * (W - 1) / W
    else:
        raise ValueError(f"traffic_per_byte: unknown algo {algo!r}; use one of {tuple(ALGOS)}")
    return {"local_reads": reads, "remote_reads": remote_reads, "local_writes": local, "remote_writes": remote,
            "total": reads + remote_reads + local + remote}


@dataclass(frozen=True)
class LaunchPlan:
    algo: int
    ctas: int
    chunks_per_cta: int


class Communicator:
    """Owns tokenweave's state for one process group.

    Parameters
    ----------
    group : ProcessGroup, optional
        Defaults to the default group. Every rank of it must create the Communicator (collective).
    max_tokens, hidden : int
        Size the workspace: the largest ``x`` handled in one launch is ``max_tokens * hidden`` elements
        of ``dtype``. Larger inputs are processed in row chunks of that size (several launches).
    dtype : torch.dtype
        Largest element type you will pass (sizes the workspace).
    transport : {"multimem", "p2p", "torch"}, optional
        Force a transport (also ``TOKENWEAVE_TRANSPORT``). Default: the fastest that works here.
    timeout_ms : int, optional
        Bound of every wait for a peer: the kernels' cross-GPU waits and the torch transport's
        collectives (also ``TOKENWEAVE_TIMEOUT_MS``; default 30000).

    Notes
    -----
    The device is ``torch.cuda.current_device()`` for NCCL groups; set it before creating the
    Communicator. Ops issued on one Communicator from different streams are serialised by it.
    """

    def __init__(self, group=None, max_tokens=8192, hidden=8192, dtype=torch.bfloat16, transport=None,
                 timeout_ms=None):
        if not dist.is_initialized():
            raise RuntimeError("tokenweave.Communicator: torch.distributed is not initialised; call "
                               "torch.distributed.init_process_group first")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        self.backend = str(dist.get_backend(self.group))
        if max_tokens < 1 or hidden < 8 or hidden % 8:
            raise ValueError("tokenweave.Communicator: max_tokens must be >= 1 and hidden a positive multiple of 8")
        self.capacity_bytes = int(max_tokens) * int(hidden) * torch.empty((), dtype=dtype).element_size()
        self.timeout_ms = int(timeout_ms) if timeout_ms is not None else env.timeout_ms()
        self._id = None
        self._closed = False
        self._error = None
        self._plans = {}
        self._tracker = None  # track-and-trigger state for callers that pass no Tracker (tokenweave.trigger)
        self._last_stream = None
        self._last_raw_stream = None
        self.device = self._device()

        requested = transport if transport is not None else env.requested_transport()
        if requested is not None and requested not in env.TRANSPORTS:
            raise ValueError(f"tokenweave.Communicator: transport={requested!r}; use one of {env.TRANSPORTS}")
        is_cuda = self.device.type == "cuda"
        choice, reason = plan_transport(
            requested, device_is_cuda=is_cuda, has_extension=HAS_EXTENSION, world_size=self.world_size,
            same_host=self._same_host() if is_cuda and self.world_size > 1 else True,
            blockers=env.multicast_blockers())
        if choice in ("p2p", "multimem"):
            choice, reason = self._setup_device_transport(choice, reason)
        self.transport = choice
        self.transport_reason = reason
        if choice == "torch":
            # The torch transport checks ctas as the kernels would (1..SM count) and numbers its calls for errors.
            self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count if is_cuda else None
            self._torch_calls = 0
        if self.rank == 0 and choice != "multimem" and self.world_size > 1 and requested is None:
            warnings.warn(f"tokenweave: using the {choice!r} transport: {reason}", stacklevel=2)

    # ------------------------------------------------------------------ set-up
    def _device(self) -> torch.device:
        if self.backend == "nccl" or (torch.cuda.is_available() and "nccl" in self.backend):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _all_gather_object(self, obj):
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _same_host(self) -> bool:
        return len(set(self._all_gather_object(socket.gethostname()))) == 1

    def _setup_device_transport(self, choice, reason):
        from tokenweave import _symm

        self._layout = _C.layout(self.capacity_bytes, self.world_size)
        # All CTAs of a call must be resident at once (peers' CTAs wait for each other): at most one per SM.
        self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self._buffer = _symm.allocate(self._layout["total_bytes"], self.device, self.group)
        ws = self._buffer.tensor
        ws[: self._layout["data_off"]].zero_()  # flags, headers, probe: epochs start at 0 on every rank
        fill_lamport_sentinel(ws, self._layout)
        self._state = torch.zeros(int(_C.STATE_WORDS), dtype=torch.int32, device=self.device)
        self._symm_allocs = []  # Communicator.empty: the handles keep the peer mappings alive
        # mapped (UVA): the kernels write it (an ErrorRecord: int64 fields)
        self._err = torch.zeros(_abi.ERROR_RECORD_BYTES // 8, dtype=torch.int64).pin_memory()
        self._err_view = self._err.numpy()
        if choice == "multimem" and not all_ranks_true(self._buffer.multicast_ptr != 0, self.group, self.device):
            choice, reason = "p2p", "the symmetric-memory rendezvous gave no multicast address on every rank"
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)  # nobody signals before every rank zeroed its flags
        self._id = _C.comm_create(self.device.index, self.rank, self.world_size, self._buffer.peer_ptrs,
                                  self._buffer.multicast_ptr if choice == "multimem" else 0,
                                  self._state.data_ptr(), self._err.data_ptr(), self.capacity_bytes,
                                  self.timeout_ms * 1_000_000, _TRANSPORT_CODE[choice])
        problem = self._probe_peers()
        if not all_ranks_true(problem is None, self.group, self.device):
            _C.comm_destroy(self._id)
            self._id = None
            why = problem or "a peer's check failed"
            warnings.warn(f"tokenweave: peer access check failed ({why}); falling back to the 'torch' transport. "
                          "Set TOKENWEAVE_TRANSPORT=torch to skip the check and this warning.", stacklevel=3)
            self._buffer = None
            return "torch", f"peer access check failed: {why}"
        return choice, reason

    def _probe_peers(self):
        """Write to and read from every peer through the mappings; check what the peers wrote to us."""
        nonce = torch.randint(1, 2**31, (1,), device=self.device)
        dist.broadcast(nonce, src=dist.get_global_rank(self.group, 0), group=self.group)
        magic = _PROBE_MAGIC | (int(nonce.item()) << 16)
        result = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        _C.peer_probe(self._id, magic, result)
        torch.cuda.synchronize(self.device)
        dist.barrier(group=self.group)
        off = self._layout["probe_off"]
        received = self._buffer.tensor[off: off + 8 * self.world_size].view(torch.int64).tolist()
        readback = result.tolist()
        for q in range(self.world_size):
            if readback[q] != magic + (self.rank << 8) + q:
                return f"rank {self.rank} read back {readback[q]:#x} from rank {q}'s buffer"
            if received[q] != magic + (q << 8) + self.rank:
                return f"rank {self.rank} found {received[q]:#x} where rank {q} wrote"
        return None

    # ------------------------------------------------------------------ symmetric tensors
    def empty(self, *shape, dtype=torch.bfloat16) -> torch.Tensor:
        """Collective: a tensor in symmetric memory, writable by every rank's kernels.

        ``algo="lean"`` writes its results straight into every rank's ``out`` (and replicated
        ``residual``): those must come from here. Every rank must call ``empty`` with the same shapes in the
        same order. The memory lives until :meth:`close`. On the ``torch`` transport (and at world size 1)
        this is a plain ``torch.empty`` on the device.
        """
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if self.transport == "torch" or self._id is None:
            return torch.empty(shape, dtype=dtype, device=self.device)
        from tokenweave import _symm

        numel = math.prod(int(s) for s in shape)
        nbytes = max(16, numel * torch.empty((), dtype=dtype).element_size())
        buf = _symm.allocate(nbytes, self.device, self.group)
        _C.comm_register(self._id, buf.tensor.data_ptr(), nbytes, buf.peer_ptrs,
                         buf.multicast_ptr if self.transport == "multimem" else 0)
        self._symm_allocs.append(buf)
        return buf.tensor[: numel * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape)

    def shard_rows(self, tokens: int) -> tuple[int, int]:
        """``(first_row, n_rows)`` of the rows this rank owns in a call of ``tokens`` rows (``algo="lean"`` and
        ``"lamport_two_shot"``).

        With ``sharded_residual=True`` the residual passed on this rank holds exactly these rows.
        """
        return shard_range(tokens, self.world_size, self.rank)

    # ------------------------------------------------------------------ per call
    def plan(self, tokens: int, hidden: int, itemsize: int, algo=None, ctas=None, *, lean_ok=False,
             pull_ok=False) -> LaunchPlan:
        """Launch settings for one call: the dispatcher (one place).

        The thresholds are measured per card and world size (``tokenweave/configs/<card>.json``, through
        :func:`tokenweave.tuning.dispatch_config`, which names the run each came from); a heuristic applies
        where no entry matches. ``lean_ok``: out (and a replicated residual) are symmetric tensors, so the
        lean two-shot may be chosen; ``pull_ok``: x is a symmetric tensor too, so lean may read it in place
        (``lean_pull``, where the config's ``lean_pull`` says). The Lamport two-shot is chosen only up to the
        config's ``lamport_two_shot_max_bytes`` (0, never, where no run measured it).
        """
        key = (tokens, hidden, itemsize, algo, ctas, lean_ok, pull_ok)
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        nbytes = tokens * hidden * itemsize
        cfg = self._dispatch(itemsize, hidden)
        # lamport_two_shot: each rank's shard of ceil(T / W) rows must fit one Lamport slot (types.h)
        shard_bytes = -(-tokens // self.world_size) * hidden * itemsize
        lamport_two_shot_fits = (itemsize == 2 and hidden <= _LAMPORT_MAX_HIDDEN
                                 and shard_bytes <= self._layout["lamport_max_bytes"])
        if algo is None:
            if nbytes <= cfg.lamport_max_bytes and itemsize == 2 and nbytes <= self._layout["lamport_max_bytes"]:
                code = ALGOS["lamport"]
            elif nbytes <= min(cfg.one_shot_max_bytes, self._layout["one_shot_bytes"]):
                code = ALGOS["one_shot"]
            elif nbytes <= cfg.lamport_two_shot_max_bytes and lamport_two_shot_fits:
                code = ALGOS["lamport_two_shot"]
            elif lean_ok and cfg.lean and hidden <= _abi.LEAN_MAX_HIDDEN[itemsize]:
                code = ALGOS[self.lean_variant(itemsize, hidden, pull_ok=pull_ok)]
            else:
                code = ALGOS["two_shot"]
        else:
            if algo not in ALGOS:
                raise ValueError(f"algo={algo!r}: use one of {tuple(ALGOS)} or None")
            code = ALGOS[algo]
            if algo == "one_shot" and nbytes > self._layout["one_shot_bytes"]:
                raise ValueError(f"algo='one_shot': x has {nbytes} bytes, more than one-shot's limit of "
                                 f"{self._layout['one_shot_bytes']} (workspace / world); use 'two_shot' or a larger "
                                 "max_tokens")
            if algo == "lamport" and (itemsize != 2 or nbytes > self._layout["lamport_max_bytes"]):
                raise ValueError(f"algo='lamport' takes bfloat16/float16 x of at most {self._layout['lamport_max_bytes']} "
                                 f"bytes; x has {nbytes} bytes of {itemsize}-byte elements: use 'one_shot' or 'two_shot'")
            if algo == "lamport_two_shot" and not lamport_two_shot_fits:
                raise ValueError(f"algo='lamport_two_shot' takes bfloat16/float16 x with hidden <= {_LAMPORT_MAX_HIDDEN} "
                                 f"and at most {self._layout['lamport_max_bytes']} bytes in each rank's shard of "
                                 f"ceil(tokens / world_size) rows; x has {itemsize}-byte elements, hidden {hidden} and "
                                 f"{shard_bytes} bytes per shard: use 'two_shot' (or 'lean')")
            if algo == "lean_bulk" and not env.experimental_lean_bulk():
                raise ValueError("algo='lean_bulk' is experimental: it was slower than 'lean' at every CTA count "
                                 "measured and one of its emulated-world runs timed out (docs/PERFORMANCE.md); use "
                                 "'lean', or set TOKENWEAVE_EXPERIMENTAL_LEAN_BULK=1 to run it anyway")
            if algo in _LEAN_ALGOS and not lean_ok:
                raise ValueError(f"algo={algo!r} writes out (and a replicated residual) on every rank: allocate them "
                                 "with comm.empty(...)")
            if algo == "lean_pull" and not pull_ok:
                raise ValueError("algo='lean_pull' reads x where it lies on every rank: allocate x with "
                                 "comm.empty(...) too (or use algo='lean')")
            if algo in _LEAN_ALGOS and hidden > _abi.LEAN_MAX_HIDDEN[itemsize]:
                raise ValueError(f"algo={algo!r} takes hidden <= {_abi.LEAN_MAX_HIDDEN[itemsize]} for "
                                 f"{itemsize}-byte elements (its owner keeps a row in registers); hidden is {hidden}: "
                                 "use 'two_shot'")
        if ctas is None:
            ctas = max(1, min(self._num_sms, math.ceil(nbytes / cfg.bytes_per_cta)))
        elif not 1 <= int(ctas) <= self._num_sms:
            raise ValueError(f"ctas={ctas}: use 1..{self._num_sms} (the SMs this communicator may use)")
        plan = LaunchPlan(code, int(ctas), cfg.chunks_per_cta if nbytes >= cfg.pipeline_from_bytes else 1)
        self._plans[key] = plan
        return plan

    def lean_variant(self, itemsize: int, hidden: int, *, pull_ok: bool = False) -> str:
        """The lean kernel the card's config picks where lean is used: ``"lean_pull"`` (x symmetric too,
        ``pull_ok``, and the config's ``lean_pull``), ``"lean_bulk"`` (only with
        ``TOKENWEAVE_EXPERIMENTAL_LEAN_BULK=1``) or ``"lean"``."""
        cfg = self._dispatch(itemsize, hidden)
        if pull_ok and cfg.lean_pull:
            return "lean_pull"
        return "lean_bulk" if cfg.lean_bulk and env.experimental_lean_bulk() else "lean"

    def _dispatch(self, itemsize: int, hidden: int):
        from tokenweave.tuning import dispatch_config

        return dispatch_config(self.card, self.world_size, itemsize, hidden)

    # ------------------------------------------------------------------ accessors (for tokenweave.trigger)
    @property
    def card(self) -> str:
        """The card's short name keying the tuning configs (``"h200"``; ``"cpu"`` off the GPU)."""
        if not hasattr(self, "_card"):
            from tokenweave.tuning import device_slug

            self._card = device_slug(self.device) if self.device.type == "cuda" else "cpu"
        return self._card

    @property
    def num_sms(self) -> int | None:
        """SMs a call's CTAs may use (one CTA per SM; the device's SM count, an emulated rank's share); None
        on CPU."""
        return getattr(self, "_num_sms", None)

    @property
    def comm_id(self) -> int | None:
        """The extension's handle of this communicator (what the ops take as ``comm``); None on the torch
        transport and once closed."""
        return self._id

    def default_tracker(self):
        """The Communicator's own :class:`tokenweave.Tracker`, for track-and-trigger calls that pass none.

        Made on first use and kept: a fresh Tracker per call would run every call producer-first (its
        first-call state is empty) and free counters a captured graph still uses. One per Communicator
        suffices because the Communicator already orders its calls across streams.
        """
        if self._tracker is None:
            from tokenweave.trigger import Tracker

            self._tracker = Tracker(self.device)
        return self._tracker

    def is_symmetric(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in memory from :meth:`empty` (peer-writable on every rank)."""
        p, n = t.data_ptr(), t.numel() * t.element_size()
        return any(b.tensor.data_ptr() <= p and p + n <= b.tensor.data_ptr() + b.tensor.numel()
                   for b in getattr(self, "_symm_allocs", ()))

    def check(self):
        """Raise the error a kernel recorded (timeout, mismatch), or if the communicator is closed.

        Cheap (reads pinned host memory, no device synchronisation); every op calls it first.
        """
        if self._closed:
            raise CommunicatorClosedError("tokenweave: this Communicator was closed; create a new one")
        if self._error is not None:
            if not isinstance(self._error, (CollectiveTimeoutError, CollectiveMismatchError)):
                raise type(self._error)(str(self._error))  # e.g. the torch transport lost a peer
            raise type(self._error)(str(self._error), op=self._error.op, rank=self._error.rank,
                                    peer=self._error.peer, seq=self._error.seq)
        if self._id is not None and self._err_view[0] != 0:
            self._error = self._decode_error()
            self.check()

    def synchronize(self):
        """Wait for this rank's queued work, then raise any error a kernel recorded."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        self.check()

    def order_stream(self):
        """Serialise calls issued from different streams (one epoch counter per Communicator).

        Compares raw stream handles (cheap); only on a change does the new stream wait for the old one.
        """
        raw = _current_raw_stream(self.device.index)
        if raw == self._last_raw_stream:
            return
        stream = torch.cuda.current_stream(self.device)
        if self._last_stream is not None and not torch.cuda.is_current_stream_capturing():
            stream.wait_stream(self._last_stream)
        self._last_stream, self._last_raw_stream = stream, raw

    def _header(self, epoch: int, src: int) -> dict:
        base = _abi.call_header_offset(self._layout["headers_off"], epoch, src)
        h = _abi.decode_call_header(bytes(self._buffer.tensor[base: base + _abi.CALL_HEADER_BYTES].cpu().numpy()
                                          .tobytes()))
        return {"epoch": h["epoch"], "op": _op_name(h["op"]), "tokens": h["tokens"], "hidden": h["hidden"],
                "dtype": _DTYPE_NAMES.get(h["dtype"], h["dtype"]), "algo": _ALGO_NAMES.get(h["algo"], h["algo"]),
                "ctas": h["ctas"], "chunk_rows": h["chunk_rows"], "sig": h["sig"]}

    def _decode_error(self) -> TokenweaveError:
        code, rank, peer, epoch, chunk, own_sig, peer_sig, op = (int(v) for v in self._err_view)
        name = _op_name(op)
        if code == _ERR_TIMEOUT:
            return CollectiveTimeoutError(
                f"tokenweave.{name}: rank {rank} timed out after {self.timeout_ms} ms waiting for rank {peer} "
                f"(call #{epoch}, chunk {chunk}). Rank {peer} never arrived: it may have crashed, be stuck, or be "
                "making a different number of tokenweave calls. This Communicator is now broken; outputs of the "
                "failed call were set to NaN. Create a new Communicator to continue.",
                op=name, rank=rank, peer=peer, seq=epoch)
        if code == _ERR_PRODUCER_TIMEOUT:
            return CollectiveTimeoutError(
                f"tokenweave.{name}: rank {rank} timed out after {self.timeout_ms} ms waiting for its own producer "
                f"(the GEMM feeding track-and-trigger) to finish chunk {chunk} (call #{epoch}). This Communicator "
                "is now broken; create a new one.", op=name, rank=rank, peer=peer, seq=epoch)
        if code == _ERR_MISMATCH:
            try:
                mine, theirs = self._header(epoch, rank), self._header(epoch, peer)
                detail = f"rank {rank} called {_describe(mine)} but rank {peer} called {_describe(theirs)}"
            except Exception:  # the headers are diagnostics only
                detail = f"signatures {own_sig:#x} (rank {rank}) and {peer_sig & 0xffffffff:#x} (rank {peer}) differ"
            return CollectiveMismatchError(
                f"tokenweave.{name}: ranks disagree on call #{epoch}: {detail}. Every rank must make the same "
                "calls with the same shapes, dtypes, algo and ctas. This Communicator is now broken.",
                op=name, rank=rank, peer=peer, seq=epoch)
        return TokenweaveError(f"tokenweave: unknown error record {list(self._err_view)}")

    # ------------------------------------------------------------------ lifetime
    def close(self):
        """Collective: wait for outstanding work, then release the workspace on every rank."""
        if self._closed:
            return
        if self._id is not None:
            torch.cuda.synchronize(self.device)
            dist.barrier(group=self.group)  # no peer still writes into our workspace
            _C.comm_destroy(self._id)
            self._id = None
        self._buffer = None
        self._symm_allocs = []
        self._tracker = None
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"Communicator(rank={self.rank}, world_size={self.world_size}, transport={self.transport!r}, "
                f"device={self.device}, capacity_bytes={self.capacity_bytes})")


def _current_raw_stream(device_index: int) -> int:
    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return get(device_index) if get is not None else torch.cuda.current_stream(device_index).cuda_stream


def _op_name(op_bits: int) -> str:
    return "fused_allreduce_rmsnorm" if op_bits & _OP_NORM else "all_reduce"


def _describe(h: dict) -> str:
    return (f"{h['op']}(tokens={h['tokens']}, hidden={h['hidden']}, dtype={h['dtype']}, algo={h['algo']}, "
            f"ctas={h['ctas']})")
