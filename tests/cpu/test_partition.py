"""SM partitions without a GPU: the switch, the fallback and its single warning, the tuner's choice of
communication SMs (fake timer), rank agreement, and the driver struct layout against cuda.h."""
import glob
import os
import shutil
import subprocess
import warnings

import pytest
import torch

from dist_utils import run_workers
from tokenweave import env
from tokenweave import partition as sm
from tokenweave.split import GemmShape, Split, SplitPolicy, TuningCache

GEMMS_70B_TP4 = [GemmShape(2560, 8192), GemmShape(8192, 2048), GemmShape(14336, 8192), GemmShape(8192, 7168)]


@pytest.fixture(autouse=True)
def _fresh_partitions():
    sm.clear_cache()
    yield
    sm.clear_cache()


def _partition_warnings(record):
    return [w for w in record if "SM partitions are not available" in str(w.message)]


def test_switch_parsing_and_env():
    assert env.sm_partition({}) == "auto"
    assert env.sm_partition({"TOKENWEAVE_SM_PARTITION": ""}) == "auto"
    assert env.sm_partition({"TOKENWEAVE_SM_PARTITION": "OFF"}) == "off"
    assert env.sm_partition({"TOKENWEAVE_SM_PARTITION": " 24 "}) == 24
    assert env.parse_sm_partition(16) == 16 and env.parse_sm_partition("auto") == "auto"
    for bad in ("0", "-8", "many", 0, -1, True, 2.5):
        with pytest.raises(ValueError, match="sm_partition"):
            env.parse_sm_partition(bad)
    with pytest.raises(ValueError, match="TOKENWEAVE_SM_PARTITION"):
        env.sm_partition({"TOKENWEAVE_SM_PARTITION": "half"})


def test_resolve_switch_reads_the_env_only_without_an_argument(monkeypatch):
    monkeypatch.setenv("TOKENWEAVE_SM_PARTITION", "32")
    assert sm.resolve_switch() == 32
    assert sm.resolve_switch("off") == "off"
    monkeypatch.delenv("TOKENWEAVE_SM_PARTITION")
    assert sm.resolve_switch() == "auto"


def test_requested_comm_sms_follows_switch_and_tuned_split():
    tuned = Split(4096, 2048, 16, comm_sms=24)
    untuned = Split(4096, 2048, 16)
    assert sm.requested_comm_sms("auto", tuned) == 24
    assert sm.requested_comm_sms("auto", untuned) is None  # off unless the tuner chose it
    assert sm.requested_comm_sms("off", tuned) is None
    assert sm.requested_comm_sms(8, untuned) == 8 and sm.requested_comm_sms(8, tuned) == 8
    assert sm.requested_comm_sms(8, Split(4096)) is None  # one part: nothing overlaps
    assert sm.requested_comm_sms(8, None) is None
    with pytest.raises(ValueError):
        Split(4096, 2048, 16, comm_sms=0)


def test_cpu_fallback_is_inactive_cached_and_warns_exactly_once():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = sm.get_partition("cpu", 16)
        again = sm.get_partition(torch.device("cpu"), 16)
        other = sm.get_partition("cpu", 8)
        assert sm.partition_for("cpu", 24, Split(100, 50)) is not None
        assert sm.partition_for("cpu", "auto", Split(100, 50)) is None
    assert len(_partition_warnings(record)) == 1, [str(w.message) for w in record]
    assert first is again and first is not other
    assert not first.active and "cpu" in first.reason
    assert first.gemm_stream is None and first.comm_stream is None and first.comm_sms is None
    assert first.fit_ctas(32) == 32 and first.fit_ctas(None) is None  # inactive: the kernel's own choice
    assert not first.usable()
    assert first.describe()["active"] is False
    assert sm.tuner_choices("cpu", "auto") == ()


def test_fit_ctas_caps_at_the_partition():
    part = sm.Partition(torch.device("cpu"), 16, True, comm_sms=16, gemm_sms=116)
    assert part.fit_ctas(32) == 16 and part.fit_ctas(8) == 8 and part.fit_ctas(None) == 16


