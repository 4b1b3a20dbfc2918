"""tokenweave-tune's decisions, driven by a fake timer (no GPU, no processes), and the config files it writes."""
import json
import math
from pathlib import Path

import pytest

from tokenweave import tune, tuning

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
BIG = 1 << 40
LIMITS = tune.Limits(capacity_bytes=BIG, one_shot_bytes=BIG, lamport_bytes=2 << 20, max_ctas=132)


class FakeTimer:
    """Times from a model of the card; records every call (variant, tokens, hidden, ctas)."""

    def __init__(self, one_shot_until=64 << 10, lamport_until=16 << 10, lean_factor=0.7, lean_loses_at=None,
                 saturate_bytes_per_cta=32 << 10, itemsize=2):
        self.one_shot_until, self.lamport_until = one_shot_until, lamport_until
        self.lean_factor, self.lean_loses_at = lean_factor, lean_loses_at
        self.saturate, self.itemsize = saturate_bytes_per_cta, itemsize
        self.calls = []

    def __call__(self, variant, tokens, hidden, ctas):
        self.calls.append((variant, tokens, hidden, ctas))
        b = tokens * hidden * self.itemsize
        # more CTAs than one per `saturate` bytes do not help; fewer slow the call down proportionally
        useful = min(ctas, math.ceil(b / self.saturate))
        base = 5.0 + b / (useful * 1e3)
        if variant == "two_shot":
            return base
        if variant == "one_shot":
            return base * (0.8 if b <= self.one_shot_until else 1.3)
        if variant == "lamport":
            return base * (0.7 if b <= self.lamport_until else 1.2)
        if variant == "lean":
            return base * (1.1 if tokens == self.lean_loses_at else self.lean_factor)
        raise AssertionError(variant)


def _grid_limit(tokens, row_bytes, until):
    return max([t * row_bytes for t in tokens if t * row_bytes <= until], default=0)


def test_decisions_follow_the_fake_card():
    fake = FakeTimer()
    tokens = tune.token_grid(4096)
    d = tune.tune_hidden(fake, 1024, tokens, 2, LIMITS)
    assert d["one_shot_max_bytes"] == _grid_limit(tokens, 2048, fake.one_shot_until) == 64 << 10
    assert d["lamport_max_bytes"] == 16 << 10
    assert d["lean"] is True
    assert d["bytes_per_cta"] == 32 << 10  # the fewest CTAs that are not slower (ties go to fewer CTAs)
    m = d["measured"]
    # one-shot is not timed past its first loss; lean only where two-shot would run
    assert max(m["one_shot"]) == 64 and min(m["lean"]) == 64
    assert max(m["lamport"]) == 16
    for variant, t, hidden, ctas in fake.calls:
        assert 1 <= ctas <= LIMITS.max_ctas and hidden == 1024
        if variant == "lean":
            assert t * 2048 > d["one_shot_max_bytes"]
    # the sweep used the algorithm decided at each size
    assert 2 not in m["ctas"]  # 4 KiB: every candidate rule gives one CTA, nothing to sweep
    assert {t: s["algo"] for t, s in m["ctas"].items() if t <= 8} == {4: "lamport", 8: "lamport"}
    assert m["ctas"][16]["algo"] == "one_shot" and m["ctas"][64]["algo"] == "lean"


def test_one_shot_stops_at_the_first_loss_even_if_it_wins_again():
    class Bumpy(FakeTimer):
        def __call__(self, variant, tokens, hidden, ctas):
            us = super().__call__(variant, tokens, hidden, ctas)
            return us * 2 if variant == "one_shot" and tokens == 4 else us

    fake = Bumpy(lamport_until=0)
    d = tune.tune_hidden(fake, 1024, tune.token_grid(256), 2, LIMITS)
    assert d["one_shot_max_bytes"] == 2 * 2048
    assert max(t for v, t, _, _ in fake.calls if v == "one_shot") == 4
    assert d["lamport_max_bytes"] == 0


def test_lean_off_when_it_loses_anywhere_and_nothing_measured_without_sizes():
    d = tune.tune_hidden(FakeTimer(lean_loses_at=1024), 1024, tune.token_grid(4096), 2, LIMITS)
    assert d["lean"] is False
    # every size within the one-shot limit: no two-shot size to compare lean at, so no lean decision
    d = tune.tune_hidden(FakeTimer(one_shot_until=BIG), 1024, [1, 2, 4], 2, LIMITS)
    assert "lean" not in d and d["one_shot_max_bytes"] == 4 * 2048


def test_float32_has_no_lamport_and_caps_are_respected():
    fake = FakeTimer(itemsize=4)
    limits = tune.Limits(capacity_bytes=64 * 4096, one_shot_bytes=16 * 4096, lamport_bytes=2 << 20, max_ctas=66)
    d = tune.tune_hidden(fake, 1024, tune.token_grid(4096), 4, limits)
    assert "lamport_max_bytes" not in d and not any(v == "lamport" for v, *_ in fake.calls)
    assert max(t for _, t, _, _ in fake.calls) == 64  # capacity
    assert max(t for v, t, _, _ in fake.calls if v == "one_shot") == 16  # the workspace's one-shot limit
    assert all(c <= 66 for *_, c in fake.calls)


