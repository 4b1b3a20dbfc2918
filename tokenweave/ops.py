"""Public ops: validation, dispatch to the CUDA kernels, and the torch fallback.

Numerics (every transport): ``z = round(sum_r x_r + residual)`` with the sum in fp32;
``residual <- z``; ``out = round(z * rsqrt(mean(z^2) + eps) * weight)`` in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from tokenweave._ext import HAS_EXTENSION
from tokenweave.comm import Communicator

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)

if HAS_EXTENSION:
    # Fake (meta) implementations: the ops only mutate their arguments, so there is nothing to compute.
    @torch.library.register_fake("tokenweave::allreduce")
    def _allreduce_fake(x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta):
        return None

    @torch.library.register_fake("tokenweave::add_rmsnorm")
    def _add_rmsnorm_fake(x, residual, weight, out, eps):
        return None

    @torch.library.register_fake("tokenweave::allreduce_tracked")
    def _allreduce_tracked_fake(x, residual, weight, out, eps, comm, algo, ctas, chunks_per_cta, ready, consumed,
                                pieces_full, pieces_last):
        return None

    @torch.library.register_fake("tokenweave::mark_ready")
    def _mark_ready_fake(ready, begin, end, pieces):
        return None

    @torch.library.register_fake("tokenweave::allreduce_staged")
    def _allreduce_staged_fake(x, residual, weight, out, eps, comm, ctas, chunks_per_cta, go):
        return None

    @torch.library.register_fake("tokenweave::copy_engine_stage")
    def _copy_engine_stage_fake(x, comm, ctas, chunks_per_cta, group_ready, group_chunks, pieces_full, pieces_last,
                                go, ones):
        return None

    @torch.library.register_fake("tokenweave::gate_on_counter")
    def _gate_on_counter_fake(counters, index, target):
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


def _validate(op, x, residual, weight, out, device):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenweave.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _SUPPORTED:
        raise TypeError(f"tokenweave.{op}: x has dtype {x.dtype}; supported: bfloat16, float16, float32")
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"tokenweave.{op}: x must be non-empty with shape [..., hidden], got {tuple(x.shape)}")
    hidden = x.shape[-1]
    if hidden % 8:
        raise ValueError(f"tokenweave.{op}: hidden size (last dim of x) is {hidden}; it must be a multiple of 8 "
                         "(16-byte vectors): pad the hidden dimension")
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
        if residual is not None and out.data_ptr() == residual.data_ptr():
            raise ValueError(f"tokenweave.{op}: out must not be the residual tensor (both are written)")


def _rmsnorm_torch(z, weight, eps):
    zf = z.float()
    return (zf * torch.rsqrt(zf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(z.dtype)


def _finish_torch(summed, residual, weight, eps, out):
    """Residual add and norm from an fp32 sum, with the kernels' rounding points."""
    if residual is not None:
        summed += residual.float()
    z = summed.to(out.dtype)
    if residual is not None:
        residual.copy_(z)
    out.copy_(z if weight is None else _rmsnorm_torch(z, weight, eps))
    return out


def _as_rows(op, x, residual, weight, out, device):
    """2-D views of [..., hidden] tensors (the rare N-D case, fully validated first so .view cannot fail)."""
    _validate(op, x, residual, weight, out, device)
    hidden = x.shape[-1]
    return (x.view(-1, hidden), None if residual is None else residual.view(-1, hidden), out.view(-1, hidden))