def test_get_partition_validates_before_anything():
    for bad in (0, -4, True, 2.0, "16"):
        with pytest.raises(ValueError, match="tokenweave.sm_partition"):
            sm.get_partition("cpu", bad)


def test_driver_field_offsets_read_back():
    buf = bytearray(sm._RESOURCE_BYTES)
    buf[sm._SM_FIELDS_OFFSET:sm._SM_FIELDS_OFFSET + 12] = (132).to_bytes(4, "little") + (8).to_bytes(4, "little") \
        + (2).to_bytes(4, "little")

    class Buffer:
        raw = bytes(buf)

    assert sm._Driver.sm_fields(Buffer) == (132, 8, 2)


def _cuda_header():
    roots = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"))
    for root in roots:
        if root and os.path.exists(os.path.join(root, "include", "cuda.h")):
            return os.path.join(root, "include")
    return None


def test_resource_layout_matches_cuda_h(tmp_path):
    """The ctypes buffers assume CUdevResource's SM fields at byte 96 and a size within the buffer."""
    include, cc = _cuda_header(), shutil.which("cc") or shutil.which("gcc")
    if include is None or cc is None:
        pytest.skip("needs cuda.h and a C compiler")
    src = tmp_path / "layout.c"
    src.write_text('#include <stddef.h>\n#include <stdio.h>\n#include <cuda.h>\n'
                   'int main(void){printf("%zu %zu %zu %d %d %d\\n", offsetof(CUdevResource, sm), '
                   'sizeof(CUdevResource), offsetof(CUdevSmResource, minSmPartitionSize), '
                   '(int)CU_DEV_RESOURCE_TYPE_SM, (int)CU_GREEN_CTX_DEFAULT_STREAM, '
                   '(int)CU_STREAM_CAPTURE_MODE_THREAD_LOCAL);return 0;}\n')
    exe = tmp_path / "layout"
    subprocess.run([cc, str(src), "-I", include, "-o", str(exe)], check=True, timeout=60)
    got = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=30).stdout.split()
    offset, size, min_offset, type_sm, default_stream, thread_local = map(int, got)
    assert offset == sm._SM_FIELDS_OFFSET and min_offset == 4 and size <= sm._RESOURCE_BYTES
    assert (type_sm, default_stream, thread_local) == (sm._CU_DEV_RESOURCE_TYPE_SM, sm._CU_GREEN_CTX_DEFAULT_STREAM,
                                                       sm._CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)


# ------------------------------------------------------------------------------------------------ tuner
def _policy(tmp_path, **kw):
    return SplitPolicy(GEMMS_70B_TP4, 132, "dev/sm132/tp4/p2p/bfloat16/h8192/m",
                       cache=TuningCache(str(tmp_path / "cache.json")), **kw)


def test_tuner_picks_a_partition_when_faster_and_caches_it(tmp_path):
    policy = _policy(tmp_path, partition_choices=(8, 16, 32))
    calls = []

    def time_fn(split):
        calls.append(split)
        if not split.is_split:
            return 1000.0
        return {None: 500.0, 8: 480.0, 16: 400.0, 32: 450.0}[split.comm_sms]

    chosen = policy.tune(4096, time_fn)
    assert chosen.comm_sms == 16 and chosen.is_split
    assert len(calls) <= policy.max_candidates + 3 + 3
    partitioned = [s for s in calls if s.comm_sms is not None]
    assert [s.comm_sms for s in partitioned] == [8, 16, 32]
    assert all(s.point == chosen.point and s.ctas == chosen.ctas for s in partitioned)  # best point and CTAs
    fresh = _policy(tmp_path)  # from the file, no timing
    assert fresh.choose(4096) == chosen and fresh.choose(3000).comm_sms == 16  # the whole bucket
    entry = fresh.cache.get(fresh.key(4096))
    assert entry["comm_sms"] == 16 and "point=%d,ctas=%d,comm_sms=16" % (chosen.point, chosen.ctas) in entry["timings_us"]