def test_leading_wins_and_cta_rule():
    assert tune.leading_wins([(4, 1, 2), (1, 1, 2), (8, 3, 2), (16, 1, 2)]) == 4
    assert tune.leading_wins([(1, 2, 2)]) == 0  # a tie is not a win
    # a rule giving 4 CTAs is best at 64 KiB; 16 KiB per CTA gives exactly that
    sweeps = [(64 << 10, {c: 10 + abs(c - 4) for c in tune.cta_counts(64 << 10, 132)})]
    assert tune.decide_bytes_per_cta(sweeps, 132) == 16 << 10
    assert tune.decide_bytes_per_cta([], 132) is None
    assert tune.ctas_for(1, 16 << 10, 132) == 1 and tune.ctas_for(1 << 30, 16 << 10, 132) == 132


def _rows(path, key="tokens"):
    doc = json.loads(path.read_text())
    table = {}
    for r in doc["rows"]:
        if r.get("us") is not None:
            table.setdefault(r.get("hidden", r.get("W")), {}).setdefault(r["variant"], {})[r[key]] = r["us"]
    return table


@pytest.mark.parametrize("tp", [2, 4])
def test_shipped_h200_decisions_follow_from_their_runs(tp):
    """The shipped h200 entries came from older benchmark runs (fused bench at 90cfe5f, emulated world at
    8f3a39b); tokenweave-tune's decision rules applied to those runs' times give the shipped values."""
    shipped = next(e for e in json.loads((tuning.CONFIG_DIR / "h200.json").read_text())["entries"]
                   if e["world_size"] == tp)
    fused = _rows(RESULTS / f"fused_allreduce_rmsnorm-h200-tp{tp}.json")
    limits = []
    for hidden, table in fused.items():
        measured = {"one_shot": table["tokenweave_one_shot"], "two_shot": table["tokenweave_two_shot"]}
        limits.append(tune.decide_one_shot(measured, hidden * 2))
    assert min(limits) == shipped["one_shot_max_bytes"]

    ((hidden, one),) = _rows(RESULTS / f"emulated_one_shot-h200-tp{tp}.json").items()
    assert tune.decide_lamport({"lamport": one["lamport"], "one_shot": one["one_shot"]}, hidden * 2,
                               shipped["one_shot_max_bytes"]) == shipped["lamport_max_bytes"]
    # the per-CTA table compares lean and two-shot at one size over CTA counts: the same every-point rule
    ((_, cta),) = _rows(RESULTS / f"emulated_per_cta-h200-tp{tp}.json", key="ctas").items()
    assert tune.decide_lean({"lean": cta["lean"], "two_shot": cta["two_shot"]}) is shipped["lean"]


def _prov(emulated=False):
    return tune.Provenance("h200", "NVIDIA H200", 1 if emulated else 2, emulated, "2.11.0", "abc1234", "2025-01-01",
                           "bfloat16", "bench/results/tune-h200-tp2.json")


def test_written_config_loads_and_has_the_shipped_format(user_config):
    per_hidden = tune.tune(FakeTimer(), [1024, 2048], tune.token_grid(2048), 2, LIMITS)
    entries = tune.make_entries(per_hidden, 2, 2, "world", _prov(), LIMITS.max_ctas)
    tune.write_config(user_config, "h200", "NVIDIA H200", entries)
    doc = json.loads(user_config.read_text())
    shipped = json.loads((tuning.CONFIG_DIR / "h200.json").read_text())
    assert set(doc) == {"device", "about", "entries"} <= set(shipped)  # (shipped files add "trigger")
    (entry,) = doc["entries"]
    for e in shipped["entries"]:
        assert set(e) <= set(entry), set(e) - set(entry)
    for field in ("device", "torch", "git", "date", "emulated", "measured"):
        assert field in entry
    assert entry["measured"]["1024"]["one_shot"]["1"] > 0  # the times the decisions came from
    assert "bench/results/tune-h200-tp2.json" in entry["source"]
    for hidden in (1024, 2048, 8192):  # --key world: any hidden
        cfg = tuning.dispatch_config("h200", 2, 2, hidden)
        assert str(user_config) in cfg.source
        assert (cfg.one_shot_max_bytes, cfg.lamport_max_bytes, cfg.lean, cfg.bytes_per_cta) == (
            entry["one_shot_max_bytes"], entry["lamport_max_bytes"], entry["lean"], entry["bytes_per_cta"])
    # the smallest limit over the hiddens
    assert entry["one_shot_max_bytes"] == min(d["one_shot_max_bytes"] for d in per_hidden.values())
    assert tuning.dispatch_config("h100", 2, 2, 1024).source != cfg.source  # other cards ignore the entry


