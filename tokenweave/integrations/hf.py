"""Drop-in tokenweave for HuggingFace transformers' tensor-parallel Llama-family models.

Load the model with transformers' own tensor parallelism (``DistributedConfig(tp_size=N)`` or
``tp_plan="auto"`` under torchrun), then::

    handle = tokenweave.integrations.hf.enable(model)
    logits = model(input_ids).logits      # row-parallel reductions + norms now run through tokenweave
    handle.disable()                      # back to transformers' own TP

What changes, per decoder layer: ``o_proj`` and ``down_proj`` return their partial sums instead
of all-reducing them; the all-reduce, the residual add and the following RMSNorm
(``post_attention_layernorm``, the next layer's ``input_layernorm``, or the final ``norm``) run
as one :func:`tokenweave.fused_allreduce_rmsnorm`. Attention, RoPE, masks and caches stay
transformers' own code. When the batch has at least two sequences and no KV cache is in use
(prefill), the tokens are split on sequence (batch-row) boundaries - transformers' attention
cannot cross a split - and the two parts are woven on two streams (:mod:`tokenweave.weave`).
Otherwise (decode with a cache, one sequence, a mask that cannot be sliced per row) only the
fusion applies.

Inference only (the patched forwards run under ``torch.no_grad``). Intermediate hidden states
(``output_hidden_states``) are not meaningful while enabled: the layers hand each other
normalised activations through the schedule, not through their return values.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tokenweave as tw
from tokenweave.split import (GemmShape, Split, SplitPolicy, TuningCache, device_name, device_sm_count,
                              policy_key, time_call_us)
from tokenweave import partition as sm_partitions
from tokenweave.weave import StreamPair, WovenPass

# Keyword arguments of a decoder layer that carry one row per sequence; sliced per part.
_BATCHED_KWARGS = ("attention_mask", "position_ids", "position_embeddings")
# Keyword arguments shared by every sequence (no batch dimension).
_SHARED_KWARGS = ("cache_position",)
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value")
# Norm layouts that are not ``weight * x / rms(x)`` or layers with norms tokenweave cannot fuse.
_UNSUPPORTED_LAYER_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def load_tp_model(path: str, tp_size: int, dtype=torch.float32, **kwargs):
    """Load ``AutoModelForCausalLM`` from ``path`` with transformers' tensor parallelism.

    Uses ``DistributedConfig(tp_size=...)`` where transformers has it (5.x), else ``tp_plan="auto"``.
    Must run under an initialised process group (torchrun or spawned ranks), on every rank.
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", tp_size=tp_size, dtype=dtype, **kwargs)
    return AutoModelForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(tp_size=tp_size),
                                                dtype=dtype, **kwargs)


def enable(model, comm=None, *, split: str | int = "auto", policy: SplitPolicy | None = None,
           max_tokens: int = 8192, sm_partition: str | int | None = None) -> "TokenWeaveHF":
    """Route a TP Llama-family model's row-parallel reductions and norms through tokenweave.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM (``model.model.layers``) or base model (``model.layers``) loaded with
        transformers' tensor parallelism; weights may be DTensors or local shards.
    comm : tokenweave.Communicator, optional
        Default: one created on the model's TP group (collective: every rank must call ``enable``).
    split : {"auto", "off"} or int
        ``"auto"``: the split policy decides (wave-aware, tuned buckets from the on-disk cache);
        ``"off"``: fusion only; an int ``k``: always split after the first ``k`` sequences
        (batch rows) when splitting is possible (for tests).
    policy : SplitPolicy, optional
    max_tokens : int
        Workspace size of a Communicator created here.
    sm_partition : {"auto", "off"} or int, optional
        SMs reserved for communication while split parts overlap (:mod:`tokenweave.partition`): ``"auto"``
        the tuned choice (none when untuned), ``"off"``, or a number of SMs. Default:
        ``TOKENWEAVE_SM_PARTITION``, else ``"auto"``.

    Returns
    -------
    TokenWeaveHF
        The handle; ``handle.disable()`` restores transformers' forwards.
    """
    return TokenWeaveHF(model, comm, split=split, policy=policy, max_tokens=max_tokens, sm_partition=sm_partition)


def disable(model) -> None:
    """Undo :func:`enable` on ``model`` (no-op if it is not enabled)."""
    handle = getattr(_base_model(model), "_tokenweave", None)
    if handle is not None:
        handle.disable()


