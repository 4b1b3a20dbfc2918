"""Track-and-trigger decisions as data (tokenweave/configs/*.json "trigger" lists, tokenweave.tuning.trigger_config,
tokenweave.trigger.policy): the decisions for the committed shapes are those of the code before they moved out of
it, every shipped entry names a run that supports it, and the heuristic and user overrides behave as documented."""
import json
import re
from pathlib import Path

import pytest
import torch

from tokenweave import tuning
from tokenweave.trigger import policy
from tokenweave.trigger.policy import Choice

REPO = Path(__file__).resolve().parents[2]
SEQ = ("sequential", None, None)

# Written from the code before the move (tokenweave/trigger.py at cea5b63: TRIGGER_WINS, DEFAULT_CONSUMER,
# STREAM_GROUP_BYTES / STREAM_MAX_GROUPS, applied on every card): every (world, K, N, M) of
# bench/results/gemm_allreduce-*.json plus the crossover's edges. Columns: mode="auto" on p2p -> (mode, producer,
# consumer); mode="trigger" without consumer= -> consumer; consumer="stream" without groups= -> (rows per group,
# groups) for bf16 rows of N.
BEFORE = [
    (2, 4096, 8192, 512, SEQ, "stream", (512, 1)),
    (2, 4096, 8192, 1024, SEQ, "stream", (1024, 1)),
    (2, 4096, 8192, 2048, SEQ, "stream", (1024, 2)),
    (2, 4096, 8192, 4096, SEQ, "stream", (1024, 4)),
    (2, 4096, 8192, 8192, SEQ, "stream", (2048, 4)),
    (2, 4096, 8192, 16384, SEQ, "stream", (4096, 4)),
    (2, 14336, 8192, 512, SEQ, "stream", (512, 1)),
    (2, 14336, 8192, 1024, SEQ, "stream", (1024, 1)),
    (2, 14336, 8192, 2048, SEQ, "stream", (1024, 2)),
    (2, 14336, 8192, 4096, SEQ, "stream", (1024, 4)),
    (2, 14336, 8192, 8192, SEQ, "stream", (2048, 4)),
    (2, 14336, 8192, 16384, SEQ, "stream", (4096, 4)),
    (4, 2048, 8192, 1, SEQ, "stream", (1, 1)),
    (4, 2048, 8192, 512, SEQ, "stream", (512, 1)),
    (4, 2048, 8192, 1024, SEQ, "stream", (1024, 1)),
    (4, 2048, 8192, 2048, SEQ, "stream", (1024, 2)),
    (4, 2048, 8192, 4096, SEQ, "stream", (1024, 4)),
    (4, 2048, 8192, 8192, SEQ, "stream", (2048, 4)),
    (4, 2048, 8192, 16383, SEQ, "stream", (4096, 4)),
    (4, 2048, 8192, 16384, ("trigger", "cublas", "stream"), "stream", (4096, 4)),
    (4, 2048, 8192, 32768, ("trigger", "cublas", "stream"), "stream", (8192, 4)),
    (4, 7168, 8192, 512, SEQ, "stream", (512, 1)),
    (4, 7168, 8192, 1024, SEQ, "stream", (1024, 1)),
    (4, 7168, 8192, 2048, SEQ, "stream", (1024, 2)),
    (4, 7168, 8192, 4096, SEQ, "stream", (1024, 4)),
    (4, 7168, 8192, 8192, SEQ, "stream", (2048, 4)),
    (4, 7168, 8192, 16384, SEQ, "stream", (4096, 4)),
    (8, 1024, 8192, 16384, SEQ, "stream", (4096, 4)),
]


@pytest.fixture(autouse=True)
def _shipped_configs_only(monkeypatch):
    monkeypatch.delenv("TOKENWEAVE_CONFIG", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


def _decisions(card, world, K, N, M, transport="p2p", dtype=torch.bfloat16):
    cfg = tuning.trigger_config(card, world, K, N, 2, transport)
    kw = dict(transport=transport, dtype=dtype, is_cuda=True, tokens=M)
    auto = policy.choose("op", "auto", cfg, **kw)
    forced = policy.choose("op", "trigger", cfg, **kw)
    assert forced.mode == "trigger" and forced.producer == "cublas"
    return (auto.mode, auto.producer, auto.consumer), forced.consumer, policy.stream_groups(M, N * 2, None, cfg)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_h200_decisions_are_those_of_the_code_before(dtype):
    for world, K, N, M, auto, consumer, groups in BEFORE:
        assert _decisions("h200", world, K, N, M, dtype=dtype) == (auto, consumer, groups), (world, K, N, M)
        # the overlap was measured on p2p only: multimem stays sequential, as before
        assert _decisions("h200", world, K, N, M, "multimem", dtype) == (SEQ, consumer, groups), (world, K, N, M)


def test_cards_without_a_measured_win_stay_sequential():
    """The documented heuristic (tuning.TRIGGER_HEURISTIC): no overlap under mode="auto" on a card or shape
    without an entry; the trigger-mode defaults are the ones measured everywhere (stream consumer, 16 MiB / 4
    groups). This is the one decision that changed: before, H200's TP4 o_proj win applied on every card."""
    assert tuning.trigger_config("unknown-card", 4, 2048, 8192, 2, "p2p") == tuning.TRIGGER_HEURISTIC
    for card in ("unknown-card", "h100"):
        for world, K, N, M, _, consumer, groups in BEFORE:
            assert _decisions(card, world, K, N, M) == (SEQ, consumer, groups), (card, world, K, N, M)


def test_heuristic_matches_every_measured_default():
    """Where a shipped entry sets a trigger-mode default, the heuristic has the same value (it is what the
    measurements agree on), so cards without an entry get what every measured card got."""
    for path in tuning.CONFIG_DIR.glob("*.json"):
        for e in json.loads(path.read_text()).get("trigger", []):
            for field in ("default_consumer", "stream_group_bytes", "stream_max_groups"):
                if field in e:
                    assert e[field] == getattr(tuning.TRIGGER_HEURISTIC, field), (path.name, e)


def test_fields_merge_in_order_and_the_user_file_comes_first(tmp_path, monkeypatch):
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"trigger": [
        {"world_size": 2, "K": 4096, "N": 8192, "auto_min_tokens": 1024, "auto_producer": "cublas",
         "auto_consumer": "sm", "source": "my run"},
        {"device": "h100", "world_size": 2, "default_consumer": "sm", "source": "an H100 run"}]}))
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(user))
    tuning.clear_cache()
    mine = tuning.trigger_config("h200", 2, 4096, 8192, 2, "p2p")
    assert (mine.auto_min_tokens, mine.auto_consumer) == (1024, "sm")
    assert mine.default_consumer == "stream"  # not set by the user's entry: the shipped h200 entry's
    assert "my run" in mine.source and "gemm_allreduce-h200-tp2.json" in mine.source
    assert policy.choose("op", "auto", mine, transport="p2p", dtype=torch.bfloat16, is_cuda=True,
                         tokens=1024) == Choice("trigger", "cublas", "sm")
    assert tuning.trigger_config("h200", 2, 14336, 8192, 2, "p2p").auto_min_tokens is None  # other shape
    assert tuning.trigger_config("h200", 2, 4096, 8192, 2, "p2p").default_consumer == "stream"  # device: h100 only
    assert tuning.trigger_config("h100", 2, 4096, 8192, 2, "p2p").default_consumer == "sm"


