"""float64 references and comparison helpers shared by the CPU and GPU tests."""
from __future__ import annotations

import torch

from tokenweave.reference import rms_norm

# ||out - ref|| / ||ref|| bounds: bf16 / fp16 round z and out once each (unit roundoff 2^-9 / 2^-12).
REL_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def rank_inputs(seed: int, world: int, tokens: int, hidden: int, dtype, device):
    """Every rank's x, the residual and the norm weight, identical on every rank (same seeds)."""
    g = torch.Generator(device=device).manual_seed(seed)  # same device type -> same numbers on every rank
    xs = [torch.randn(tokens, hidden, generator=g, device=device).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, hidden, generator=g, device=device).to(dtype)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=g, device=device)).to(dtype)
    return xs, residual, weight


def reference(xs, residual, weight, eps):
    """z = sum(x) + residual and RMSNorm(z) * weight, in float64 without intermediate rounding."""
    z = torch.stack([x.double() for x in xs]).sum(0)
    if residual is not None:
        z = z + residual.double()
    out = None
    if weight is not None:
        out = rms_norm(z, weight, eps)
    return z, out


def rel_err(got, ref) -> float:
    got = got.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - ref).norm() / ref.norm().clamp_min(1e-30))


def fingerprint(t: torch.Tensor) -> int:
    """A position-sensitive checksum of the bits (equal bits -> equal value)."""
    bits = t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32).flatten().to(torch.int64)
    w = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64) % 65521 + 1
    return int((bits * w).sum().item())
