"""A HuggingFace Llama-family model with and without tokenweave: latency and max logit difference.

    torchrun --nproc-per-node 4 python/run_hf.py                           # Llama-3-8B dims, 4 layers, bf16
    torchrun --nproc-per-node 2 python/run_hf.py --size 70b --layers 2 --batch 8 --seq-len 1024
    torchrun --nproc-per-node 2 python/run_hf.py --size tiny --dtype fp32   # CPU too (gloo)

Random weights from a config (no hub access): rank 0 builds the model and saves it to
``--model-dir`` (a temporary directory by default), then every rank loads it with transformers' own
tensor parallelism. Timed: a prefill forward (``use_cache=False``) with transformers' TP, with
tokenweave fusion only, and with tokenweave fusion + token splitting (on sequence boundaries).
Logits are compared with transformers' TP output.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

try:
    import tokenweave  # noqa: F401
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from tokenweave.bench import harness
from tokenweave.split import time_call_us

SIZES = {  # hidden, intermediate, heads, kv heads, vocab
    "70b": (8192, 28672, 64, 8, 128256),
    "8b": (4096, 14336, 32, 8, 128256),
    "tiny": (64, 128, 4, 2, 96),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_random_model(path: str, size: str, layers: int, dtype, device) -> None:
    """Save a Llama with random weights (norm weights too, so a wrong norm shows) to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
                         max_position_embeddings=16384, rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):  # initialise on the GPU when there is one: a 70B-wide layer is slow on CPU
        model = LlamaForCausalLM(config).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)


def worker(args, model_dir) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    temporary = model_dir is None
    shared = [tempfile.mkdtemp(prefix="tokenweave_hf_") if temporary and rank == 0 else model_dir]
    dist.broadcast_object_list(shared, src=0)  # every rank loads what rank 0 saved
    model_dir = shared[0]
    if rank == 0 and not (Path(model_dir) / "config.json").exists():
        build_random_model(model_dir, args.size, args.layers, dtype, device)
    dist.barrier()
    try:
        _compare(args, model_dir, rank, world, device, dtype)
    finally:
        dist.barrier()
        if temporary and rank == 0:
            shutil.rmtree(model_dir, ignore_errors=True)


def _compare(args, model_dir, rank, world, device, dtype) -> None:
    from tokenweave.integrations import hf

    model = hf.load_tp_model(model_dir, world, dtype=dtype)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1)).to(device)

    def timed(label):
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits.float()
            us = time_call_us(lambda: model(ids, use_cache=False), device, warmup=2, iters=args.iters)
        t = torch.tensor([us], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return label, float(t.item()), logits

    results = [timed("transformers TP")]
    handle = hf.enable(model, split="off")
    results.append(timed("tokenweave fuse only"))
    handle.split_mode = "auto"
    if args.tune:
        handle.tune(ids)
    results.append(timed("tokenweave fuse + split"))
    split = handle.last_split
    handle.disable()
    if rank == 0:
        reference, base_us = results[0][2], results[0][1]
        tokens = args.batch * args.seq_len
        print(f"{model.config.model_type} ({args.size} dims, {args.layers} layers, {args.dtype}) TP{world} on "
              f"{harness.device_slug()}, {args.batch} x {args.seq_len} = {tokens} tokens, split at {split.point}")
        for label, us, logits in results:
            diff = float((logits - reference).abs().max())
            print(f"{label:>26}: {us / 1e3:9.3f} ms  ({base_us / us:.2f}x)  max |logit diff| vs transformers TP "
                  f"{diff:.3e}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="8b")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--batch", type=int, default=8, help="sequences (splits fall between them)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--tune", action="store_true", help="tune the split for this batch shape first")
    parser.add_argument("--model-dir", default=None, help="where the random model is saved / reused")
    parser.add_argument("--tp", type=int, default=None, help="ranks to spawn when not under torchrun")
    args = parser.parse_args(argv)
    on_gpu = torch.cuda.is_available() and torch.cuda.device_count() > 0
    world = args.tp or (torch.cuda.device_count() if on_gpu else 2)
    harness.spawn(worker, world, "nccl" if on_gpu else "gloo", args, args.model_dir)


if __name__ == "__main__":
    main()
