"""Reference tensor-parallel Llama decoder stack, with tokenweave's modes.

Tokens are flattened: ``x`` is ``[T, hidden]`` holding several sequences back to back (lengths
``seq_lens``); attention is causal within each sequence. Weights are Megatron-style shards:
column-parallel QKV and gate_up (this rank's heads / intermediate columns), row-parallel O and
down (their inputs are this rank's shard, their outputs partial sums). The layer follows vLLM's
``(hidden, residual)`` convention with the all-reduce deferred into the next norm: a stage
returns a partial sum, and the reduction, residual add and RMSNorm happen together.

Modes (:data:`MODES`)
    ``baseline``      torch.distributed all_reduce (NCCL) + torch.compile'd add+RMSNorm (compiled on CUDA only)
    ``fuse_only``     :func:`tokenweave.fused_allreduce_rmsnorm`
    ``tokenweave``    fused op + token split overlapped on two streams (:mod:`tokenweave.weave`), on an SM
                      partition (:mod:`tokenweave.partition`) when the switch or the tuner asks for one
    ``comm_removed``  as baseline without the all-reduce: wrong results, for measurement only

Weights are random and generated shard by shard from seeds that depend only on (seed, layer,
tensor, shard index), so every rank builds its shard independently and :func:`reference_forward`
rebuilds the full tensors in one process for a float64 check.

Splits may cut through a sequence: the second part's piece of that sequence attends to the K/V the
first part computed for it in the same layer (kept in a per-layer carry; part A always runs its
attention before part B on the compute stream), with a lower-right-aligned causal mask.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import tokenweave as tw
from tokenweave.split import (GemmShape, Split, SplitPolicy, TuningCache, device_name, device_sm_count,
                              policy_key, time_call_us)
from tokenweave import partition as sm_partitions
from tokenweave.reference import add_rmsnorm_reference, rms_norm
from tokenweave.weave import StreamPair, SymmetricRows, run_stages

MODES = ("baseline", "fuse_only", "tokenweave", "comm_removed")


@dataclass(frozen=True)
class LlamaShape:
    """Sizes of one Llama decoder layer (whole model, not per rank)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    rope_theta: float = 500000.0
    eps: float = 1e-5

    def check_tp(self, tp: int) -> None:
        for name, value in (("heads", self.heads), ("kv_heads", self.kv_heads), ("intermediate", self.intermediate)):
            if value % tp:
                raise ValueError(f"LlamaShape: {name}={value} is not divisible by the TP size {tp}")

    def gemms(self, tp: int) -> list[GemmShape]:
        """The layer's four GEMMs per rank: QKV, O, gate_up, down."""
        q_cols, kv_cols = self.heads * self.head_dim // tp, self.kv_heads * self.head_dim // tp
        return [GemmShape(q_cols + 2 * kv_cols, self.hidden), GemmShape(self.hidden, q_cols),
                GemmShape(2 * self.intermediate // tp, self.hidden), GemmShape(self.hidden, self.intermediate // tp)]

    @property
    def signature(self) -> str:
        return f"llama-h{self.hidden}-q{self.heads}-kv{self.kv_heads}-d{self.head_dim}-i{self.intermediate}"


LLAMA3_70B = LlamaShape(hidden=8192, heads=64, kv_heads=8, head_dim=128, intermediate=28672)
LLAMA3_8B = LlamaShape(hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336)
TINY = LlamaShape(hidden=64, heads=4, kv_heads=2, head_dim=16, intermediate=96, rope_theta=10000.0)


# --------------------------------------------------------------------------- weights
def _seeded_randn(seed: int, tag: str, shape, device, dtype, std: float) -> torch.Tensor:
    """Normal(0, std) values that depend only on (seed, tag), generated on ``device``."""
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{seed}/{tag}".encode()) + seed)
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std).to(dtype)


def layer_shards(shape: LlamaShape, tp: int, rank: int, layer: int, seed: int, device, dtype) -> dict:
    """This rank's weight shards of one layer.

    Returns
    -------
    dict
        ``q, k, v`` [heads_or_kv_local * head_dim, hidden]; ``gate, up`` [intermediate / tp, hidden];
        ``o`` [hidden, heads * head_dim / tp]; ``down`` [hidden, intermediate / tp];
        ``input_norm, post_norm`` [hidden] (replicated). Std 1/sqrt(fan_in) keeps activations O(1).
    """
    d, h = shape.head_dim, shape.hidden
    hq, hkv, inter = shape.heads // tp, shape.kv_heads // tp, shape.intermediate // tp

    def rnd(name, rows, cols, fan_in, shard=True):
        tag = f"L{layer}/{name}/tp{tp}/{rank if shard else 'all'}"
        return _seeded_randn(seed, tag, (rows, cols), device, dtype, 1.0 / math.sqrt(fan_in))

    def norm_weight(name):
        return (1.0 + 0.2 * _seeded_randn(seed, f"L{layer}/{name}", (h,), device, torch.float32, 1.0)).to(dtype)

    return {
        "q": rnd("q", hq * d, h, h), "k": rnd("k", hkv * d, h, h), "v": rnd("v", hkv * d, h, h),
        "o": rnd("o", h, hq * d, shape.heads * d),
        "gate": rnd("gate", inter, h, h), "up": rnd("up", inter, h, h),
        "down": rnd("down", h, inter, shape.intermediate),
        "input_norm": norm_weight("input_norm"), "post_norm": norm_weight("post_norm"),
    }


def final_norm_weight(shape: LlamaShape, seed: int, device, dtype) -> torch.Tensor:
    return (1.0 + 0.2 * _seeded_randn(seed, "final_norm", (shape.hidden,), device, torch.float32, 1.0)).to(dtype)


def random_hidden_states(tokens: int, hidden: int, seed: int, device, dtype) -> torch.Tensor:
    """Input embeddings, identical on every rank."""
    return _seeded_randn(seed, f"x/{tokens}", (tokens, hidden), device, dtype, 1.0)


# --------------------------------------------------------------------------- token layout
@dataclass(frozen=True)
class _Segment:
    """The rows of one sequence inside one part."""

    start: int           # first row, relative to the part
    length: int
    first_position: int  # position within its sequence of the first row (> 0: continues a carry)
    continues: bool      # the sequence goes on in the next part


@dataclass(frozen=True)
class _AttentionGroup:
    """Rows attended in one SDPA call: ``count`` back-to-back fresh sequences of ``length`` each,
    or one segment continuing a sequence from the previous part (``carried``)."""

    start: int
    count: int
    length: int
    carried: bool


class TokenLayout:
    """Sequences, positions and the split of one forward: everything host-side, built once per
    shape (before CUDA-graph capture: it copies positions to the device).

    Parameters
    ----------
    seq_lens : sequence of int
    split : Split
    shape : LlamaShape
    device : torch.device
    """

    def __init__(self, seq_lens: Sequence[int], split: Split, shape: LlamaShape, device, *,
                 _rope: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.seq_lens = [int(n) for n in seq_lens]
        if not self.seq_lens or min(self.seq_lens) < 1:
            raise ValueError(f"TokenLayout: sequence lengths must be >= 1, got {seq_lens}")
        self.tokens = sum(self.seq_lens)
        if split.tokens != self.tokens:
            raise ValueError(f"TokenLayout: split is for {split.tokens} tokens but the sequences hold {self.tokens}")
        self.split = split
        self.bounds = split.bounds
        if len(self.bounds) > 2:
            raise ValueError("TokenLayout: at most two parts (a sequence may only be carried once)")
        self._shape, self._device = shape, device
        self._rope = _rope if _rope is not None else _rope_tables(self.seq_lens, shape, device)
        cos, sin = self._rope
        self.cos = [cos[a:b] for a, b in self.bounds]
        self.sin = [sin[a:b] for a, b in self.bounds]
        self.segments = [self._segments(a, b) for a, b in self.bounds]
        self.groups = [_group(segs) for segs in self.segments]

    @property
    def boundaries(self) -> list[int]:
        """Row offsets where a sequence starts (excluding 0)."""
        return _boundaries(self.seq_lens)

    def unsplit(self) -> "TokenLayout":
        """The same tokens as one part, sharing the device tables (no copies: safe during capture)."""
        if not self.split.is_split:
            return self
        return TokenLayout(self.seq_lens, Split(self.tokens), self._shape, self._device, _rope=self._rope)

    def _segments(self, a: int, b: int) -> list[_Segment]:
        segs, seq_start = [], 0
        for n in self.seq_lens:
            s, e = max(seq_start, a), min(seq_start + n, b)
            if s < e:
                segs.append(_Segment(s - a, e - s, s - seq_start, e < seq_start + n))
            seq_start += n
        return segs


def _rope_tables(seq_lens, shape: LlamaShape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, head_dim] float32 for positions restarting at 0 in every sequence (rotate-half, as HF Llama)."""
    positions = torch.cat([torch.arange(n) for n in seq_lens])
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, shape.head_dim, 2, dtype=torch.float64) / shape.head_dim))
    angles = positions.double()[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device=device, dtype=torch.float32), angles.sin().to(device=device, dtype=torch.float32)


def _group(segments: list[_Segment]) -> list[_AttentionGroup]:
    groups: list[_AttentionGroup] = []
    for seg in segments:
        if seg.first_position > 0:
            groups.append(_AttentionGroup(seg.start, 1, seg.length, carried=True))
            continue
        last = groups[-1] if groups else None
        if last is not None and not last.carried and last.length == seg.length \
                and last.start + last.count * last.length == seg.start:
            groups[-1] = _AttentionGroup(last.start, last.count + 1, last.length, carried=False)
        else:
            groups.append(_AttentionGroup(seg.start, 1, seg.length, carried=False))
    return groups


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rope(x, cos, sin):
    """x [t, heads, d]; cos/sin [t, d] float32. Rotation in float32, result in x's dtype."""
    xf = x.float()
    return (xf * cos[:, None, :] + _rotate_half(xf) * sin[:, None, :]).to(x.dtype)


_compiled_rope = None


def _rope_for(device: torch.device):
    """RoPE as one fused kernel on CUDA (torch.compile; eager it is ~8 memory passes), eager elsewhere.

    Every mode uses it, so it does not bias the comparison; it only keeps an unrealistically slow
    RoPE from diluting what communication costs. Dynamic shapes: parts come in many sizes.
    """
    global _compiled_rope
    if device.type != "cuda":
        return _apply_rope
    if _compiled_rope is None:
        _compiled_rope = torch.compile(_apply_rope, dynamic=True)
    return _compiled_rope


# --------------------------------------------------------------------------- norms for the torch modes
_compiled_add_rmsnorm = None
# Static shapes compile one kernel per token count; a benchmark sweeps ~15 of them, more than
# dynamo's default recompile limit (8), after which it would silently fall back to eager.
_RECOMPILE_LIMIT = 64


def _add_rmsnorm_for(device: torch.device):
    """The torch.compile'd add+RMSNorm on CUDA (one fused Triton kernel per shape), eager elsewhere."""
    global _compiled_add_rmsnorm
    if device.type != "cuda":
        return add_rmsnorm_reference
    if _compiled_add_rmsnorm is None:
        import torch._dynamo.config as dynamo_config

        for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch releases
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), _RECOMPILE_LIMIT))
                break
        _compiled_add_rmsnorm = torch.compile(add_rmsnorm_reference, fullgraph=True, dynamic=False)
    return _compiled_add_rmsnorm


