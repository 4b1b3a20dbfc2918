"""Public ops: validation, dispatch to the CUDA kernels, and the torch fallback.

Numerics (every transport): ``z = round(sum_r x_r + residual)`` with the sum in fp32;
``residual <- z``; ``out = round(z * rsqrt(mean(z^2) + eps) * weight)`` in fp32.

Contract (every transport): the same validation before any communication; zero tokens is a no-op
(``out`` is returned, nothing is touched or sent); ranks that disagree on the call raise
``CollectiveMismatchError`` and a peer that never arrives ``CollectiveTimeoutError`` within the
Communicator's timeout, on every rank that waits. A Communicator of one rank communicates nothing.
"""
from __future__ import annotations

import functools
import math
import operator
import re
from datetime import timedelta

import torch
import torch.distributed as dist

from tokenweave import _abi
from tokenweave._ext import HAS_EXTENSION, _C
from tokenweave.comm import _DTYPE_NAMES, _LEAN_ALGOS, _OP_NORM, _OP_RESIDUAL, ALGOS, Communicator, _op_name
from tokenweave.errors import CollectiveMismatchError, CollectiveTimeoutError, TokenweaveError
from tokenweave.reference import add_rmsnorm_reference

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)
_DTYPE_CODE = {getattr(torch, name): code for code, name in _DTYPE_NAMES.items()}  # as in the kernels' headers
# Hidden is bounded per element size by the kernels' row epilogue; every transport and add_rmsnorm enforce it.
_MAX_HIDDEN = _abi.MAX_HIDDEN
_LEAN_CODES = tuple(ALGOS[a] for a in _LEAN_ALGOS)  # these go through torch.ops.tokenweave.allreduce_lean

if HAS_EXTENSION:
    # Fake (meta) implementations: the ops only mutate their arguments, so there is nothing to compute.
    @torch.library.register_fake("tokenweave::allreduce")
    def _allreduce_fake(x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta):
        return None

    @torch.library.register_fake("tokenweave::add_rmsnorm")
    def _add_rmsnorm_fake(x, residual, weight, out, eps, shape=0):
        return None

    @torch.library.register_fake("tokenweave::allreduce_tracked")
    def _allreduce_tracked_fake(x, residual, weight, out, eps, comm, algo, ctas, chunk_rows, ready, consumed,
                                pieces_full, pieces_last):
        return None

    @torch.library.register_fake("tokenweave::mark_ready")
    def _mark_ready_fake(ready, begin, end, pieces):
        return None

    @torch.library.register_fake("tokenweave::allreduce_staged")
    def _allreduce_staged_fake(x, residual, weight, out, eps, comm, ctas, chunk_rows, go):
        return None

    @torch.library.register_fake("tokenweave::copy_engine_stage")
    def _copy_engine_stage_fake(x, comm, ctas, chunk_rows, group_ready, group_chunks, pieces_full, pieces_last,
                                go, ones):
        return None

    @torch.library.register_fake("tokenweave::gate_on_counter")
    def _gate_on_counter_fake(counters, index, target):
        return None

    @torch.library.register_fake("tokenweave::allreduce_lean")
    def _allreduce_lean_fake(x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta, sharded_residual):
        return None

    @torch.library.register_fake("tokenweave::allreduce_sharded")
    def _allreduce_sharded_fake(x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta):
        return None