def _base_model(model):
    return model.model if hasattr(model, "model") and hasattr(model.model, "layers") else model


def _local(t):
    """The local shard of a DTensor parameter, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _norm_eps(norm) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(norm, name, None)
        if isinstance(value, float):
            return value
    raise TypeError(f"tokenweave.integrations.hf: cannot find the epsilon of {type(norm).__name__}")


def _check_norm(norm, where):
    name = type(norm).__name__
    if "RMSNorm" not in name or "Gemma" in name or getattr(norm, "weight", None) is None:
        raise TypeError(f"tokenweave.integrations.hf: {where} is a {name}; only Llama-style RMSNorm "
                        "(weight * x / rms(x)) can be fused")


def _tp_group(model, weight):
    mesh = getattr(weight, "device_mesh", None)  # DTensor parameters know their (TP) mesh
    if mesh is None:
        mesh = getattr(model, "_device_mesh", None) or getattr(model, "device_mesh", None)
        if mesh is not None and getattr(mesh, "mesh_dim_names", None) and "tp" in mesh.mesh_dim_names:
            mesh = mesh["tp"]
    return mesh.get_group() if mesh is not None else dist.group.WORLD


@dataclass
class _Pass:
    """State of one forward while its layers run: the woven pass and how the batch is split."""

    woven: WovenPass
    batch: int
    seq_len: int
    part_rows: list  # (first, stop) batch rows per part
    split: Split
    part_kwargs: list | None = None  # the running layer's keyword arguments, per part
    next_layer: int = 0


class TokenWeaveHF:
    """Handle of an enabled model; see :func:`enable`."""

    def __init__(self, model, comm, *, split, policy, max_tokens, sm_partition=None):
        self.sm_partition = sm_partitions.resolve_switch(sm_partition)
        if not (split in ("auto", "off") or (isinstance(split, int) and split > 0)):
            raise ValueError(f"enable: split={split!r}; use 'auto', 'off' or a positive number of sequences")
        self.model = model
        self.base = _base_model(model)
        if getattr(self.base, "_tokenweave", None) is not None:
            raise RuntimeError("tokenweave is already enabled on this model; call disable() first")
        self.layers = list(self.base.layers)
        self.final_norm = self.base.norm
        self._check_structure()
        o_proj = self.layers[0].self_attn.o_proj
        local_in = _local(o_proj.weight).shape[1]
        self.tp = o_proj.in_features // local_in
        config = model.config
        self.hidden = config.hidden_size
        dtype = self.final_norm.weight.dtype
        if comm is None:
            comm = tw.Communicator(group=_tp_group(model, o_proj.weight), max_tokens=max_tokens, hidden=self.hidden,
                                   dtype=dtype)
            self._owns_comm = True
        else:
            self._owns_comm = False
        if comm.world_size != self.tp:
            raise ValueError(f"enable: the model is split over {self.tp} ranks but the communicator has "
                             f"{comm.world_size}")
        self.comm = comm
        self.rank = comm.rank
        self.split_mode = split
        self.streams = StreamPair(comm.device)
        sms = device_sm_count(comm.device)
        self.policy = policy or SplitPolicy(
            _gemms_from_config(config, self.tp), sms,
            policy_key(device_name=device_name(comm.device), sm_count=sms, world_size=self.tp,
                       transport=comm.transport, dtype=dtype, hidden=self.hidden, model=_config_signature(config)),
            cache=TuningCache())
        self.last_split: Split | None = None
        self._forced: Split | None = None
        self._pass: _Pass | None = None
        self._saved: list[tuple[Any, Any]] = []
        self._patch()
        self.base._tokenweave = self

    # ------------------------------------------------------------------ setup
    def _check_structure(self):
        for i, layer in enumerate(self.layers):
            for attr in ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm"):
                if not hasattr(layer, attr):
                    raise TypeError(f"tokenweave.integrations.hf: layer {i} ({type(layer).__name__}) has no {attr}: "
                                    "not a Llama-family decoder layer")
            for attr in _UNSUPPORTED_LAYER_NORMS:
                if hasattr(layer, attr):
                    raise TypeError(f"tokenweave.integrations.hf: layer {i} has {attr}; its norms cannot be fused")
            if not hasattr(layer.self_attn, "o_proj") or not hasattr(layer.mlp, "down_proj"):
                raise TypeError(f"tokenweave.integrations.hf: layer {i} lacks self_attn.o_proj or mlp.down_proj")
            _check_norm(layer.input_layernorm, f"layer {i} input_layernorm")
            _check_norm(layer.post_attention_layernorm, f"layer {i} post_attention_layernorm")
        _check_norm(self.final_norm, "the final norm")

    def _set_forward(self, module, fn):
        self._saved.append((module, module.__dict__.get("forward")))
        module.forward = fn

    def _patch(self):
        for idx, layer in enumerate(self.layers):
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                self._set_forward(proj, self._partial_linear(proj))
            self._set_forward(layer, self._layer_forward(idx, layer))
        # The last layer already returns RMSNorm(z) * final weight.
        self._set_forward(self.final_norm, lambda hidden_states: hidden_states)

    def _partial_linear(self, proj):
        weight = _local(proj.weight)
        if weight.shape[1] * self.tp != proj.in_features:
            raise TypeError(f"tokenweave.integrations.hf: {type(proj).__name__} weight shard {tuple(weight.shape)} "
                            f"is not a row-parallel shard of in_features={proj.in_features} over {self.tp} ranks")
        bias = None if proj.bias is None else _local(proj.bias)
        # The bias belongs to the reduced output: add it on one rank only, so the sum has it once.
        add_bias = bias is not None and self.rank == 0

        def forward(x):
            return F.linear(x, weight, bias if add_bias else None)

        return forward

    def disable(self):
        """Restore transformers' forwards (and close a Communicator created by :func:`enable`)."""
        for module, previous in reversed(self._saved):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._saved.clear()
        self.base._tokenweave = None
        if self._owns_comm:
            self.comm.close()

    # ------------------------------------------------------------------ per forward
    def tune(self, input_ids: torch.Tensor, *, force: bool = False, timer=None, **model_kwargs) -> Split:
        """Time a few splits of this batch shape (collective) and cache the best for its bucket.

        ``timer(fn) -> us`` times one call (default: eager, :func:`tokenweave.split.time_call_us`).
        ``model_kwargs`` go to the model call; ``use_cache`` defaults to False (splitting needs it).
        """
        batch, seq_len = input_ids.shape
        tokens = batch * seq_len
        model_kwargs.setdefault("use_cache", False)
        timer = timer or (lambda fn: time_call_us(fn, self.comm.device))

        def time_split(split: Split) -> float:
            self._forced = split
            try:
                with torch.no_grad():
                    return timer(lambda: self.model(input_ids, **model_kwargs))
            finally:
                self._forced = None

        return self.policy.tune(tokens, time_split, boundaries=[seq_len * i for i in range(1, batch)],
                                group=self.comm.group, device=self.comm.device, force=force,
                                partition_choices=sm_partitions.tuner_choices(self.comm.device, self.sm_partition),
                                partition_ok=lambda c: sm_partitions.available(self.comm.device, c))

    def _choose_split(self, batch, seq_len, splittable) -> Split:
        tokens = batch * seq_len
        if not splittable or batch < 2:
            return Split(tokens)
        if self._forced is not None:
            return self._forced
        if self.split_mode == "off":
            return Split(tokens)
        if isinstance(self.split_mode, int):
            rows = min(self.split_mode, batch - 1)
            return Split(tokens, rows * seq_len)
        return self.policy.choose(tokens, boundaries=[seq_len * i for i in range(1, batch)])

    def _begin(self, layer, hidden_states, named) -> _Pass:
        batch, seq_len, hidden = hidden_states.shape
        layer_kwargs = {k: v for k, v in named.items() if k != "hidden_states"}
        cache = next((named[k] for k in _CACHE_KWARGS if named.get(k) is not None), None)
        splittable = cache is None and _sliceable(layer_kwargs, batch)
        split = self._choose_split(batch, seq_len, splittable)
        if split.point is not None and split.point % seq_len:
            raise ValueError(f"tokenweave.integrations.hf: split point {split.point} is not on a sequence boundary "
                             f"(sequence length {seq_len})")
        self.last_split = split
        part_rows = [(a // seq_len, b // seq_len) for a, b in split.bounds]
        flat = hidden_states.reshape(batch * seq_len, hidden)
        residual = flat.clone()  # the caller's embeddings stay untouched
        normed = layer.input_layernorm(hidden_states).reshape(batch * seq_len, hidden).contiguous()
        woven = WovenPass(self.comm, normed, residual, split.bounds, streams=self.streams, ctas=split.ctas,
                          partition=sm_partitions.partition_for(self.comm.device, self.sm_partition, split))
        return _Pass(woven, batch, seq_len, part_rows, split)

    def _layer_forward(self, idx, layer):
        signature = inspect.signature(type(layer).forward)
        last = len(self.layers) - 1
        after_mlp = self.layers[idx + 1].input_layernorm if idx < last else self.final_norm
        post_eps, after_eps = _norm_eps(layer.post_attention_layernorm), _norm_eps(after_mlp)

        def attention(part, rows):
            p = self._pass
            a, b = p.part_rows[part]
            out = layer.self_attn(hidden_states=rows.view(b - a, p.seq_len, -1), **p.part_kwargs[part])
            out = out[0] if isinstance(out, tuple) else out
            return out.reshape(rows.shape)

        def mlp(part, rows):
            return layer.mlp(rows)

        def forward(hidden_states, *args, **kwargs):
            named = _named_arguments(signature, layer, hidden_states, args, kwargs)
            with torch.no_grad():
                if idx == 0:
                    self._pass = self._begin(layer, hidden_states, named)
                p = self._pass
                if p is None or p.next_layer != idx:
                    raise RuntimeError(f"tokenweave.integrations.hf: layer {idx} ran out of order")
                # per layer: masks and rotary tables may differ between layers (sliding-window layers)
                layer_kwargs = {k: v for k, v in named.items() if k != "hidden_states"}
                if len(p.part_rows) > 1 and not _sliceable(layer_kwargs, p.batch):
                    raise RuntimeError(f"tokenweave.integrations.hf: layer {idx} got arguments that cannot be split "
                                       "per sequence although layer 0's could; use split='off'")
                p.part_kwargs = [layer_kwargs if len(p.part_rows) == 1 else
                                 _slice_kwargs(layer_kwargs, a, b, p.batch) for a, b in p.part_rows]
                p.woven.stage(attention, layer.post_attention_layernorm.weight, post_eps)
                p.woven.stage(mlp, after_mlp.weight, after_eps)
                p.next_layer += 1
                if idx < last:
                    return hidden_states  # placeholder: the next layer reads the schedule, not this
                out = p.woven.finish()
                self._pass = None
                return out.view(p.batch, p.seq_len, -1)

        return forward


def _named_arguments(signature, layer, hidden_states, args, kwargs) -> dict:
    """The layer call's arguments by name (positional ones too), ``**kwargs`` flattened."""
    bound = signature.bind_partial(layer, hidden_states, *args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        param = signature.parameters[name]
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif param.kind is not inspect.Parameter.VAR_POSITIONAL and name != "self":
            named[name] = value
    return named


def _rows(value, batch):
    """How a keyword argument relates to the batch: 'batched', 'shared' or 'unknown'."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return "shared"
    if isinstance(value, torch.Tensor):
        if value.dim() >= 1 and value.shape[0] == batch:
            return "batched"
        if value.dim() >= 1 and value.shape[0] == 1:
            return "shared"
        return "unknown"
    if isinstance(value, (tuple, list)):
        kinds = {_rows(v, batch) for v in value}
        return kinds.pop() if len(kinds) == 1 else "unknown"
    return "unknown"


def _sliceable(kwargs, batch) -> bool:
    for name, value in kwargs.items():
        if name in _SHARED_KWARGS or name in _CACHE_KWARGS:
            continue
        kind = _rows(value, batch)
        if kind == "unknown" or (kind == "batched" and name not in _BATCHED_KWARGS):
            return False  # a per-row argument we do not know how to slice, or a mask we cannot slice
    return True


def _slice_kwargs(kwargs, first, stop, batch) -> dict:
    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            return value[first:stop]
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return {k: (cut(v) if k in _BATCHED_KWARGS else v) for k, v in kwargs.items()}


def _config_signature(config) -> str:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return (f"{config.model_type}-h{config.hidden_size}-q{config.num_attention_heads}-kv{kv}-d{head_dim}"
            f"-i{config.intermediate_size}")


def _gemms_from_config(config, tp: int) -> Sequence[GemmShape]:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    q_cols, kv_cols = config.num_attention_heads * head_dim // tp, kv * head_dim // tp
    inter = config.intermediate_size // tp
    h = config.hidden_size
    # transformers runs q, k, v and gate, up as separate GEMMs
    return [GemmShape(q_cols, h), GemmShape(kv_cols, h), GemmShape(kv_cols, h), GemmShape(h, q_cols),
            GemmShape(inter, h), GemmShape(inter, h), GemmShape(h, inter)]