# --------------------------------------------------------------------------- the model
class TPLlamaLayer:
    """One decoder layer's shards on this rank and its two stages (attention, MLP)."""

    def __init__(self, shape: LlamaShape, tp: int, rank: int, layer: int, seed: int, device, dtype):
        w = layer_shards(shape, tp, rank, layer, seed, device, dtype)
        self.shape = shape
        self.heads, self.kv_heads = shape.heads // tp, shape.kv_heads // tp
        self.rank = rank
        self.qkv = torch.cat([w["q"], w["k"], w["v"]]).contiguous()
        self.gate_up = torch.cat([w["gate"], w["up"]]).contiguous()
        self.o, self.down = w["o"].contiguous(), w["down"].contiguous()
        self.input_norm, self.post_norm = w["input_norm"], w["post_norm"]
        self._kv_carry = None  # (k, v) [1, kv_heads, L, d] of a sequence continuing into the next part

    def attention(self, part: int, x: torch.Tensor, layout: TokenLayout, out: torch.Tensor | None = None) -> torch.Tensor:
        """Partial sum (this rank's heads) of the attention output projection for ``x`` [t, hidden] (into ``out``
        if given)."""
        d, hq, hkv = self.shape.head_dim, self.heads, self.kv_heads
        t = x.shape[0]
        q, k, v = torch.split(x @ self.qkv.t(), [hq * d, hkv * d, hkv * d], dim=-1)
        rope = _rope_for(x.device)
        q = rope(q.view(t, hq, d), layout.cos[part], layout.sin[part])
        k = rope(k.view(t, hkv, d), layout.cos[part], layout.sin[part])
        v = v.view(t, hkv, d)
        outs = []
        for g in layout.groups[part]:
            rows = slice(g.start, g.start + g.count * g.length)

            def heads_first(z, n_heads):  # [rows, heads, d] -> [count, heads, length, d]
                return z[rows].view(g.count, g.length, n_heads, d).transpose(1, 2)

            qg, kg, vg = heads_first(q, hq), heads_first(k, hkv), heads_first(v, hkv)
            if g.carried:
                outs.append(self._attend_after_carry(qg, kg, vg))
            else:
                outs.append(F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=hq != hkv))
        last = layout.segments[part][-1]
        if last.continues:
            seg = slice(last.start, last.start + last.length)
            self._kv_carry = (k[seg].transpose(0, 1).unsqueeze(0), v[seg].transpose(0, 1).unsqueeze(0))
        # [count, heads, length, d] per group -> rows [t, heads * d]
        rows = [o.transpose(1, 2).reshape(-1, hq * d) for o in outs]
        attn = rows[0] if len(rows) == 1 else torch.cat(rows, dim=0)
        return torch.matmul(attn, self.o.t(), out=out)

    def _attend_after_carry(self, q, k, v):
        """Attention of a sequence's continuation: keys are the carried prefix plus its own rows,
        queries are the last rows (lower-right causal alignment)."""
        if self._kv_carry is None:
            raise RuntimeError("TPLlamaLayer: a part continues a sequence but the previous part left no K/V carry")
        k_prev, v_prev = self._kv_carry
        self._kv_carry = None
        k = torch.cat([k_prev, k], dim=2)
        v = torch.cat([v_prev, v], dim=2)
        groups = self.heads // self.kv_heads
        if groups > 1:  # the lower-right path of SDPA does not take enable_gqa on every backend
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))

    def mlp(self, part: int, x: torch.Tensor, layout: TokenLayout, out: torch.Tensor | None = None) -> torch.Tensor:
        """Partial sum of the MLP down projection for ``x`` [t, hidden] (into ``out`` if given)."""
        gate, up = (x @ self.gate_up.t()).chunk(2, dim=-1)
        return torch.matmul(F.silu(gate) * up, self.down.t(), out=out)