def _check_tensor(op, name, t, like, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tokenweave.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise TypeError(f"tokenweave.{op}: {name} has dtype {t.dtype} but x has {like.dtype}; convert it with .to({like.dtype})")
    if t.device != device:
        raise ValueError(f"tokenweave.{op}: {name} is on {t.device}, expected {device}; move it with .to('{device}')")
    if not t.is_contiguous():
        raise ValueError(f"tokenweave.{op}: {name} must be contiguous; call .contiguous() on it")
    if t.device.type == "cuda" and t.data_ptr() % 16:
        raise ValueError(f"tokenweave.{op}: {name} must be 16-byte aligned (it is a view at an odd offset); "
                         "pass a fresh tensor or .clone() it")


def _validate(op, x, residual, weight, out, device, *, no_tokens_ok=False):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenweave.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"tokenweave.{op}: x has dtype {x.dtype}; supported: bfloat16, float16, float32")
    if x.dim() < 1 or x.shape[-1] == 0 or (x.numel() == 0 and not no_tokens_ok):
        raise ValueError(f"tokenweave.{op}: x must be non-empty with shape [..., hidden], got {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden % 8:
        raise ValueError(f"tokenweave.{op}: hidden size (last dim of x) is {hidden}; it must be a multiple of 8 "
                         "(16-byte vectors): pad the hidden dimension")
    if hidden > _MAX_HIDDEN[x.element_size()]:
        fix = ("use bfloat16 or float16" if hidden <= _MAX_HIDDEN[2] else
               "rows this long need torch.distributed.all_reduce and a torch norm")
        raise ValueError(f"tokenweave.{op}: hidden size (last dim of x) is {hidden}; the kernels take rows of at most "
                         f"{_MAX_HIDDEN[x.element_size()]} elements for {x.dtype} ({_MAX_HIDDEN[2]} for 2-byte types, "
                         f"{_MAX_HIDDEN[4]} for float32): {fix}")
    _check_tensor(op, "x", x, x, device)
    if residual is not None:
        _check_tensor(op, "residual", residual, x, device)
        if residual.shape != x.shape:
            raise ValueError(f"tokenweave.{op}: residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}")
    if weight is not None:
        _check_tensor(op, "weight", weight, x, device)
        if weight.shape != (hidden,):
            raise ValueError(f"tokenweave.{op}: weight has shape {tuple(weight.shape)}; expected ({hidden},)")
    if out is not None:
        _check_tensor(op, "out", out, x, device)
        if out.shape != x.shape:
            raise ValueError(f"tokenweave.{op}: out has shape {tuple(out.shape)}, x has {tuple(x.shape)}")
        # (empty tensors share data_ptr 0: nothing is written, so they cannot alias)
        if residual is not None and out.numel() and out.data_ptr() == residual.data_ptr():
            raise ValueError(f"tokenweave.{op}: out must not be the residual tensor (both are written)")


def _finish_torch(summed, residual, weight, eps, out):
    """Residual add and norm from an fp32 sum, with the kernels' rounding points."""
    normed, z = add_rmsnorm_reference(summed, residual, weight, eps, dtype=out.dtype)
    if residual is not None:
        residual.copy_(z)
    out.copy_(normed)
    return out


def _check_eps(op, eps) -> float:
    """eps as a float; it must be finite and >= 0 (a negative eps can make the norm divide by <= 0)."""
    try:
        value = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"tokenweave.{op}: eps must be a number, got {type(eps).__name__}") from None
    if not 0.0 <= value < math.inf:
        raise ValueError(f"tokenweave.{op}: eps={eps!r}; it must be finite and >= 0 (e.g. 1e-5)")
    return value


def _as_rows(op, x, residual, weight, out, device):
    """2-D views of [..., hidden] tensors (the rare N-D case, fully validated first so .view cannot fail)."""
    _validate(op, x, residual, weight, out, device)
    hidden = x.shape[-1]
    return (x.view(-1, hidden), None if residual is None else residual.view(-1, hidden), out.view(-1, hidden))


