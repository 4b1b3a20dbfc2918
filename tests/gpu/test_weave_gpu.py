"""Token splitting on GPUs: every mode of the reference stack against float64, CUDA-graph replay of
the tokenweave mode with new inputs, the tuner, and the HuggingFace drop-in at a real layer size.

Run with ``pytest -m gpu tests/gpu/test_weave_gpu.py``; each test spawns its own NCCL ranks and skips
when there are fewer GPUs than it needs.
"""
import os

import pytest
import torch

from dist_utils import run_workers
from tokenweave.partition import PARTITION_CHOICES

pytestmark = pytest.mark.gpu

# Llama-3-8B layer dimensions: real GEMM and attention shapes, a float64 reference that fits.
SEED = 5
LAYERS = 2
SEQ_LENS = [700, 1024, 324, 900, 100]  # 3048 tokens: boundaries at 700, 1724, 2048, 2948
SPLITS = [None, 1724, 1536, 2048, 1280]  # a boundary, and cuts through sequences (K/V carried)
BF16_REL_TOL = 3e-2  # a few bf16 roundings per layer, relative to the output's norm


def _need(gpus):
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")


def _stack(world, layers=LAYERS, **kw):
    import tokenweave as tw
    from tokenweave.models.llama import LLAMA3_8B, TPLlamaStack

    comm = tw.Communicator(max_tokens=4096, hidden=LLAMA3_8B.hidden, dtype=torch.bfloat16)
    return comm, TPLlamaStack(comm, LLAMA3_8B, layers, dtype=torch.bfloat16, seed=SEED, **kw)


def _modes_vs_float64(rank, world):
    from tokenweave.models.llama import LLAMA3_8B, MODES, random_hidden_states, reference_forward, relative_difference
    from tokenweave.split import Split

    comm, stack = _stack(world)
    x = random_hidden_states(sum(SEQ_LENS), LLAMA3_8B.hidden, SEED, comm.device, torch.bfloat16)
    ref = reference_forward(LLAMA3_8B, LAYERS, world, SEED, x, SEQ_LENS, torch.bfloat16)
    errors = {}
    for mode in MODES:
        for point in SPLITS if mode == "tokenweave" else [None]:
            out = stack.forward(x, stack.plan(SEQ_LENS, point), mode)
            errors[(mode, point)] = relative_difference(out, ref)
    # few CTAs for the overlapped kernel, as the schedule uses them
    layout = stack.plan(SEQ_LENS, Split(sum(SEQ_LENS), 1536, 8))
    errors[("tokenweave", "ctas=8")] = relative_difference(stack.forward(x, layout, "tokenweave"), ref)
    torch.cuda.synchronize()
    comm.close()
    return comm.transport, errors


@pytest.mark.parametrize("world", [2, 4, 8])
def test_every_mode_matches_float64_reference(world):
    _need(world)
    for transport, errors in run_workers(_modes_vs_float64, world, backend="nccl", timeout=600):
        for (mode, point), err in errors.items():
            if mode == "comm_removed":
                assert err > 0.1, "comm_removed must differ, else the check proves nothing"
            else:
                assert err < BF16_REL_TOL, (transport, mode, point, err)


def _graph_replay(rank, world):
    from tokenweave.models.llama import LLAMA3_8B, random_hidden_states, reference_forward, relative_difference

    comm, stack = _stack(world)
    seq_lens = [1024, 1024, 512, 512]
    layout = stack.plan(seq_lens, 1280)  # through the second sequence
    static_x = random_hidden_states(sum(seq_lens), LLAMA3_8B.hidden, 0, comm.device, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside capture (allocator, cuBLAS handles, the comm stream)
        stack.forward(static_x, layout, "tokenweave")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = stack.forward(static_x, layout, "tokenweave")
    errors = []
    for seed in (1, 2, 3):
        new_x = random_hidden_states(sum(seq_lens), LLAMA3_8B.hidden, seed, comm.device, torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        eager = stack.forward(new_x, layout, "tokenweave")
        ref = reference_forward(LLAMA3_8B, LAYERS, world, SEED, new_x, seq_lens, torch.bfloat16)
        errors.append((relative_difference(static_out, ref), relative_difference(static_out, eager)))
    torch.cuda.synchronize()
    graph.reset()
    comm.close()
    return errors


@pytest.mark.parametrize("world", [2, 4, 8])
def test_cuda_graph_replay_with_new_inputs(world):
    _need(world)
    for errors in run_workers(_graph_replay, world, backend="nccl", timeout=600):
        for vs_ref, vs_eager in errors:
            assert vs_ref < BF16_REL_TOL and vs_eager < 1e-2, (vs_ref, vs_eager)


def _tune(rank, world, cache_dir):
    os.environ["TOKENWEAVE_CACHE_DIR"] = cache_dir
    comm, stack = _stack(world, layers=1)
    seq_lens = [1024] * 4
    chosen = stack.tune(seq_lens)
    again = stack.plan(seq_lens).split  # from the cache
    comm.close()
    return chosen, again, os.path.exists(os.path.join(cache_dir, "split_tuning.json"))


def test_tuner_on_gpu(tmp_path):
    _need(2)
    results = run_workers(_tune, 2, str(tmp_path), backend="nccl", timeout=600)
    assert results[0][0] == results[1][0]
    for chosen, again, cached in results:
        assert chosen == again and cached
        if chosen.is_split:
            assert chosen.point % 128 == 0 and chosen.ctas in (8, 16, 32)
        # the tuner also timed the SM partitions the device can make (TOKENWEAVE_SM_PARTITION unset: auto)
        assert chosen.comm_sms in (None, *PARTITION_CHOICES), chosen


def _save_real_size_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    model.save_pretrained(path)


def _hf_logits(rank, world, path):
    from transformers import AutoModelForCausalLM

    from tokenweave.integrations import hf
    from tokenweave.models.llama import relative_difference

    device = torch.device("cuda", rank)
    tp_model = hf.load_tp_model(path, world, dtype=torch.bfloat16)
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
    ids = torch.randint(0, 32000, (4, 512), generator=torch.Generator().manual_seed(3)).to(device)
    with torch.no_grad():
        ref = single(ids, use_cache=False).logits.float()
        theirs = tp_model(ids, use_cache=False).logits.float()
        handle = hf.enable(tp_model, split=2)
        ours_split = tp_model(ids, use_cache=False).logits.float()
        point = handle.last_split.point
        handle.split_mode = "off"
        ours_fused = tp_model(ids, use_cache=False).logits.float()
        handle.disable()
    torch.cuda.synchronize()
    return point, {name: relative_difference(v, ref) for name, v in
                   (("transformers_tp", theirs), ("tokenweave_split", ours_split), ("tokenweave_fuse", ours_fused))}


@pytest.mark.parametrize("world", [2, 4, 8])
def test_hf_real_size_matches_transformers_tp(tmp_path, world):
    _need(world)
    pytest.importorskip("transformers")
    _save_real_size_llama(str(tmp_path))
    for point, errors in run_workers(_hf_logits, world, str(tmp_path), backend="nccl", timeout=600):
        assert point == 1024
        for name, err in errors.items():
            assert err < BF16_REL_TOL, (name, err)