def test_choose_checks_mode_and_capability():
    cfg = tuning.TRIGGER_HEURISTIC
    kw = dict(dtype=torch.bfloat16, is_cuda=True, tokens=8)
    with pytest.raises(ValueError, match="mode="):
        policy.choose("op", "bogus", cfg, transport="p2p", **kw)
    with pytest.raises(ValueError, match="needs the p2p or multimem transport"):
        policy.choose("op", "trigger", None, transport="torch", **kw)
    with pytest.raises(ValueError, match="bfloat16/float16"):
        policy.choose("op", "trigger", None, transport="p2p", dtype=torch.float32, is_cuda=True, tokens=8)
    assert policy.choose("op", "auto", None, transport="torch", **kw) == Choice("sequential")
    assert policy.choose("op", "sequential", cfg, transport="p2p", **kw) == Choice("sequential")
    assert policy.choose("op", "trigger", cfg, transport="p2p", producer="triton", consumer="sm",
                         **kw) == Choice("trigger", "triton", "sm")  # explicit roles win


# ---------------------------------------------------------------------------------- shipped entries vs their runs
def _shipped():
    for path in sorted(tuning.CONFIG_DIR.glob("*.json")):
        for e in json.loads(path.read_text()).get("trigger", []):
            yield path.stem, e


def _cited_runs(e):
    return re.findall(r"bench/results/[\w.-]+\.json", e.get("source", ""))


def test_every_shipped_trigger_entry_names_its_run():
    allowed = set(tuning.TRIGGER_KEYS) | {f for f in tuning.TriggerConfig.__dataclass_fields__} | {"device"}
    entries = list(_shipped())
    assert entries
    for card, e in entries:
        assert set(e) <= allowed, (card, sorted(set(e) - allowed))
        assert isinstance(e.get("world_size"), int), (card, e)
        assert e.get("auto_producer", "cublas") in policy.PRODUCERS, (card, e)
        for field in ("auto_consumer", "default_consumer"):
            assert e.get(field, "stream") in policy.CONSUMERS, (card, e)
        runs = _cited_runs(e)
        assert runs, (card, e)
        for run in runs:  # the run exists, is of this card and world size, and the commit quoted is its own
            doc = json.loads((REPO / run).read_text())
            assert doc["device"] == card and doc["tp"] == e["world_size"], (run, e)
            assert f"{doc['git']})" in e["source"] or f"{doc['git']}," in e["source"], (run, doc["git"])


def _timings(run):
    doc = json.loads((REPO / run).read_text())
    by_shape = {}
    for r in doc["rows"]:
        by_shape.setdefault((r["K"], r["N"], r["M"]), {})[r["variant"]] = r["us"]
    return by_shape


def test_shipped_decisions_agree_with_their_runs():
    """An auto win: the pairing beat the sequential path (cuBLAS + the fused op) at every measured M from its
    crossover on; a default consumer: with cuBLAS, the fastest consumer measured at every shape of the run."""
    for card, e in _shipped():
        for run in _cited_runs(e):
            timings = _timings(run)
            if e.get("auto_min_tokens") is not None:
                pairing = f"tokenweave_{e['auto_producer']}_{e['auto_consumer']}"
                above = [v for (K, N, M), v in timings.items()
                         if (K, N) == (e["K"], e["N"]) and M >= e["auto_min_tokens"]]
                assert above and all(v[pairing] < v["sequential_fused"] for v in above), (run, e)
            if "default_consumer" in e:
                for shape, v in timings.items():
                    measured = {c: v[f"tokenweave_cublas_{c}"] for c in policy.CONSUMERS
                                if f"tokenweave_cublas_{c}" in v}
                    assert min(measured, key=measured.get) == e["default_consumer"], (run, shape, measured)
