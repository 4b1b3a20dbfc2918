"""tokenweave.integrations.hf on a tiny random Llama loaded with transformers' own TP (gloo, 2 ranks).

Logits must equal transformers' TP and a single-process model (float32: tight), with and without
token splitting, with a padding mask, with a KV cache (fusion only) and after disable().
"""
import pytest
import torch

from dist_utils import run_workers

transformers = pytest.importorskip("transformers", reason="transformers is in requirements-test.txt")
pytest.importorskip("accelerate", reason="transformers' tensor parallelism needs accelerate")

TOL = 2e-5  # float32 logits of magnitude ~1: reduction order only


def _save_tiny(path, model_type):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=96, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms are all ones at init: randomise them so a wrong norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path)


def _compare(rank, world, path):
    from transformers import AutoModelForCausalLM

    from tokenweave.integrations import hf

    tp_model = hf.load_tp_model(path, world, dtype=torch.float32)
    single = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (4, 12), generator=g)
    padded = torch.ones_like(ids)
    padded[1, :3] = 0  # left padding in sequence 1
    padded[3, :5] = 0
    errs, splits = {}, {}

    def diff(a, b, mask=None):
        if mask is not None:
            a, b = a[mask.bool()], b[mask.bool()]
        return float((a - b).abs().max())

    with torch.no_grad():
        ref = single(ids, use_cache=False).logits
        ref_pad = single(ids, attention_mask=padded, use_cache=False).logits
        errs["transformers_tp"] = diff(tp_model(ids, use_cache=False).logits, ref)
        original_forward = tp_model.model.layers[0].self_attn.o_proj.forward

        handle = hf.enable(tp_model, split=1)
        for mode in (1, 2, 3, "off", "auto"):
            handle.split_mode = mode
            errs[f"split={mode}"] = diff(tp_model(ids, use_cache=False).logits, ref)
            splits[mode] = handle.last_split.point
        handle.split_mode = 2
        errs["padding mask"] = diff(tp_model(ids, attention_mask=padded, use_cache=False).logits, ref_pad, padded)
        splits["padding mask"] = handle.last_split.point
        errs["kv cache"] = diff(tp_model(ids).logits, ref)  # default use_cache=True: fusion only
        splits["kv cache"] = handle.last_split.point
        generated = tp_model.generate(ids[:2], max_new_tokens=4, do_sample=False)
        handle.disable()
        restored = tp_model.model.layers[0].self_attn.o_proj.forward
        errs["after disable"] = diff(tp_model(ids, use_cache=False).logits, ref)
        expected = single.generate(ids[:2], max_new_tokens=4, do_sample=False)
    return errs, splits, torch.equal(generated, expected), restored == original_forward


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_hf_tokenweave_matches_transformers_tp_and_single_process(tmp_path, model_type):
    _save_tiny(str(tmp_path), model_type)
    results = run_workers(_compare, 2, str(tmp_path), timeout=240)
    for errs, splits, same_generation, restored in results:
        for case, err in errs.items():
            assert err < TOL, (model_type, case, err)
        # forced splits land after whole sequences (batch rows of 12 tokens); tiny batches never auto-split
        assert splits == {1: 12, 2: 24, 3: 36, "off": None, "auto": None, "padding mask": 24, "kv cache": None}
        assert same_generation and restored


def test_hf_rejects_layers_it_cannot_fuse(tmp_path):
    from transformers import AutoModelForCausalLM

    from tokenweave.integrations import hf

    _save_tiny(str(tmp_path), "llama")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    model.model.layers[1].pre_feedforward_layernorm = torch.nn.Identity()
    with pytest.raises(TypeError, match="pre_feedforward_layernorm"):
        hf.enable(model)  # refused before any communicator is made: no process group needed
    assert "forward" not in model.model.layers[0].__dict__
