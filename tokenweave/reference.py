"""The torch residual-add + RMSNorm: one definition for the ops' fallback, the models, the benchmarks and tests.

:func:`add_rmsnorm_reference` rounds where the fused kernels round (``z`` to the output dtype, the norm in
fp32 of the rounded ``z``); :func:`rms_norm` is the unrounded formula, used in fp32 by it and in float64 by
the tests' references.
"""
from __future__ import annotations

import torch


def rms_norm(z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``z * rsqrt(mean(z^2) + eps) * weight`` over the last dimension, in ``z``'s dtype (no rounding)."""
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + eps) * weight.to(z.dtype)


def add_rmsnorm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float,
                          dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, z)``: ``z = round(x + residual)`` (sum in fp32), ``out = round(RMSNorm(z) * weight)`` in fp32.

    Functional (nothing is written), so it compiles into one kernel with ``torch.compile``.

    Parameters
    ----------
    x : Tensor [..., hidden]
        May be an fp32 sum over ranks while ``residual`` has the output dtype.
    residual : Tensor or None
        ``None``: ``z = round(x)``.
    weight : Tensor [hidden] or None
        ``None``: no norm, ``out`` is ``z``.
    eps : float
    dtype : torch.dtype, optional
        The dtype ``z`` and ``out`` are rounded to; default ``x.dtype``.
    """
    z = x.float() if residual is None else x.float() + residual.float()
    z = z.to(dtype or x.dtype)
    if weight is None:
        return z, z
    return rms_norm(z.float(), weight, eps).to(z.dtype), z