class TPLlamaStack:
    """A stack of :class:`TPLlamaLayer` plus the final norm, run in one of :data:`MODES`.

    Parameters
    ----------
    comm : tokenweave.Communicator
        Its group is the TP group; its device is where the weights live.
    shape : LlamaShape
    num_layers : int
    dtype : torch.dtype
    seed : int
        Same on every rank.
    allow_split_inside_sequence : bool
        Let splits cut through a sequence (attention crosses via the K/V carry); when False,
        splits fall on sequence boundaries.
    policy : SplitPolicy, optional
        Default: a wave-aware policy keyed to this device, TP size, transport, dtype and shape.
    sm_partition : {"auto", "off"} or int, optional
        SMs reserved for communication while the split overlaps it (:mod:`tokenweave.partition`):
        ``"auto"`` the tuned choice of the token bucket (none when untuned), ``"off"`` never, an int that
        many SMs for every split. Default: ``TOKENWEAVE_SM_PARTITION``, else ``"auto"``.
    symmetric_rows : bool
        On the ``p2p`` / ``multimem`` transports, allocate the stages' partial sums and outputs in the
        communicator's symmetric memory (:class:`tokenweave.weave.SymmetricRows`, two buffers of ``max_tokens`` x
        hidden, collective) so that the dispatcher may run the lean two-shots on them, and keep the residual
        sharded for each part it runs lean on. Default True.
    max_tokens : int, optional
        Rows of those buffers (default: the communicator's workspace in rows of this hidden size); larger
        forwards run without them.
    """

    def __init__(self, comm, shape: LlamaShape, num_layers: int, *, dtype=torch.bfloat16, seed: int = 0,
                 allow_split_inside_sequence: bool = True, policy: SplitPolicy | None = None,
                 sm_partition: str | int | None = None, symmetric_rows: bool = True, max_tokens: int | None = None):
        self.comm = comm
        self.device = comm.device
        self.tp, self.rank = comm.world_size, comm.rank
        shape.check_tp(self.tp)
        self.shape, self.dtype, self.seed = shape, dtype, seed
        self.layers = [TPLlamaLayer(shape, self.tp, self.rank, i, seed, self.device, dtype) for i in range(num_layers)]
        self.final_norm = final_norm_weight(shape, seed, self.device, dtype)
        self.rows = None
        if symmetric_rows and comm.transport in ("p2p", "multimem") and self.tp > 1:
            row_bytes = shape.hidden * torch.empty((), dtype=dtype).element_size()
            self.rows = SymmetricRows(comm, max_tokens or max(1, comm.capacity_bytes // row_bytes), shape.hidden, dtype)
        self.allow_split_inside_sequence = allow_split_inside_sequence
        self.streams = StreamPair(self.device)
        self.sm_partition = sm_partitions.resolve_switch(sm_partition)
        sms = device_sm_count(self.device)
        self.policy = policy or SplitPolicy(
            shape.gemms(self.tp), sms,
            policy_key(device_name=device_name(self.device), sm_count=sms, world_size=self.tp,
                       transport=comm.transport, dtype=dtype, hidden=shape.hidden, model=shape.signature),
            cache=TuningCache())

    # ------------------------------------------------------------------ planning
    def plan(self, seq_lens: Sequence[int], split: Split | int | None | str = "auto") -> TokenLayout:
        """The host-side layout of one forward.

        ``split``: ``"auto"`` (the policy's choice), a :class:`Split`, a split point (int), or
        ``None`` (no split).
        """
        tokens = sum(seq_lens)
        if isinstance(split, str):
            if split != "auto":
                raise ValueError(f"plan: split={split!r}; use 'auto', a Split, an int point or None")
            split = self.policy.choose(tokens, None if self.allow_split_inside_sequence else
                                       _boundaries(seq_lens))
        elif split is None:
            split = Split(tokens)
        elif isinstance(split, int):
            split = Split(tokens, split)
        return TokenLayout(seq_lens, split, self.shape, self.device)

    def tune(self, seq_lens: Sequence[int], *, force: bool = False, timer=None) -> Split:
        """Time a few splits of this token count (collective), cache the best; see :meth:`SplitPolicy.tune`.

        ``timer(fn) -> us`` times one call of ``fn`` (default: eager, :func:`time_call_us`); pass a
        CUDA-graph timer to tune for graph-captured serving.
        """
        x = random_hidden_states(sum(seq_lens), self.shape.hidden, self.seed + 1, self.device, self.dtype)
        timer = timer or (lambda fn: time_call_us(fn, self.device))

        def time_split(split: Split) -> float:
            layout = TokenLayout(seq_lens, split, self.shape, self.device)
            return timer(lambda: self.forward(x, layout, "tokenweave"))

        boundaries = None if self.allow_split_inside_sequence else _boundaries(seq_lens)
        return self.policy.tune(sum(seq_lens), time_split, boundaries=boundaries, group=self.comm.group,
                                device=self.device, force=force,
                                partition_choices=sm_partitions.tuner_choices(self.device, self.sm_partition),
                                partition_ok=lambda c: sm_partitions.available(self.device, c))

    # ------------------------------------------------------------------ forward
    def stages(self, layout: TokenLayout):
        """``[(stage_fn, weight of the norm after it), ...]`` for the whole stack."""
        out = []
        for i, layer in enumerate(self.layers):
            after_mlp = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            out.append((lambda part, rows, out=None, layer=layer: layer.attention(part, rows, layout, out),
                        layer.post_norm))
            out.append((lambda part, rows, out=None, layer=layer: layer.mlp(part, rows, layout, out), after_mlp))
        return out

    def forward(self, x: torch.Tensor, layout: TokenLayout, mode: str = "tokenweave") -> torch.Tensor:
        """Final normalised hidden states [T, hidden] for input embeddings ``x`` (not modified).

        In ``tokenweave`` mode the layout's split is used, on the SM partition the switch
        (``sm_partition``) and the split's tuned ``comm_sms`` select; the other modes ignore both (one part).
        """
        if mode not in MODES:
            raise ValueError(f"forward: mode={mode!r}; use one of {MODES}")
        if x.shape != (layout.tokens, self.shape.hidden):
            raise ValueError(f"forward: x has shape {tuple(x.shape)}, the layout expects "
                             f"{(layout.tokens, self.shape.hidden)}")
        if mode != "tokenweave":
            layout = layout.unsplit()
        eps = self.shape.eps
        residual = x.clone()
        h = tw.add_rmsnorm(x, None, self.layers[0].input_norm, eps)
        stages = self.stages(layout)
        if mode in ("fuse_only", "tokenweave"):
            part = sm_partitions.partition_for(self.device, self.sm_partition, layout.split)
            return run_stages(self.comm, stages, h, residual, layout.bounds, eps, streams=self.streams,
                              ctas=layout.split.ctas, partition=part, rows=self.rows, sharded_residual=True)
        add_rmsnorm = _add_rmsnorm_for(self.device)
        for fn, weight in stages:
            partial = fn(0, h)
            if mode == "baseline":
                dist.all_reduce(partial, group=self.comm.group)
            h, residual = add_rmsnorm(partial, residual, weight, eps)
        return h

    # ------------------------------------------------------------------ measurement helpers
    def run_modes(self, seq_lens: Sequence[int], *, timer=None, modes: Sequence[str] = MODES,
                  split: Split | int | None | str = "auto", seed: int = 1) -> dict:
        """Run each mode on the same random input (collective).

        Returns
        -------
        dict
            ``{"input": Tensor, "split": Split, "outputs": {mode: Tensor}, "us": {mode: float}}``;
            ``us`` only when a ``timer(fn) -> microseconds`` is given (e.g. the bench harness'
            ``time_cuda_graph``).
        """
        x = random_hidden_states(sum(seq_lens), self.shape.hidden, seed, self.device, self.dtype)
        woven = self.plan(seq_lens, split)
        result = {"input": x, "split": woven.split, "outputs": {}, "us": {}}
        for mode in modes:
            layout = woven if mode == "tokenweave" else woven.unsplit()
            result["outputs"][mode] = self.forward(x, layout, mode)
            if timer is not None:
                result["us"][mode] = timer(lambda layout=layout, mode=mode: self.forward(x, layout, mode))
        return result


def prefill_sequences(tokens: int, seq_len: int) -> list[int]:
    """``tokens`` as back-to-back sequences of ``seq_len`` (the last one shorter if needed)."""
    full, rest = divmod(tokens, seq_len)
    return [seq_len] * full + ([rest] if rest else [])


def relative_difference(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64."""
    ref = ref.double()
    return float((got.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def _boundaries(seq_lens: Sequence[int]) -> list[int]:
    out, acc = [], 0
    for n in list(seq_lens)[:-1]:
        acc += n
        out.append(acc)
    return out


# --------------------------------------------------------------------------- float64 reference
def reference_forward(shape: LlamaShape, num_layers: int, tp: int, seed: int, x: torch.Tensor,
                      seq_lens: Sequence[int], dtype) -> torch.Tensor:
    """The unsplit model in one process in float64, from the same (rounded to ``dtype``) weights.

    ``x`` [T, hidden] input embeddings (any dtype; used as float64). Returns float64 [T, hidden].
    """
    device = x.device
    d = shape.head_dim
    f64 = torch.float64
    shards = [[layer_shards(shape, tp, r, i, seed, device, dtype) for r in range(tp)] for i in range(num_layers)]

    def full(layer, name, dim):
        return torch.cat([s[name] for s in shards[layer]], dim=dim).to(f64)

    positions = torch.cat([torch.arange(n, device=device) for n in seq_lens]).to(f64)
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, d, 2, device=device, dtype=f64) / d))
    angles = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    groups = shape.heads // shape.kv_heads

    residual = x.to(f64)
    h = rms_norm(residual, shards[0][0]["input_norm"], shape.eps)
    for i in range(num_layers):
        t = h.shape[0]
        q = (h @ full(i, "q", 0).t()).view(t, shape.heads, d)
        k = (h @ full(i, "k", 0).t()).view(t, shape.kv_heads, d)
        v = (h @ full(i, "v", 0).t()).view(t, shape.kv_heads, d)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        outs, start = [], 0
        for n in seq_lens:
            qs, ks, vs = (z[start:start + n].transpose(0, 1) for z in (q, k, v))
            scores = qs @ ks.transpose(-1, -2) / math.sqrt(d)
            mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            outs.append((probs @ vs).transpose(0, 1).reshape(n, -1))
            start += n
        residual = residual + torch.cat(outs) @ full(i, "o", 1).t()
        h = rms_norm(residual, shards[i][0]["post_norm"], shape.eps)
        gate, up = h @ full(i, "gate", 0).t(), h @ full(i, "up", 0).t()
        residual = residual + (F.silu(gate) * up) @ full(i, "down", 1).t()
        after = shards[i + 1][0]["input_norm"] if i + 1 < num_layers else final_norm_weight(shape, seed, device, dtype)
        h = rms_norm(residual, after, shape.eps)
    return h