def test_shape_entries_match_only_their_shape_and_merge(user_config):
    per_hidden = tune.tune(FakeTimer(), [1024], [1, 2, 4, 64, 256], 2, LIMITS)
    tune.write_config(user_config, "h200", "NVIDIA H200", tune.make_entries(per_hidden, 4, 2, "shape", _prov(), 132))
    assert str(user_config) in tuning.dispatch_config("h200", 4, 2, 1024).source
    assert str(user_config) not in tuning.dispatch_config("h200", 4, 2, 2048).source
    assert str(user_config) not in tuning.dispatch_config("h200", 4, 4, 1024).source

    doc = json.loads(user_config.read_text())
    doc["entries"][0]["trigger"] = "kept"  # a field the tuner does not measure
    doc["entries"].append({"world_size": 8, "one_shot_max_bytes": 1, "source": "mine"})
    user_config.write_text(json.dumps(doc))
    again = tune.tune(FakeTimer(one_shot_until=0), [1024], [1, 2, 4, 64, 256], 2, LIMITS)
    tune.write_config(user_config, "h200", "NVIDIA H200", tune.make_entries(again, 4, 2, "shape", _prov(), 132))
    emulated = tune.make_entries(again, 4, 2, "shape", _prov(emulated=True), 132)
    tune.write_config(user_config, "h200", "NVIDIA H200", emulated)
    entries = json.loads(user_config.read_text())["entries"]
    assert [(e["world_size"], e.get("hidden"), e.get("emulated")) for e in entries] == [
        (4, 1024, False), (4, 1024, True), (8, None, None)]  # replaced in place; specific, then real, first
    assert entries[0]["one_shot_max_bytes"] == 0 and entries[0]["trigger"] == "kept"
    assert "emulated world of 4 ranks" in entries[1]["source"]


def test_progress_counter_without_tqdm(capsys):
    fake = FakeTimer()
    tokens = tune.token_grid(1024)
    total = tune.planned_timings([1024], tokens, 2, LIMITS)
    progress = tune.Progress(total, use_tqdm=False)
    tune.tune_hidden(fake, 1024, tokens, 2, LIMITS, progress)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == len(fake.calls) and lines[-1].startswith("tokenweave-tune [")
    assert len(fake.calls) <= progress.n <= total


def _args(*argv):
    return tune.build_parser().parse_args(list(argv))


def test_command_line(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=3072, intermediate_size=8192, num_hidden_layers=1,
                                   num_attention_heads=24, num_key_value_heads=8, dtype="bfloat16")
    cfg.save_pretrained(tmp_path / "model")
    plan = tune.resolve(_args("--hf-config", str(tmp_path / "model"), "--hidden", "4096", "--tp", "4",
                              "--max-tokens", "100"), visible_gpus=8)
    assert plan.hiddens == (3072, 4096) and plan.world_size == 4 and plan.dtype == "bfloat16"
    assert plan.tokens == (1, 2, 4, 8, 16, 32, 64, 100) and not plan.emulated
    plan = tune.resolve(_args("--hidden", "1024", "--emulated", "4", "--tokens", "16", "1"), visible_gpus=1)
    assert plan.emulated and plan.world_size == 4 and plan.tokens == (1, 16)
    for argv, visible, message in [(("--tp", "2"), 2, "--hidden or --hf-config"),
                                   (("--hidden", "1004"), 2, "multiples of 8"),
                                   (("--hidden", "1024", "--tp", "4"), 2, "only 2 GPUs"),
                                   (("--hidden", "1024"), 1, "--emulated W"),
                                   (("--hidden", "1024", "--emulated", "2", "--tp", "2"), 1, "leave out --tp"),
                                   (("--hf-config", str(tmp_path / "nothing")), 2, "cannot read")]:
        with pytest.raises(SystemExit, match=message):
            tune.resolve(_args(*argv), visible_gpus=visible)


def test_main_without_gpu_says_what_it_needs():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        tune.main(["--hidden", "1024", "--emulated", "2"])


def _gloo_rank(rank, world):
    import torch
    import tokenweave as tw

    comm = tw.Communicator(max_tokens=64, hidden=256, dtype=torch.bfloat16, transport="torch")
    try:
        measure = tune.real_measure(comm, [128, 256], 64, torch.bfloat16, calls=2, replays=1)
        limits = tune.Limits(capacity_bytes=64 * 256 * 2, one_shot_bytes=16 * 256 * 2, lamport_bytes=8 * 256 * 2,
                             max_ctas=8)
        decided = tune.tune(measure, [128, 256], [1, 8, 64], 2, limits)
        return {h: {k: v for k, v in d.items() if k != "measured"} | {"times": d["measured"]} for h, d in decided.items()}
    finally:
        comm.close()


def test_real_measure_runs_collectively_and_every_rank_decides_alike():
    """The measuring loop on 2 gloo ranks (the torch transport accepts and ignores algo and ctas): it runs the
    same calls on every rank and, deciding from the slowest rank's times, every rank decides the same."""
    from dist_utils import run_workers

    a, b = run_workers(_gloo_rank, 2, timeout=240)
    assert a == b and set(a) == {128, 256}
    assert all(us > 0 for d in a.values() for us in d["times"]["two_shot"].values())