def test_tuner_keeps_no_partition_when_partitions_lose(tmp_path):
    policy = _policy(tmp_path, partition_choices=(8, 16))
    chosen = policy.tune(4096, lambda s: 1000.0 if not s.is_split else (500.0 if s.comm_sms is None else 600.0))
    assert chosen.is_split and chosen.comm_sms is None
    # and a partition cannot rescue a split that loses to no split
    lost = policy.tune(8192, lambda s: 100.0 if not s.is_split else (300.0 if s.comm_sms is None else 200.0))
    assert not lost.is_split and lost.comm_sms is None


def test_tuner_skips_partitions_that_cannot_be_made(tmp_path):
    policy = _policy(tmp_path)
    timed = []

    def time_fn(split):
        timed.append(split.comm_sms)
        return 100.0 if split.comm_sms == 8 else 200.0

    chosen = policy.tune(4096, time_fn, partition_choices=(8, 16), partition_ok=lambda c: c == 16)
    assert 8 not in timed and 16 in timed and chosen.comm_sms is None


def test_old_cache_entries_read_as_no_partition(tmp_path):
    policy = _policy(tmp_path)
    policy.cache.put(policy.key(4096), {"split": True, "candidate": 0, "ctas": 16, "tuned_tokens": 4096,
                                        "timings_us": {}})
    assert policy.choose(4096).comm_sms is None and policy.choose(4096).is_split


def _tune_with_disagreeing_ranks(rank, world, path):
    policy = SplitPolicy(GEMMS_70B_TP4, 132, "k", cache=TuningCache(path))
    timed = []

    def time_fn(split):
        timed.append(split.comm_sms)
        return 100.0 if split.comm_sms is not None else 200.0

    chosen = policy.tune(4096, time_fn, partition_choices=(8, 16), partition_ok=lambda c: not (rank == 1 and c == 8))
    return chosen, timed


def test_ranks_agree_on_partitions_to_time(tmp_path):
    """A partition one rank cannot make is timed on none: the timings' collectives stay matched."""
    results = run_workers(_tune_with_disagreeing_ranks, 2, str(tmp_path / "c.json"), timeout=120)
    (c0, t0), (c1, t1) = results
    assert c0 == c1 and c0.comm_sms == 16
    assert t0 == t1 and 8 not in t0


# ------------------------------------------------------------------------------------------------ schedules
def _stack_with_switches(rank, world, switches):
    import tokenweave as tw
    from tokenweave.models.llama import TINY, TPLlamaStack, random_hidden_states

    sm.clear_cache()
    comm = tw.Communicator(max_tokens=128, hidden=TINY.hidden, dtype=torch.float32)
    seq_lens = [20, 12, 32]
    x = random_hidden_states(sum(seq_lens), TINY.hidden, 3, "cpu", torch.float32)
    results = {}
    for switch in switches:
        stack = TPLlamaStack(comm, TINY, 2, dtype=torch.float32, seed=3, sm_partition=switch)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            outs = [stack.forward(x, stack.plan(seq_lens, point), "tokenweave") for point in (20, 32, 40)]
        results[switch] = ([o.numpy() for o in outs], len(_partition_warnings(record)))  # by value: the worker exits
    comm.close()
    return results


def test_llama_stack_with_partition_switch_on_cpu_matches_off():
    """On CPU a requested partition falls back (one warning) and the schedule is the unpartitioned one."""
    results, = run_workers(_stack_with_switches, 1, ("off", 16, 8), timeout=120)
    (off, off_warnings), (on, on_warnings), (again, again_warnings) = results["off"], results[16], results[8]
    assert off_warnings == 0 and on_warnings == 1 and again_warnings == 0  # one warning per process
    for a, b, c in zip(off, on, again):
        assert torch.equal(torch.from_numpy(a), torch.from_numpy(b)) and torch.equal(torch.from_numpy(a),
                                                                                      torch.from_numpy(c))