def _check_launch_settings(op, comm, tokens, hidden, itemsize, algo, ctas):
    """What the GPU transports' dispatcher and plan_allreduce reject, for the torch transport (which ignores
    algo and ctas, so that code tested on it runs unchanged on a GPU transport)."""
    if algo is not None and algo not in ALGOS:
        raise ValueError(f"tokenweave.{op}: algo={algo!r}; use one of {tuple(ALGOS)} or None (the dispatcher's choice)")
    if ctas is not None:
        most = comm._num_sms  # None on CPU: no SMs to bound it
        try:
            n = operator.index(ctas)
        except TypeError:
            n = 0
        if isinstance(ctas, bool) or n < 1 or (most is not None and n > most):
            bound = f"in 1..{most} (the device's SM count)" if most else ">= 1 (on a GPU, at most its SM count)"
            raise ValueError(f"tokenweave.{op}: ctas={ctas!r}; use an int {bound} or None (the dispatcher's choice)")
    row_bytes = hidden * itemsize
    if row_bytes > comm.capacity_bytes:
        raise ValueError(f"tokenweave.{op}: one row of x ({row_bytes} bytes) is larger than the workspace "
                         f"({comm.capacity_bytes} bytes): make the Communicator with a larger hidden or max_tokens")
    # Larger inputs run in row chunks of the workspace; one-shot holds a chunk in one of world slots.
    launch_bytes = min(tokens, comm.capacity_bytes // row_bytes) * row_bytes
    if algo == "one_shot" and launch_bytes > comm.capacity_bytes // comm.world_size:
        raise ValueError(f"tokenweave.{op}: algo='one_shot': x has {launch_bytes} bytes per launch, more than "
                         f"one-shot's limit of about {comm.capacity_bytes // comm.world_size} (workspace / world); "
                         "use 'two_shot' or a larger max_tokens")


def _torch_transport(op, comm: Communicator, x, residual, weight, eps, out, algo, ctas):
    """torch.distributed + a torch norm; one rank: the fused add + RMSNorm kernel, no communication."""
    _validate(op, x, residual, weight, out, comm.device, no_tokens_ok=True)
    hidden = x.shape[-1]
    tokens = x.numel() // hidden
    _check_launch_settings(op, comm, tokens, hidden, x.element_size(), algo, ctas)
    if out is None:
        out = torch.empty_like(x)
    if tokens == 0:
        return out
    if comm.world_size == 1:  # the sum over one rank is x
        if weight is not None:
            return _local_add_rmsnorm(x, residual, weight, eps, out)
        if residual is None:
            return out if out.data_ptr() == x.data_ptr() else out.copy_(x)
        return _finish_torch(x.to(torch.float32, copy=True), residual, None, eps, out)
    summed = x.to(torch.float32, copy=True)  # never alias x (float32)
    if comm.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # The check and the bounded wait need the host; a captured all-reduce is checked when it is eager.
        dist.all_reduce(summed, group=comm.group)
    else:
        comm._torch_calls += 1
        _torch_agree(op, comm, x, residual, weight, tokens, hidden, algo, ctas)
        _torch_bounded(op, comm, "the all-reduce", lambda: dist.all_reduce(summed, group=comm.group, async_op=True))
    return _finish_torch(summed, residual, weight, eps, out)


def _torch_agree(op, comm: Communicator, x, residual, weight, tokens, hidden, algo, ctas):
    """Every rank's call, exchanged (one all_gather of 6 int64): CollectiveMismatchError on every rank if any differ,
    before the all-reduce could abort on mismatched sizes or pair rows of different shapes."""
    op_bits = (_OP_RESIDUAL if residual is not None else 0) | (_OP_NORM if weight is not None else 0)
    header = [op_bits, _DTYPE_CODE[x.dtype], tokens, hidden, ALGOS.get(algo, 0), 0 if ctas is None else int(ctas)]
    mine = torch.tensor(header, dtype=torch.int64, device=comm.device)
    gathered = [torch.empty_like(mine) for _ in range(comm.world_size)]
    _torch_bounded(op, comm, "the call check",
                   lambda: dist.all_gather(gathered, mine, group=comm.group, async_op=True))
    headers = torch.stack(gathered).tolist()
    for peer, theirs in enumerate(headers):
        if theirs != header:
            comm._error = CollectiveMismatchError(
                f"tokenweave.{op}: ranks disagree on call #{comm._torch_calls}: rank {comm.rank} called "
                f"{_describe_header(header)} but rank {peer} called {_describe_header(theirs)}. Every rank must make "
                "the same calls with the same shapes, dtypes, algo and ctas. Nothing was reduced; this Communicator "
                "is now broken.", op=op, rank=comm.rank, peer=peer, seq=comm._torch_calls)
            raise comm._error


def _describe_header(h) -> str:
    op_bits, dtype, tokens, hidden, algo, ctas = h
    algo_name = {code: name for name, code in ALGOS.items()}.get(algo)
    return (f"{_op_name(op_bits)}(tokens={tokens}, hidden={hidden}, dtype={_DTYPE_NAMES.get(dtype, dtype)}, "
            f"residual={'yes' if op_bits & _OP_RESIDUAL else 'no'}, algo={algo_name}, ctas={ctas or None})")


def _torch_bounded(op, comm: Communicator, what: str, start):
    """Run ``start()`` (an async torch.distributed call) and wait at most the Communicator's timeout for it;
    a failure breaks the Communicator."""
    try:
        completed = start().wait(timeout=timedelta(milliseconds=comm.timeout_ms))
        failure = None if completed is not False else "timed out"
    except RuntimeError as e:  # gloo: "Operation timed out!"; a peer that died: a connection error
        failure = str(e)
    if failure is None:
        return
    seq = comm._torch_calls
    if re.search(r"tim(ed|ing) ?out|timeout", failure, re.IGNORECASE):  # gloo: "timed out"; NCCL: "timing out"
        comm._error = CollectiveTimeoutError(
            f"tokenweave.{op}: rank {comm.rank} timed out after {comm.timeout_ms} ms in {what} (call #{seq}) "
            "waiting for a peer (the torch transport cannot tell which rank). A rank never arrived: it may have "
            "crashed, be stuck, or be making a different number of tokenweave calls. This Communicator is now "
            "broken; create a new one to continue.", op=op, rank=comm.rank, peer=None, seq=seq)
    else:
        comm._error = TokenweaveError(
            f"tokenweave.{op}: rank {comm.rank} failed in {what} (call #{seq}): {failure}. A peer may have died. "
            "This Communicator is now broken; create a new one to continue.")
    raise comm._error


@functools.lru_cache(maxsize=64)
def _card(device_index: int) -> str:
    from tokenweave import tuning

    return tuning.device_slug(device_index)


def _norm_shape(x2: torch.Tensor) -> int:
    """The add + RMSNorm kernel's block shape for x2 [tokens, hidden] (the card's tuning config; cached there,
    so tokenweave.tuning.clear_cache() takes effect here too)."""
    from tokenweave import tuning

    return tuning.norm_shape(_card(x2.device.index), x2.shape[0], x2.shape[1], x2.element_size())


def _local_add_rmsnorm(x, residual, weight, eps, out):
    """The fused add + RMSNorm on this device (x already validated)."""
    if HAS_EXTENSION and x.is_cuda:
        hidden = x.shape[-1]
        x2 = x.view(-1, hidden)
        _ops().add_rmsnorm(x2, None if residual is None else residual.view(-1, hidden), weight, out.view(-1, hidden),
                           eps, _norm_shape(x2))
        return out
    return _finish_torch(x.to(torch.float32, copy=True), residual, weight, eps, out)


def _collective(op, comm: Communicator, x, residual, weight, eps, out, algo, ctas, sharded_residual=False):
    if not isinstance(comm, Communicator):
        raise TypeError(f"tokenweave.{op}: comm must be a tokenweave.Communicator, got {type(comm).__name__}")
    comm.check()
    eps = _check_eps(op, eps)
    if comm.transport == "torch":
        return _torch_transport(op, comm, x, residual, weight, eps, out, algo, ctas)

    # The hot path (called twice per layer): the op's C++ checks validate every tensor before launch,
    # with TypeError/ValueError messages naming the op; Python only adds what C++ cannot see.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenweave.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.numel() == 0:  # zero tokens (the kernels take >= 1): validated, then nothing to do
        _validate(op, x, residual, weight, out, comm.device, no_tokens_ok=True)
        return torch.empty_like(x) if out is None else out
    if out is None:
        out = torch.empty_like(x)
    elif residual is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError(f"tokenweave.{op}: out must not be the residual tensor (both are written)")
    if sharded_residual:  # the residual is this rank's shard: its shape is not x's
        if x.dim() != 2 or residual is None:
            raise ValueError(f"tokenweave.{op}: sharded_residual=True takes a 2-D x [tokens, hidden] and this rank's "
                             "residual rows [n_rows, hidden] (comm.shard_rows(tokens))")
        x2, res2, out2 = x, residual, out
    else:
        x2, res2, out2 = (x, residual, out) if x.dim() == 2 else _as_rows(op, x, residual, weight, out, comm.device)
    tokens, hidden = x2.shape
    itemsize = x2.element_size()
    comm.order_stream()
    if tokens * hidden * itemsize <= comm.capacity_bytes:
        # lean: the owner writes every rank's out (and replicated residual): they must be symmetric; lean_pull
        # also reads every rank's x where it lies
        lean_ok = (algo in (None, *_LEAN_ALGOS) and comm.is_symmetric(out2)
                   and (res2 is None or sharded_residual or comm.is_symmetric(res2)))
        pull_ok = lean_ok and comm.is_symmetric(x2)
        if sharded_residual and algo is None:  # only the lean kernels (and lamport_two_shot, if asked) shard it
            algo = comm.lean_variant(itemsize, hidden, pull_ok=pull_ok)
        plan = comm.plan(tokens, hidden, itemsize, algo, ctas, lean_ok=lean_ok, pull_ok=pull_ok)
        if plan.algo in _LEAN_CODES:
            _ops().allreduce_lean(x2, res2, weight, out2, float(eps), comm._id, plan.algo, plan.ctas,
                                  plan.chunks_per_cta, sharded_residual)
        elif sharded_residual and plan.algo == ALGOS["lamport_two_shot"]:  # out is written locally
            _ops().allreduce_sharded(x2, res2, weight, out2, float(eps), comm._id, plan.algo, plan.ctas,
                                     plan.chunks_per_cta)
        elif sharded_residual:
            raise ValueError(f"tokenweave.{op}: sharded_residual=True needs algo 'lean', 'lean_pull', "
                             "'lamport_two_shot' or None (None: lean)")
        else:
            _ops().allreduce(x2, res2, weight, out2, float(eps), comm._id, plan.algo, plan.ctas, plan.chunks_per_cta)
        return out
    if sharded_residual:
        raise ValueError(f"tokenweave.{op}: sharded_residual=True needs x within the workspace (max_tokens x hidden); "
                         "make the Communicator with a larger max_tokens")
    rows = max(1, comm.capacity_bytes // (hidden * itemsize))  # larger than the workspace: row chunks
    for r0 in range(0, tokens, rows):
        r1 = min(tokens, r0 + rows)
        plan = comm.plan(r1 - r0, hidden, itemsize, algo, ctas)
        _ops().allreduce(x2[r0:r1], None if res2 is None else res2[r0:r1], weight, out2[r0:r1], float(eps), comm._id,
                         plan.algo, plan.ctas, plan.chunks_per_cta)
    return out


class _Ops:
    """The extension's op overloads, resolved once (calling an OpOverload skips overload resolution)."""

    def __init__(self):
        ops = torch.ops.tokenweave
        self.allreduce = ops.allreduce.default
        self.add_rmsnorm = ops.add_rmsnorm.default
        self.allreduce_tracked = ops.allreduce_tracked.default
        self.mark_ready = ops.mark_ready.default
        self.allreduce_staged = ops.allreduce_staged.default
        self.copy_engine_stage = ops.copy_engine_stage.default
        self.gate_on_counter = ops.gate_on_counter.default
        self.allreduce_lean = ops.allreduce_lean.default
        self.allreduce_sharded = ops.allreduce_sharded.default


_OPS = None


def _ops() -> _Ops:
    global _OPS
    if _OPS is None:
        from tokenweave import tuning

        on, _ = tuning.programmatic_launch(tuning.device_slug())
        _C.set_programmatic_launch(bool(on))  # the card's measured default, once, before the first launch
        _OPS = _Ops()
    return _OPS


def set_programmatic_launch(enabled: bool) -> None:
    """Launch every tokenweave kernel with programmatic dependent launch (PDL), or not, in this process.

    With PDL a kernel may start while the previous kernel in its stream is finishing (its CTAs prefetch the
    norm weight, then wait for that kernel's results in hardware), which hides the launch gap; inside CUDA
    graphs the dependency becomes a programmatic edge. The default comes from the card's tuning config
    (``"launch"``; ``TOKENWEAVE_PDL=0|1`` overrides) and is applied when the first op runs, or by this call
    before it sets ``enabled``: a choice made before any op is kept. Needs the CUDA extension.
    """
    if not HAS_EXTENSION:
        raise RuntimeError("tokenweave.set_programmatic_launch: the CUDA extension is not built")
    _ops()  # the card's default is applied on first use: apply it now, so that it cannot override this choice
    _C.set_programmatic_launch(bool(enabled))


def programmatic_launch() -> bool:
    """Whether tokenweave kernels are launched with PDL in this process (:func:`set_programmatic_launch`)."""
    if not HAS_EXTENSION:
        return False
    _ops()  # the card's default, if nothing has been launched yet
    return bool(_C.programmatic_launch())


def fused_allreduce_rmsnorm(comm: Communicator, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float = 1e-6, *, out: torch.Tensor | None = None, algo: str | None = None,
                            ctas: int | None = None, sharded_residual: bool = False) -> torch.Tensor:
    """All-reduce ``x`` over ``comm``, add ``residual``, RMS-normalise: one kernel.

    Parameters
    ----------
    comm : Communicator
    x : Tensor [..., hidden]
        This rank's partial result (e.g. a row-parallel linear's output). bfloat16, float16 or float32;
        hidden a multiple of 8, at most 32768 (16384 for float32); contiguous. Any token count: zero
        tokens return ``out`` without communicating. Over one rank, the fused add + RMSNorm alone.
    residual : Tensor or None
        Same shape and dtype as ``x``; updated in place to ``z = allreduce(x) + residual``.
        With ``None``, ``z = allreduce(x)``. With ``sharded_residual=True``: only this rank's rows
        ``[n_rows, hidden]`` (``comm.shard_rows(tokens)``), updated in place.
    weight : Tensor [hidden]
        RMSNorm weight.
    eps : float
        Finite and >= 0.
    out : Tensor, optional
        Receives ``RMSNorm(z) * weight``; may be ``x`` itself. Allocated if not given. When ``out`` (and a
        replicated ``residual``) come from ``comm.empty``, the lean two-shot can write them on every rank
        directly (``algo="lean"``, or chosen by the dispatcher where the card's config says it wins). When
        ``x`` comes from ``comm.empty`` too, lean can read it in place instead of scattering it
        (``algo="lean_pull"``).
    algo : {"one_shot", "two_shot", "lamport", "lean", "lean_pull", "lamport_two_shot"}, optional
        Force an algorithm; by default the dispatcher picks by size. ``"lamport"``: flag-free one-shot
        (bf16/fp16, at most 2 MiB). ``"lean"``: two-shot that writes finished rows straight into every
        rank's symmetric ``out``. ``"lean_pull"``: lean without the scatter: each row's owner reads that row
        of every rank's ``x`` where it lies (``x``, ``out`` and a replicated ``residual`` from ``comm.empty``;
        the call completes on a rank only after every owner has read that rank's ``x``, so later work on the
        stream may overwrite it). ``"lamport_two_shot"``: flag-free two-shot for the mid range (bf16/fp16,
        hidden <= 16384, each rank's shard of ``ceil(tokens / world_size)`` rows at most 2 MiB; ``out`` may be
        any tensor).
    ctas : int, optional
        CTAs (SMs) the kernel uses; by default the dispatcher picks by size. Use few when
        overlapping with compute.
    sharded_residual : bool
        The residual stream is kept sharded by rows across ranks (upstream TokenWeave's layout): fewer bytes
        per call. Needs 2-D ``x`` and algo ``"lean"`` (the default here; ``out`` from ``comm.empty``),
        ``"lean_pull"`` or ``"lamport_two_shot"`` (any ``out``).

    Returns
    -------
    Tensor
        ``out``. Bitwise identical on every rank (``lamport`` and ``lamport_two_shot`` may differ from the
        other algorithms only in the sign of an exact zero).
    """
    if weight is None:
        raise TypeError("tokenweave.fused_allreduce_rmsnorm: weight is required; use tokenweave.all_reduce for no norm")
    return _collective("fused_allreduce_rmsnorm", comm, x, residual, weight, eps, out, algo, ctas, sharded_residual)


def all_reduce(comm: Communicator, x: torch.Tensor, *, out: torch.Tensor | None = None, algo: str | None = None,
               ctas: int | None = None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``comm`` (fp32 accumulation).

    Parameters
    ----------
    comm : Communicator
    x : Tensor [..., hidden]
        bfloat16, float16 or float32; last dim a multiple of 8, at most 32768 (16384 for float32);
        contiguous. Any token count (zero: a no-op); over one rank, a copy into ``out``.
    out : Tensor, optional
        Receives the sum; may be ``x`` itself (in place). Allocated if not given.
    algo, ctas
        As in :func:`fused_allreduce_rmsnorm`.

    Returns
    -------
    Tensor
        ``out``. Bitwise identical on every rank.
    """
    return _collective("all_reduce", comm, x, None, None, 0.0, out, algo, ctas)


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float = 1e-6, *,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``residual <- x + residual; out = RMSNorm(residual) * weight`` (no communication).

    Parameters
    ----------
    x : Tensor [..., hidden]
    residual : Tensor or None
        Updated in place. With ``None``, plain RMSNorm of ``x``.
    weight : Tensor [hidden]
    eps : float
    out : Tensor, optional
        May be ``x`` itself.

    Returns
    -------
    Tensor
        ``out``. Runs the CUDA kernel for CUDA tensors when the extension is built, torch otherwise.
    """
    if weight is None:
        raise TypeError("tokenweave.add_rmsnorm: weight is required")
    eps = _check_eps("add_rmsnorm", eps)
    if HAS_EXTENSION and isinstance(x, torch.Tensor) and x.is_cuda and x.numel():  # C++ validates before launch
        if out is None:
            out = torch.empty_like(x)
        x2, res2, out2 = (x, residual, out) if x.dim() == 2 else _as_rows("add_rmsnorm", x, residual, weight, out,
                                                                          x.device)
        _ops().add_rmsnorm(x2, res2, weight, out2, eps, _norm_shape(x2))
        return out
    _validate("add_rmsnorm", x, residual, weight, out, x.device if isinstance(x, torch.Tensor) else None,
              no_tokens_ok=True)
    if out is None:
        out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    return _finish_torch(x.to(torch.float32, copy=True), residual, weight, eps, out)