def _collective(op, comm: Communicator, x, residual, weight, eps, out, algo, ctas):
    if not isinstance(comm, Communicator):
        raise TypeError(f"tokenweave.{op}: comm must be a tokenweave.Communicator, got {type(comm).__name__}")
    comm.check()
    if comm.transport == "torch":
        _validate(op, x, residual, weight, out, comm.device)
        if out is None:
            out = torch.empty_like(x)
        summed = x.to(torch.float32, copy=True)  # never alias x (float32)
        if comm.world_size > 1:
            dist.all_reduce(summed, group=comm.group)
        return _finish_torch(summed, residual, weight, eps, out)

    # The hot path (called twice per layer): the op's C++ checks validate every tensor before launch,
    # with TypeError/ValueError messages naming the op; Python only adds what C++ cannot see.
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"tokenweave.{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if out is None:
        out = torch.empty_like(x)
    elif residual is not None and out.data_ptr() == residual.data_ptr():
        raise ValueError(f"tokenweave.{op}: out must not be the residual tensor (both are written)")
    x2, res2, out2 = (x, residual, out) if x.dim() == 2 else _as_rows(op, x, residual, weight, out, comm.device)
    tokens, hidden = x2.shape
    itemsize = x2.element_size()
    comm.order_stream()
    if tokens * hidden * itemsize <= comm.capacity_bytes:
        plan = comm.plan(tokens, hidden, itemsize, algo, ctas)
        _ops().allreduce(x2, res2, weight, out2, float(eps), comm._id, plan.algo, plan.ctas, plan.chunks_per_cta)
        return out
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


_OPS = None


def _ops() -> _Ops:
    global _OPS
    if _OPS is None:
        _OPS = _Ops()
    return _OPS


def fused_allreduce_rmsnorm(comm: Communicator, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float = 1e-6, *, out: torch.Tensor | None = None, algo: str | None = None,
                            ctas: int | None = None) -> torch.Tensor:
    """All-reduce ``x`` over ``comm``, add ``residual``, RMS-normalise: one kernel.

    Parameters
    ----------
    comm : Communicator
    x : Tensor [..., hidden]
        This rank's partial result (e.g. a row-parallel linear's output). bfloat16, float16 or float32;
        hidden a multiple of 8; contiguous.
    residual : Tensor or None
        Same shape and dtype as ``x``; updated in place to ``z = allreduce(x) + residual``.
        With ``None``, ``z = allreduce(x)``.
    weight : Tensor [hidden]
        RMSNorm weight.
    eps : float
    out : Tensor, optional
        Receives ``RMSNorm(z) * weight``; may be ``x`` itself. Allocated if not given.
    algo : {"one_shot", "two_shot"}, optional
        Force an algorithm; by default the dispatcher picks by size.
    ctas : int, optional
        CTAs (SMs) the kernel uses; by default the dispatcher picks by size. Use few when
        overlapping with compute.

    Returns
    -------
    Tensor
        ``out``. Bitwise identical on every rank.
    """
    if weight is None:
        raise TypeError("tokenweave.fused_allreduce_rmsnorm: weight is required; use tokenweave.all_reduce for no norm")
    return _collective("fused_allreduce_rmsnorm", comm, x, residual, weight, eps, out, algo, ctas)


def all_reduce(comm: Communicator, x: torch.Tensor, *, out: torch.Tensor | None = None, algo: str | None = None,
               ctas: int | None = None) -> torch.Tensor:
    """Sum ``x`` over the ranks of ``comm`` (fp32 accumulation).

    Parameters
    ----------
    comm : Communicator
    x : Tensor [..., hidden]
        bfloat16, float16 or float32; last dim a multiple of 8; contiguous.
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
    if HAS_EXTENSION and isinstance(x, torch.Tensor) and x.is_cuda:  # C++ validates before launch
        if out is None:
            out = torch.empty_like(x)
        x2, res2, out2 = (x, residual, out) if x.dim() == 2 else _as_rows("add_rmsnorm", x, residual, weight, out,
                                                                          x.device)
        _ops().add_rmsnorm(x2, res2, weight, out2, float(eps))
        return out
    _validate("add_rmsnorm", x, residual, weight, out, x.device if isinstance(x, torch.Tensor) else None)
    if out is None:
        out = torch.empty_like(x)
    return _finish_torch(x.to(torch.float32, copy=True), residual, weight, eps, out)
