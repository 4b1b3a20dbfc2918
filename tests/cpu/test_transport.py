"""Transport selection: multimem only where multicast is supported AND allowed."""
import pytest
import torch

from tokenweave import env, plan_transport
from dist_utils import run_workers

BASE = dict(device_is_cuda=True, has_extension=True, world_size=4, same_host=True, blockers=[])


@pytest.mark.parametrize("var,value", sorted(env.MULTICAST_OFF.items()))
def test_each_multicast_variable_blocks_multimem(var, value):
    blockers = env.multicast_blockers({var: value})
    assert blockers == [f"{var}={value}"]
    choice, reason = plan_transport(None, **{**BASE, "blockers": blockers})
    assert choice == "p2p" and var in reason
    with pytest.raises(ValueError, match=var):
        plan_transport("multimem", **{**BASE, "blockers": blockers})


def test_other_values_do_not_block():
    assert env.multicast_blockers({"NCCL_NVLS_ENABLE": "1", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "0"}) == []


def test_multimem_is_only_tentative_without_blockers():
    assert plan_transport(None, **BASE)[0] == "multimem"
    assert plan_transport("p2p", **BASE)[0] == "p2p"
    assert plan_transport("torch", **BASE)[0] == "torch"


@pytest.mark.parametrize("field,value,words", [
    ("device_is_cuda", False, "not CUDA"),
    ("has_extension", False, "without its CUDA extension"),
    ("world_size", 16, "exceeds"),
    ("same_host", False, "more than one host"),
])
def test_torch_fallback_reasons(field, value, words):
    choice, reason = plan_transport(None, **{**BASE, field: value})
    assert choice == "torch" and words in reason
    with pytest.raises(ValueError, match="was requested"):
        plan_transport("p2p", **{**BASE, field: value})


def test_env_parsing():
    assert env.requested_transport({}) is None
    assert env.requested_transport({"TOKENWEAVE_TRANSPORT": "p2p"}) == "p2p"
    with pytest.raises(ValueError, match="TOKENWEAVE_TRANSPORT"):
        env.requested_transport({"TOKENWEAVE_TRANSPORT": "nvls"})
    assert env.timeout_ms({"TOKENWEAVE_TIMEOUT_MS": "250"}) == 250
    with pytest.raises(ValueError, match="positive"):
        env.timeout_ms({"TOKENWEAVE_TIMEOUT_MS": "0"})


def _make_comm(rank, world, transport):
    import tokenweave as tw
    from tokenweave import _symm

    def refuse(*a, **k):  # a gloo group must never allocate symmetric (or multicast) memory
        raise AssertionError("symmetric memory requested on a CPU group")

    _symm.allocate = refuse
    with tw.Communicator(max_tokens=16, hidden=64, transport=transport) as comm:
        return comm.transport, comm.transport_reason, comm.device.type


def test_gloo_group_uses_torch_transport():
    for transport, reason, dev in run_workers(_make_comm, 2, None):
        assert (transport, dev) == ("torch", "cpu") and "not CUDA" in reason


def test_gloo_group_refuses_forced_p2p():
    with pytest.raises(AssertionError, match="was requested but"):
        run_workers(_make_comm, 2, "p2p")
