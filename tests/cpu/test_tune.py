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
                 saturate_bytes_per_cta=32 << 10, itemsize=2, pull_factor=0.5, pull_loses_at=None):
        self.one_shot_until, self.lamport_until = one_shot_until, lamport_until
        self.lean_factor, self.lean_loses_at = lean_factor, lean_loses_at
        self.pull_factor, self.pull_loses_at = pull_factor, pull_loses_at
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
        if variant == "lean_pull":
            return base * (0.9 if tokens == self.pull_loses_at else self.pull_factor)
        raise AssertionError(variant)


def _grid_limit(tokens, row_bytes, until):
    return max([t * row_bytes for t in tokens if t * row_bytes <= until], default=0)


def test_decisions_follow_the_fake_card():
    fake = FakeTimer()
    tokens = tune.token_grid(4096)
    d = tune.tune_hidden(fake, 1024, tokens, 2, LIMITS)
    assert d["one_shot_max_bytes"] == _grid_limit(tokens, 2048, fake.one_shot_until) == 64 << 10
    assert d["lamport_max_bytes"] == 16 << 10
    assert d["lean"] is True and d["lean_pull"] is True
    assert d["bytes_per_cta"] == 32 << 10  # the fewest CTAs that are not slower (ties go to fewer CTAs)
    m = d["measured"]
    # one-shot is not timed past its first loss; lean (and lean_pull) only where two-shot would run
    assert max(m["one_shot"]) == 64 and min(m["lean"]) == 64 and set(m["lean_pull"]) == set(m["lean"])
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
    # lean_pull is decided against lean: it lost at one size (0.9 x two-shot, where lean took 0.7 x)
    d = tune.tune_hidden(FakeTimer(pull_loses_at=1024), 1024, tune.token_grid(4096), 2, LIMITS)
    assert d["lean"] is True and d["lean_pull"] is False
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
    """The shipped h200 entries came from benchmark runs (fused bench at 90cfe5f, emulated world at b92cb3e);
    tokenweave-tune's decision rules applied to those runs' times give the shipped values."""
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
    # lean_pull against lean: every CTA count of the per-CTA table and every size of the mid-range table
    ((_, mid),) = _rows(RESULTS / f"emulated_mid_range-h200-tp{tp}.json").items()
    for table in (cta, mid):
        assert tune.decide_lean_pull({"lean_pull": table["lean_pull"], "lean": table["lean"]}) is shipped["lean_pull"]


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


# ---------------------------------------------------------------------------------------------- the one-GPU stages
CARD = "testcard"  # no shipped config: what tokenweave.tuning reads back comes from the file written alone


@pytest.fixture
def fresh_tuning(user_config, monkeypatch):
    """The user config, with every tuning cache forgotten before and after, and TOKENWEAVE_PDL unset."""
    monkeypatch.delenv("TOKENWEAVE_PDL", raising=False)
    tuning.clear_cache()
    yield user_config
    tuning.clear_cache()


class FakeNormOp(tune.NormOp):
    """An add + RMSNorm with 11 block shapes: ``different`` change one output bit (another summation order: each
    its own, but the shapes of one tuple in ``families`` share one), ``wrong`` move one output element by 1.0,
    ``cannot`` raise at launch,
    ``lazy`` write nothing (the poisoned out stays NaN), ``other_group`` give shape 0's bits on the probe batch but
    have another row group (a lucky probe). Times from ``speed`` (shape -> factor of shape 0's time, or a function
    of tokens); every call is recorded, with the PDL state ``pdl`` holds at the time."""

    def __init__(self, different=(6, 7), cannot=(3,), lazy=(8,), residual_differs=(9,), speed=None, pdl=None,
                 other_group=(), wrong=(), families=()):
        import torch

        self.torch = torch
        self.different, self.cannot, self.lazy, self.residual_differs = different, cannot, lazy, residual_differs
        self.other_group, self.wrong = other_group, wrong
        self.order = {s: min(f) for f in families for s in f}  # the shape whose bit a family flips
        self.speed = speed or {}
        self.pdl = pdl
        self.calls = []
        gen = torch.Generator().manual_seed(3)
        self.rows = tune.NORM_PROBE_ROWS
        self.data = {}
        self.gen = gen

    def _inputs(self, hidden):
        torch = self.torch
        if hidden not in self.data:  # fresh random data, never zeros
            x = torch.randn(self.rows, hidden, generator=self.gen).to(torch.bfloat16)
            res = torch.randn(self.rows, hidden, generator=self.gen).to(torch.bfloat16)
            w = (1 + 0.1 * torch.randn(hidden, generator=self.gen)).to(torch.bfloat16)
            self.data[hidden] = (x, res, w)
        return self.data[hidden]

    def probe(self, shape, hidden):
        from tokenweave.reference import add_rmsnorm_reference

        self.calls.append(("probe", shape, hidden))
        if shape in self.cannot:
            raise RuntimeError(f"tokenweave.add_rmsnorm: launch failed (shape {shape}, hidden {hidden})")
        x, res, w = self._inputs(hidden)
        out, z = add_rmsnorm_reference(x, res, w, 1e-5, dtype=self.torch.bfloat16)
        out, z = out.clone(), z.clone()
        if shape in self.lazy:
            out.fill_(float("nan"))
        if shape in self.different:
            col = hidden // 3 + self.order.get(shape, shape)  # one bit of one element, which by order
            out.view(self.torch.int16)[self.rows // 2, col] ^= 1
        if shape in self.wrong:
            out[self.rows // 2, hidden // 3] += 1.0  # far beyond what a summation order moves
        if shape in self.residual_differs:
            z.view(self.torch.int16)[self.rows - 1, 0] ^= 1
        return out, z

    def row_group(self, shape, hidden):
        return 512 if shape in self.other_group else 256

    def time(self, shape, tokens, hidden):
        self.calls.append(("time", shape, tokens, hidden, None if self.pdl is None else self.pdl[-1]))
        factor = self.speed.get(shape, 1.0 if shape == 0 else 1.1)
        factor = factor(tokens) if callable(factor) else factor
        return (2.0 + tokens * hidden / 1e4) * factor


def _shape4_below(limit):
    return {4: lambda t: 0.8 if t < limit else 1.05, 1: 1.005, 7: 0.5}  # 7 is fastest: adopted only if it is right


def test_same_bits_is_bitwise():
    import torch

    a = torch.tensor([1.0, 0.0, float("nan")], dtype=torch.bfloat16)
    assert tune.same_bits(a, a.clone())
    assert not tune.same_bits(a, torch.tensor([1.0, -0.0, float("nan")], dtype=torch.bfloat16))  # -0 is not +0
    assert not tune.same_bits(a, a.float()) and not tune.same_bits(a, a[:2])
    b = a.clone()
    b.view(torch.int16)[0] ^= 1  # the last mantissa bit
    assert not tune.same_bits(a, b)


def test_norm_candidates_sort_shapes_by_bits_and_order():
    """Shape 0's bits: switchable by batch size. Another summation order (out within NORM_ORDER_TOLERANCE, the
    residual bitwise): a whole-range candidate only. Anything else (NaN out, a residual that differs, an out
    that is wrong) is never a candidate."""
    op = FakeNormOp(wrong=(10,))
    status = tune.norm_candidates(lambda s: op.probe(s, 1024), range(11))
    assert status == {1: tune.SAME_BITS, 2: tune.SAME_BITS, 3: tune.CANNOT_HOLD_ROW, 4: tune.SAME_BITS,
                      5: tune.SAME_BITS, 6: tune.OTHER_ORDER, 7: tune.OTHER_ORDER, 8: tune.DIFFERENT_BITS,
                      9: tune.DIFFERENT_BITS, 10: tune.DIFFERENT_BITS}
    with pytest.raises(RuntimeError):  # shape 0 must run: nothing to compare with otherwise
        tune.norm_candidates(lambda s: FakeNormOp(cannot=(0,)).probe(s, 1024), range(3))
    # same bits on the probe batch but another row group (another summation order, a lucky probe): whole range only
    op = FakeNormOp(other_group=(2, 5))
    status = tune.norm_candidates(lambda s: op.probe(s, 1024), range(11), lambda s: op.row_group(s, 1024))
    assert status[2] == status[5] == tune.OTHER_ORDER and status[1] == status[4] == tune.SAME_BITS
    assert tune.tune_norm(op, [1024], [1, 16], 11)[1024]["shapes"][5] == tune.OTHER_ORDER


def test_norm_decision_needs_more_than_the_margin():
    times = {1: {0: 10.0, 4: 9.85},            # 1.5% faster: within the margin, shape 0
             16: {0: 10.0, 4: 9.7, 5: 9.75},   # 3% faster: the fastest
             128: {0: 10.0, 4: 9.0, 2: 9.0},   # a tie between two: the lower shape number
             1024: {0: 10.0, 9: 10.5},         # slower
             4096: {0: 10.0}}                  # nothing else measured
    assert tune.decide_norm_shapes(times) == {1: 0, 16: 4, 128: 2, 1024: 0, 4096: 0}
    assert tune.decide_norm_shapes(times, margin=0.0)[1] == 4
    assert tune.decide_norm_shapes(times, margin=0.05)[16] == 0
    assert 0 < tune.NORM_MARGIN < 0.1


def test_norm_decision_for_the_whole_range():
    """A whole-range shape (another summation order) replaces the per-count choice everywhere when it is faster
    by more than the margin in geometric mean and at worst twice the margin slower at a count; else nowhere."""
    times = {1: {0: 10.0, 4: 9.0, 16: 9.0},       # per count: 4 (9.0); 16 ties it
             128: {0: 10.0, 4: 9.5, 16: 9.0},     # 4 (9.5); 16 5.6% faster
             4096: {0: 10.0, 4: 11.0, 16: 9.5}}   # 0 (10.0); 16 5.3% faster
    assert tune.decide_norm_shapes(times) == {1: 4, 128: 16, 4096: 16}  # 16 as a per-count shape (4 wins the tie)
    assert tune.decide_norm_shapes(times, whole_range=[16]) == {1: 16, 128: 16, 4096: 16}
    gain, worst = tune.whole_range_gain(times, {1: 9.0, 128: 9.5, 4096: 10.0}, 16)
    assert worst == pytest.approx(1.0) and gain == pytest.approx((9.5 / 9.0 * 10.0 / 9.5) ** (1 / 3))
    times[1][16] = 9.5  # 5.6% slower than 4 at one count: more than twice the margin
    assert tune.decide_norm_shapes(times, whole_range=[16]) == {1: 4, 128: 4, 4096: 0}
    times[1][16] = 9.2; times[128][16] = 9.4; times[4096][16] = 9.9  # within 2% on average: no gain
    assert tune.decide_norm_shapes(times, whole_range=[16]) == {1: 4, 128: 4, 4096: 0}
    times[4096][17] = 1.0  # a whole-range shape not timed at every count is never taken
    assert tune.decide_norm_shapes(times, whole_range=[16, 17]) == {1: 4, 128: 4, 4096: 0}


def test_family_member_displaces_its_anchor_only_by_more_than_the_margin():
    """Within a family the anchor (best geometric mean over the fastest member) serves every count where no member
    beats it by more than the margin: members within noise of each other no longer swap places by count."""
    times = {1: {0: 10.0, 16: 9.0, 22: 8.9},      # 22 1.1% faster: within 2%, the anchor 16 stays
             128: {0: 10.0, 16: 9.0, 22: 9.1},
             1024: {0: 10.0, 16: 9.0, 22: 8.7},   # 22 3.3% faster: it serves here
             4096: {0: 10.0, 16: 9.0}}             # 22 not timed here: it cannot be the anchor
    assert tune.family_choice(times, (16, 22)) == {1: 22, 128: 16, 1024: 22, 4096: 16}  # no margin: the fastest
    assert tune.family_choice(times, (16, 22), margin=0.02) == {1: 16, 128: 16, 1024: 22, 4096: 16}
    assert tune.family_choice(times, (22,), margin=0.02) == {1: 22, 128: 22, 1024: 22}  # never timed at 4096
    # decide_norm_shapes chooses the member by FAMILY_MARGIN (1%) and FAMILY_MIN_US, not NORM_MARGIN: 22's 1.1% at 1
    # token is 0.1 us, under the floor in microseconds
    assert tune.decide_norm_shapes(times, whole_range=[(16, 22)]) == {1: 16, 128: 16, 1024: 22, 4096: 16}
    assert tune.family_choice(times, (16, 22), tune.FAMILY_MARGIN) == {1: 22, 128: 16, 1024: 22, 4096: 16}
    assert tune.decide_norm_shapes(times, whole_range=[(16, 22)], family_margin=0.02) == {
        1: 16, 128: 16, 1024: 22, 4096: 16}
    gain, worst = tune.whole_range_gain(times, {t: 10.0 for t in times}, (16, 22), margin=0.02)
    assert worst == pytest.approx(10.0 / 9.0) and gain == pytest.approx((10 / 9.0) ** 0.75 * (10 / 8.7) ** 0.25)
    times[128][22] = 8.0  # now 22 has the best geometric mean where both ran, yet is not timed at 4096: 16 anchors
    assert tune.family_choice(times, (16, 22), margin=0.02) == {1: 16, 128: 22, 1024: 22, 4096: 16}
    # both timed everywhere: the anchor is the best geometric mean (22 here, not the lower shape 16), and a member
    # exactly the margin faster does not displace it while one just beyond does
    both = {1: {16: 10.0, 22: 9.5}, 128: {16: 10.0, 22: 9.7}, 1024: {16: 9.8, 22: 10.0}, 4096: {16: 9.8, 22: 10.0}}
    for order in ((16, 22), (22, 16)):
        assert tune.family_choice(both, order, margin=0.03) == {t: 22 for t in both}
        assert tune.family_choice(both, order, margin=0.01) == {1: 22, 128: 22, 1024: 16, 4096: 16}
    edge = {1: {16: 10.0, 22: 7.5}, 2: {16: 10.0, 22: 20.0}}  # 16 anchors; at 1 token 22 is exactly 25% faster
    assert tune.family_choice(edge, (16, 22), margin=0.25) == {1: 16, 2: 16}
    assert tune.family_choice(edge, (16, 22), margin=0.24) == {1: 22, 2: 16}


def test_family_member_needs_more_than_the_counts_noise():
    """A member displaces the anchor only by more than FAMILY_MARGIN, the noise of like-length calls (run_noise) and
    FAMILY_MIN_US: the 4096 x 4096 case of 95d8f74, where 24 was 1.7% faster than the anchor 18, and the 1 x 4096
    case of 7314e38, where 25 was 0.06 us faster in the tune and 0.12 us slower in the bench."""
    times = {1: {0: 2.34, 18: 1.73, 24: 1.87, 25: 1.68},  # 25 2.9% faster, but by 0.05 us (rounded times)
             8: {0: 2.43, 18: 1.81, 24: 1.80},        # 0.55% faster: under 1%
             16: {0: 2.5, 18: 1.90, 24: 2.05},
             128: {0: 2.75, 18: 1.93, 24: 2.04},      # 18 faster at few tokens: the anchor (best geometric mean)
             2048: {0: 19.0, 18: 16.97, 24: 16.03},   # 5.5% faster, noise 0.74%
             4096: {0: 37.2, 18: 34.66, 24: 34.08},   # 1.7% faster, noise 0.05% here, 0.74% at 2048
             8192: {0: 80.0, 18: 70.0, 24: 68.8}}     # 1.7% faster, but shape 0's two times differ by 2%
    repeat = {1: 2.33, 8: 2.44, 2048: 18.86, 4096: 37.22, 8192: 81.6}
    noise = tune.run_noise(times, repeat)
    # each count takes the largest sample among calls from half to twice as long, its own or not
    assert set(noise) == set(times)
    assert noise[16] == noise[128] == noise[1]  # not timed twice: the samples of 1 and 8 (2.33-2.43 us)
    assert noise[1] == noise[8] == pytest.approx(0.01 / 2.33)
    assert noise[2048] == noise[4096] == pytest.approx(0.14 / 18.86)  # 37.2 us is within twice 18.86
    assert noise[8192] == pytest.approx(0.02)  # 80 us: only 80 is its like (37.2 < 40): its own 2%
    assert tune.run_noise(times, None) == {}
    only8 = tune.run_noise(times, {8: 2.4})  # one sample, 3/240: it speaks for the calls of 1.2-4.8 us only
    assert only8 == {t: pytest.approx(0.03 / 2.4) for t in (1, 8, 16, 128)}
    assert tune.FAMILY_MARGIN == 0.01 < tune.NORM_MARGIN and 0 < tune.FAMILY_MIN_US < 1
    small = {8: 18, 16: 18, 128: 18}
    rule = (tune.FAMILY_MARGIN, noise, tune.FAMILY_MIN_US)
    assert tune.family_choice(times, (18, 24, 25), *rule) == {1: 18, **small, 2048: 24, 4096: 24, 8192: 18}
    assert tune.family_choice(times, (18, 24, 25), tune.FAMILY_MARGIN, noise) == {  # no floor in us: 25 at 1 token
        1: 25, **small, 2048: 24, 4096: 24, 8192: 18}
    assert tune.family_choice(times, (18, 24, 25), tune.FAMILY_MARGIN) == {1: 25, **small, 2048: 24, 4096: 24,
                                                                           8192: 24}  # no noise either
    assert tune.family_choice(times, (18, 24, 25), 0.0, None, 0.95)[2048] == 18  # 0.94 us faster: not enough
    assert tune.family_choice(times, (18, 24, 25), 0.0, None, 0.93)[2048] == 24
    assert tune.family_choice(times, (18, 24, 25), 0.0, None, 0.93)[4096] == 18  # 0.58 us
    assert tune.decide_norm_shapes(times, repeat=repeat, whole_range=[(18, 24, 25)]) == {
        1: 18, **small, 2048: 24, 4096: 24, 8192: 18}
    # the old margin (NORM_MARGIN, 2%) kept the anchor at 4096
    assert tune.decide_norm_shapes(times, repeat=repeat, whole_range=[(18, 24, 25)], family_margin=0.02)[4096] == 18


def test_norm_decision_against_shape_0_timed_twice():
    """Shape 0 timed again after the others: the faster of its two times is the reference, and a shape must beat it
    by more than the margin and by more than the noise at that size (run_noise: the largest difference of the two
    among calls from half to twice as long)."""
    times = {2: {0: 2.6, 1: 2.4},          # shape 0's own kernel, 8% "faster" than a slow first timing of shape 0
             16: {0: 10.0, 4: 9.7},        # 3% faster, shape 0 steady: wins
             128: {0: 25.0, 4: 23.75},     # 5% faster, but shape 0's two times differ by 6%: noise
             1024: {0: 83.2, 9: 79.2}}     # 1% faster than the faster time of shape 0 only: within the margin
    repeat = {2: 2.4, 16: 10.02, 128: 26.5, 1024: 80.0}
    assert tune.decide_norm_shapes(times) == {2: 1, 16: 4, 128: 4, 1024: 9}  # one time of shape 0 each: fooled
    assert tune.decide_norm_shapes(times, repeat=repeat) == {2: 0, 16: 4, 128: 0, 1024: 0}
    assert tune.decide_norm_shapes(times, repeat={16: 10.02}) == {2: 1, 16: 4, 128: 4, 1024: 9}  # per count
    # a call of like length (15 us, within twice 10) that was 6.7% noisy makes 16's 3% noise too
    like = {**times, 32: {0: 15.0}}
    assert tune.decide_norm_shapes(like, repeat={**repeat, 32: 16.0})[16] == 0


def test_token_ranges_cover_every_count_once():
    choice = {1: 0, 2: 0, 16: 4, 128: 4, 1024: 9, 4096: 0}
    assert tune.token_ranges(choice) == [(1, 15, 0), (16, 1023, 4), (1024, 4095, 9), (4096, None, 0)]
    assert tune.token_ranges({128: 0, 16: 4}) == [(1, 127, 4), (128, None, 0)]  # the first range starts at 1
    assert tune.token_ranges({8: 5}) == [(1, None, 5)]
    assert tune.common_choice({4096: {1: 4, 16: 0}, 8192: {1: 4, 16: 4}}) == {1: 4, 16: None}


def test_tune_norm_times_only_candidates_and_decides():
    op = FakeNormOp(speed=_shape4_below(4096), different=(6,), wrong=(7,))
    tokens = tune.token_grid(8192)
    progress = tune.Progress(tune.planned_norm_timings([1024], tokens, 11), enabled=False)
    (result,) = tune.tune_norm(op, [1024], tokens, 11, progress).values()
    timed = {c[1] for c in op.calls if c[0] == "time"}
    assert timed == {0, 1, 2, 4, 5, 10, 6}  # shape 0, the shapes with its bits, another order (6); never 3, 7, 8, 9
    assert progress.n == progress.total  # the shapes not timed were counted as skipped
    assert result["choice"] == {t: 4 if t < 4096 else 0 for t in tokens}  # 6 is slower: not for the whole range
    assert set(result["measured"][1]) == timed
    assert set(result["repeat"]) == set(tokens)  # shape 0 timed again at every count, after the others
    first_count = [c[1:4] for c in op.calls if c[0] == "time"][:len(timed) + 1]
    assert first_count[-2:] == [(6, 1, 1024), (0, 1, 1024)]  # the last candidate, then shape 0 again
    # nothing to choose from: nothing timed, shape 0 everywhere
    alone = FakeNormOp(different=(), wrong=range(1, 11), cannot=(), lazy=(), residual_differs=())
    (result,) = tune.tune_norm(alone, [1024], [1, 16], 11).values()
    assert result["measured"] == {} and result["choice"] == {1: 0, 16: 0}
    assert not any(c[0] == "time" for c in alone.calls)


def test_tune_norm_takes_another_order_for_every_count_or_none():
    """A shape with another summation order (7) that is twice as fast everywhere serves every token count; the
    same shape slower than the per-count choice at one count by more than twice the margin serves none."""
    tokens = [1, 16, 128, 1024, 4096]
    (result,) = tune.tune_norm(FakeNormOp(speed=_shape4_below(4096)), [1024], tokens, 11).values()
    assert result["shapes"][7] == tune.OTHER_ORDER and result["choice"] == {t: 7 for t in tokens}
    slow_at_one = {**_shape4_below(4096), 7: lambda t: 1.2 if t == 16 else 0.5}  # 0.8 at 16 is shape 4's
    (result,) = tune.tune_norm(FakeNormOp(speed=slow_at_one), [1024], tokens, 11).values()
    assert result["choice"] == {t: 4 if t < 4096 else 0 for t in tokens}


def test_norm_families_share_bits_and_threads_per_row():
    """Shapes of another order are one family where they give the same bits on the probe batch and run a row on
    as many threads; bits alike but another row group (a lucky probe) is another family."""
    op = FakeNormOp(different=(5, 6, 7), families=((6, 7),), other_group=(2, 4))
    probe = lambda s: op.probe(s, 1024)  # noqa: E731
    assert tune.norm_families(probe, [7, 6, 5, 4, 2], lambda s: op.row_group(s, 1024)) == [(2, 4), (5,), (6, 7)]
    assert tune.norm_families(probe, [5, 6, 7], lambda s: 128 if s == 7 else 256) == [(5,), (6,), (7,)]
    assert tune.norm_families(probe, [], None) == []


def test_tune_norm_takes_a_family_member_by_count(fresh_tuning):
    """6 and 7 sum a row in one order (one family): 6 is fast below 1024 tokens, 7 from 1024. Alone, each is far
    slower than the per-count choice at some count, so neither serves the whole range; together, each where it is
    fastest, they do: the rows' bits are the family's at every batch size. Each entry holds every count's times,
    says so, and re-derives its shape at its own counts."""
    tokens = [1, 16, 128, 1024, 4096]
    speed = {**_shape4_below(4096), 6: lambda t: 0.5 if t < 1024 else 1.2, 7: lambda t: 1.2 if t < 1024 else 0.5}
    alone = tune.tune_norm(FakeNormOp(speed=speed), [4096], tokens, 11)[4096]
    assert alone["families"] == [(6,), (7,)] and alone["choice"] == {t: 4 for t in tokens[:4]} | {4096: 0}
    norm = tune.tune_norm(FakeNormOp(speed=speed, families=((6, 7),)), [4096], tokens, 11)
    assert norm[4096]["families"] == [(6, 7)]
    assert norm[4096]["choice"] == {t: 6 if t < 1024 else 7 for t in tokens}
    entries = tune.make_norm_entries(norm, 2, "shape", _one_prov())
    assert [(e["min_tokens"], e.get("max_tokens"), e["shape"], e["other_order"]) for e in entries] == [
        (1, 1023, 6, [[6, 7]]), (1024, None, 7, [[6, 7]])]
    for e in entries:
        assert "its family (shapes 6, 7" in e["source"] and set(e["measured"][4096]) == set(tokens)
        assert _rederived(e) == {4096: {e["shape"]}}
    tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=entries)
    tuning.clear_cache()
    assert {t: tuning.norm_shape(CARD, t, 4096, 2) for t in (1, 1023, 1024, 10 ** 6)} == {
        1: 6, 1023: 6, 1024: 7, 10 ** 6: 7}


def test_programmatic_decision():
    def m(off, on, rep):
        return {"pdl_off": off, "pdl_on": on, "pdl_off_repeat": rep}

    win, tie, loss = m(3.0, 2.7, 3.01), m(3.0, 3.05, 3.1), m(3.0, 3.3, 3.01)
    assert tune.decide_programmatic({1: win, 16: win, 128: win}) is True
    assert tune.decide_programmatic({1: tie, 16: win, 128: win}) is True    # a majority of wins, no loss
    assert tune.decide_programmatic({1: tie, 16: tie, 128: win}) is False   # one win of three
    assert tune.decide_programmatic({1: loss, 16: win, 128: win}) is False  # a loss vetoes
    assert tune.decide_programmatic({1: win, 16: tie}) is False              # half is not more than half
    assert tune.decide_programmatic({1: m(3.0, 2.8, 3.25)}) is False  # gained 0.2, noise 0.25: a tie
    assert tune.decide_programmatic({}) is None


def test_shipped_one_gpu_entries_follow_from_their_times():
    """The rule applied to the committed PDL run (norm_chain at LAUNCH_TOKENS) turns PDL on; the shipped h200
    "launch" entry agrees with the times it was decided from (its own "measured" once tokenweave-tune wrote it,
    else that run), and every shipped "norm" entry tokenweave-tune wrote has the shape its times give."""
    doc = json.loads((RESULTS / "pdl-h200-tp1.json").read_text())
    committed = {}
    for r in doc["rows"]:
        if r["table"] == "norm_chain" and r["tokens"] in tune.LAUNCH_TOKENS:
            committed.setdefault(r["tokens"], {})[r["variant"]] = r["us"]
    assert set(committed) == set(tune.LAUNCH_TOKENS)
    assert tune.decide_programmatic(committed) is True
    shipped = json.loads((tuning.CONFIG_DIR / "h200.json").read_text())
    launch = shipped["launch"][0]
    measured = ({int(t): m for t, m in next(iter(launch["measured"].values())).items()} if "measured" in launch
                else committed)
    assert tune.decide_programmatic(measured) is launch["programmatic"]
    for path in tuning.CONFIG_DIR.glob("*.json"):
        for e in json.loads(path.read_text()).get("norm", []):
            if "measured" in e:
                assert all(shapes == {e["shape"]} for shapes in _rederived(e).values()), (path.name, e)


def _rederived(e: dict) -> dict[int, set[int]]:
    """hidden -> the shapes decide_norm_shapes gives, at the entry's own token counts, from a "norm" entry's times
    ("measured", "shape0_again").

    The families of another summation order ("other_order", lists of shapes) are decided over every count at
    once, so the entry of such a shape holds every count's times (the family's member may serve part of them); an
    entry of another shape holds its own counts and re-derives the per-count choice among the shapes of shape 0's
    bits (whether a family should have won needs the counts outside it)."""
    families = [f if isinstance(f, list) else [f] for f in e.get("other_order", [])]
    whole = {s for f in families for s in f}
    lo, hi = e.get("min_tokens", 1), e.get("max_tokens")
    decided = {}
    for hidden, times in e["measured"].items():
        by_count = {int(t): {int(s): us for s, us in m.items()} for t, m in times.items()}
        again = e.get("shape0_again", {}).get(hidden)  # shape 0 timed again, where the tune did that
        repeat = {int(t): us for t, us in again.items()} if again is not None else None
        if e["shape"] in whole:
            assert min(by_count) <= lo and (hi is None or max(by_count) > hi), e  # every count the tune measured
        else:
            by_count = {t: {s: us for s, us in m.items() if s not in whole} for t, m in by_count.items()}
        choice = tune.decide_norm_shapes(by_count, repeat=repeat, whole_range=families)
        decided[int(hidden)] = {s for t, s in choice.items() if t >= lo and (hi is None or t <= hi)}
    return decided


def test_norm_decision_on_the_committed_run():
    """The decision rule on the committed add_rmsnorm run agrees with the shipped H200 "norm" entries (tuned in
    another run of that commit, on a finer grid of counts). Where the shipped entries of a hidden use a family of
    another summation order (the families: the committed tune run's "norm_families"), the rule on the bench's
    times adopts that family too; elsewhere, among the shapes of shape 0's row groups (shape 1 is shape 0's kernel
    at these hiddens), it agrees wherever a shape wins by more than 5%, over twice the margin."""
    table = _rows(RESULTS / "add_rmsnorm-h200-tp1.json")
    families = {int(h): [tuple(f) for f in fs]
                for h, fs in json.loads((RESULTS / "tune-h200-tp1.json").read_text())["norm_families"].items()}
    for hidden, variants in table.items():
        times = {t: {0: variants["tokenweave_cfg1"][t]} for t in variants["tokenweave_cfg1"]}
        for k in range(2, 64):
            for t, us in variants.get(f"tokenweave_cfg{k}", {}).items():
                times[t][k] = us
        shipped = {t: tuning._norm_shape("h200", t, hidden, 2, None) for t in times}
        family = next((f for f in families[hidden] if set(shipped.values()) <= set(f)), None)
        if family is not None:
            decided = tune.decide_norm_shapes(times, whole_range=families[hidden])
            assert set(decided.values()) <= set(family), (hidden, decided, family)
            continue
        others = {s for f in families[hidden] for s in f}
        same_order = {t: {k: us for k, us in m.items() if k not in others} for t, m in times.items()}
        clear = {t: k for t, k in tune.decide_norm_shapes(same_order, margin=0.05).items() if k != 0}
        assert clear and clear == {t: shipped[t] for t in clear}, (hidden, clear, shipped)
    assert any(set(f) >= {16, 20} for f in families[8192])  # the 8-byte-piece family at 8192 (launch.cu)


def test_tune_launch_and_the_pdl_setting_is_restored():
    setting = []
    order = []

    def measure(on, tokens):
        order.append((tokens, on))
        return 3.0 - 0.3 * on

    op = FakeNormOp(speed=_shape4_below(64), pdl=setting, different=(6,), wrong=(7,))
    one = tune.OneGpu(norm=op, num_shapes=11, launch=measure, set_programmatic=setting.append, programmatic=False)
    norm, launch = tune.tune_one_gpu(one, [1024], [1, 128], True, True)
    assert order == [(t, on) for t in tune.LAUNCH_TOKENS for on in (False, True, False)]
    assert launch["programmatic"] is True and set(launch["measured"]) == set(tune.LAUNCH_TOKENS)
    assert {c[-1] for c in op.calls if c[0] == "time"} == {True}  # the norm stage ran as the launch stage decided
    assert setting[-1] is False  # restored
    assert norm[1024]["choice"] == {1: 4, 128: 0}

    class Broken(FakeNormOp):
        def time(self, *a):
            raise ValueError("boom")

    setting.clear()
    one = tune.OneGpu(norm=Broken(speed={}), num_shapes=11, launch=measure, set_programmatic=setting.append,
                      programmatic=True)
    with pytest.raises(ValueError):
        tune.tune_one_gpu(one, [1024], [1], True, False)
    assert setting == [True]  # restored after a failure too


def _one_prov(card=CARD):
    return tune.Provenance(card, "Test GPU", 2, False, "2.11.0", "abc1234", "2025-01-01", "bfloat16",
                           "bench/results/tune-testcard-tp2.json")


def _norm_results(choices, candidates=(1, 4)):
    """tune_norm's result for given choices (tokens -> shape per hidden), with made-up times."""
    out = {}
    for h, choice in choices.items():
        measured = {t: {0: 10.0, **{s: (8.0 if s == c else 10.5) for s in candidates}} for t, c in choice.items()}
        out[h] = {"shapes": {s: tune.SAME_BITS for s in candidates} | {6: tune.DIFFERENT_BITS},
                  "measured": measured, "choice": choice}
    return out


def test_norm_entry_for_another_order_covers_every_count(fresh_tuning):
    """Where a shape with another summation order won the whole range, one entry per hidden from 1 token on, which
    says so, lists the shapes of other orders that were timed, and from which its decision is re-derived."""
    tokens = [1, 16, 128, 1024]
    norm = tune.tune_norm(FakeNormOp(speed=_shape4_below(4096)), [4096], tokens, 11)
    norm[8192] = tune.tune_norm(FakeNormOp(speed=_shape4_below(4096), different=(6,), wrong=(7,)), [8192], tokens,
                                11)[8192]
    for key in ("shape", "world"):
        entries = tune.make_norm_entries(norm, 2, key, _one_prov())
        assert [(e.get("hidden"), e["min_tokens"], e.get("max_tokens"), e["shape"]) for e in entries] == [
            (4096, 1, None, 7), (8192, 1, None, 4)], key
        whole, per_count = entries
        assert whole["other_order"] == [[6], [7]] and per_count["other_order"] == [[6]]
        assert "another order than shape 0, so it serves every token count or none" in whole["source"]
        for e in entries:
            (hidden, times), = e["measured"].items()
            again = {t: us for t, us in e["shape0_again"][hidden].items()}
            assert set(tune.decide_norm_shapes(times, repeat=again, whole_range=e["other_order"]).values()) == \
                {e["shape"]}
            assert _rederived(e) == {int(hidden): {e["shape"]}}
        fresh_tuning.unlink(missing_ok=True)
        tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=entries)
        tuning.clear_cache()
        assert {tuning.norm_shape(CARD, t, 4096, 2) for t in (1, 100, 5000, 10 ** 6)} == {7}
        assert tuning.norm_shape(CARD, 16, 8192, 2) == 4


def test_world_entries_never_carry_another_order(fresh_tuning):
    """--key world: a shape with another summation order at some measured hidden serves that hidden through its
    own entries only. In a "max_hidden" entry it would reach hiddens never measured, at some token counts only (a
    row's bits would depend on its batch) or where it cannot hold the row (shape 16 holds 4097-8192 elements)."""
    tokens = [1, 16, 128, 1024]
    # 4096: 7 sums in another order and wins every count; 8192: 7 has shape 0's bits and wins below 128 tokens
    norm = tune.tune_norm(FakeNormOp(speed=_shape4_below(4096)), [4096], tokens, 11)
    fast_below_128 = {**_shape4_below(4096), 7: lambda t: 0.5 if t < 128 else 1.1}
    norm[8192] = tune.tune_norm(FakeNormOp(speed=fast_below_128, different=(6,)), [8192], tokens, 11)[8192]
    assert norm[4096]["choice"] == {t: 7 for t in tokens} and norm[8192]["choice"] == {1: 7, 16: 7, 128: 4, 1024: 4}
    # both hiddens take 7 for the whole range: still one entry per hidden, none for the hiddens between
    both = tune.tune_norm(FakeNormOp(speed=_shape4_below(4096)), [4096, 8192], tokens, 11)
    for results, hidden_8192 in ((norm, {1: 7, 100: 7, 128: 4, 5000: 4}), (both, {1: 7, 100: 7, 128: 7, 5000: 7})):
        entries = tune.make_norm_entries(results, 2, "world", _one_prov())
        assert all("hidden" in e for e in entries if e["shape"] == 7), entries
        fresh_tuning.unlink(missing_ok=True)
        tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=entries)
        tuning.clear_cache()
        assert {t: tuning.norm_shape(CARD, t, 4096, 2) for t in hidden_8192} == {t: 7 for t in hidden_8192}
        assert {t: tuning.norm_shape(CARD, t, 8192, 2) for t in hidden_8192} == hidden_8192
        assert {tuning.norm_shape(CARD, t, h, 2) for h in (1024, 2048, 5120) for t in (1, 100, 5000)} == {0}
        for e in entries:
            assert set().union(*_rederived(e).values()) == {e["shape"]}, e


def test_an_entry_over_part_of_the_counts_rederives_its_per_count_choice():
    """6 (another order) beats shape 4 where 4 won (below 128 tokens) but is far slower after: not taken. 4's entry
    holds only its own counts, on which alone 6 would have won: it re-derives the per-count choice among the shapes
    of shape 0's bits; the whole-range decision needs every count."""
    tokens = [1, 16, 128, 1024]
    speed = {**_shape4_below(128), 6: lambda t: 0.7 if t < 128 else 1.2}
    norm = tune.tune_norm(FakeNormOp(speed=speed, different=(6,), wrong=(7,)), [4096], tokens, 11)
    assert norm[4096]["choice"] == {1: 4, 16: 4, 128: 0, 1024: 0}
    (entry,) = tune.make_norm_entries(norm, 2, "shape", _one_prov())
    assert (entry["min_tokens"], entry["max_tokens"], entry["shape"], entry["other_order"]) == (1, 127, 4, [[6]])
    assert _rederived(entry) == {4096: {4}}
    times = {int(t): {int(s): us for s, us in m.items()} for t, m in entry["measured"][4096].items()}
    again = {int(t): us for t, us in entry["shape0_again"][4096].items()}
    assert set(tune.decide_norm_shapes(times, repeat=again, whole_range=[6]).values()) == {6}  # the part alone


def test_a_user_tune_of_a_hidden_is_never_filled_from_the_shipped_family(fresh_tuning):
    """The shipped H200 config serves hidden 8192 with a family of another summation order at every count. A user's
    own tune of 8192 that kept shape 0 at some counts (no entry there) and a shape of shape 0's bits at others must
    decide every count of 8192 alone: filling its gaps from the shipped family would give a row other bits in a
    larger batch. Hiddens the user did not tune still take the shipped entries."""
    shipped = {t: tuning.norm_shape("h200", t, 8192, 2) for t in (1, 16, 128, 1024, 4096, 8192)}
    orders = {s for e in json.loads((tuning.CONFIG_DIR / "h200.json").read_text())["norm"]
              for f in e.get("other_order", []) for s in (f if isinstance(f, list) else [f])}
    assert set(shipped.values()) <= orders, shipped  # the premise: the shipped 8192 entries are a family's
    for match in ({"hidden": 8192}, {"max_hidden": 8192}):  # --key shape, --key world
        fresh_tuning.write_text(json.dumps({"device": "h200", "norm": [
            {"device": "h200", "itemsize": 2, **match, "min_tokens": 1, "max_tokens": 127, "shape": 4}]}))
        tuning.clear_cache()
        assert {t: tuning.norm_shape("h200", t, 8192, 2) for t in shipped} == {
            1: 4, 16: 4, 128: 0, 1024: 0, 4096: 0, 8192: 0}, match
        assert tuning.norm_shape("h200", 16, 4096, 2) == (4 if "max_hidden" in match else
                                                          tuning._norm_shape("h200", 16, 4096, 2, None))
        assert tuning.norm_shape("h200", 1024, 8192, 4) == 0  # another dtype size: no entry anywhere


def test_norm_entries_per_hidden_and_world_read_back(fresh_tuning):
    grid = [1, 16, 128, 1024, 4096, 8192]
    choices = {4096: {1: 0, 16: 4, 128: 4, 1024: 0, 4096: 0, 8192: 0},
               8192: {1: 0, 16: 4, 128: 4, 1024: 4, 4096: 0, 8192: 1}}
    norm = _norm_results(choices)

    def expected(hidden, tokens):
        choice = choices[hidden]
        measured = max(t for t in grid if t <= tokens)
        return choice[measured]

    shape = tune.make_norm_entries(norm, 2, "shape", _one_prov())
    assert [(e["hidden"], e["min_tokens"], e.get("max_tokens"), e["shape"]) for e in shape] == [
        (4096, 16, 1023, 4), (8192, 16, 4095, 4), (8192, 8192, None, 1)]
    e = shape[0]
    for field in ("itemsize", "source", "device", "device_name", "gpus", "torch", "git", "date", "dtype", "measured"):
        assert field in e, field
    assert e["measured"] == {4096: {16: {0: 10.0, 1: 10.5, 4: 8.0}, 128: {0: 10.0, 1: 10.5, 4: 8.0}}}
    assert "8.00 vs 10.00 us at 16 x 4096" in e["source"] and "bench/results/tune-testcard-tp2.json" in e["source"]
    assert "emulated" not in e  # one real GPU in every mode

    world = tune.make_norm_entries(norm, 2, "world", _one_prov())
    assert [(e.get("hidden"), e.get("max_hidden"), e["min_tokens"], e.get("max_tokens"), e["shape"])
            for e in world] == [(8192, None, 1024, 4095, 4), (8192, None, 8192, None, 1), (None, 8192, 16, 1023, 4)]
    for key, entries in (("shape", shape), ("world", world)):
        fresh_tuning.unlink(missing_ok=True)
        tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=entries,
                          scopes=tune.norm_scopes(CARD, 2, choices, key))
        tuning.clear_cache()
        tokens = sorted(set(grid) | {t - 1 for t in grid if t > 1} | {t + 1 for t in grid} | {65536})
        for hidden in choices:
            for t in tokens:
                assert tuning.norm_shape(CARD, t, hidden, 2) == expected(hidden, t), (key, hidden, t)
            assert tuning.norm_shape(CARD, 128, hidden, 4) == 0  # another dtype size
        assert tuning.norm_shape(CARD, 128, 16384, 2) == 0  # above every hidden measured
        assert tuning.norm_shape("h100", 128, 8192, 2) == 0  # other cards ignore the file
    assert tuning.norm_shape(CARD, 128, 2048, 2) == 4  # --key world: a smaller hidden takes the agreed shape


def test_new_sections_merge_without_disturbing_the_rest(fresh_tuning):
    old_norm = [{"hidden": 4096, "itemsize": 2, "max_tokens": 10, "shape": 5, "source": "stale, measured hidden"},
                {"hidden": 5120, "itemsize": 2, "shape": 5, "source": "kept: hidden not measured"},
                {"itemsize": 4, "max_hidden": 8192, "shape": 9, "source": "kept: other dtype size"},
                {"itemsize": 2, "max_hidden": 8192, "max_tokens": 4095, "shape": 4, "source": "stale world entry"}]
    doc = {"device": CARD, "about": "mine", "entries": [{"world_size": 8, "one_shot_max_bytes": 1, "source": "e"}],
           "trigger": [{"world_size": 2, "auto_min_tokens": None, "source": "t"}], "norm": old_norm,
           "launch": [{"device": "other", "programmatic": True, "source": "another card"},
                      {"programmatic": False, "source": "old", "note": "kept"},
                      {"programmatic": True, "source": "shadowed duplicate"}]}
    fresh_tuning.write_text(json.dumps(doc))
    norm = _norm_results({4096: {1: 4, 1024: 0}, 8192: {1: 4, 1024: 0}})
    launch = {"programmatic": True, "measured": {t: {"pdl_off": 3.0, "pdl_on": 2.5, "pdl_off_repeat": 3.0}
                                                 for t in tune.LAUNCH_TOKENS}}
    tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=tune.make_norm_entries(norm, 2, "world", _one_prov()),
                      scopes=tune.norm_scopes(CARD, 2, [4096, 8192], "world"),
                      launch=tune.make_launch_entry(launch, 8192, _one_prov()))
    new = json.loads(fresh_tuning.read_text())
    assert {k: new[k] for k in ("device", "about", "entries", "trigger")} == {
        k: doc[k] for k in ("device", "about", "entries", "trigger")}
    assert [e["source"].split(":")[0] for e in new["norm"]] == [
        "kept", "kept", "tokenweave-tune on 1 x Test GPU (abc1234, torch 2.11.0, 2025-01-01)"]
    (tuned,) = [e for e in new["norm"] if "tokenweave-tune" in e["source"]]
    assert (tuned["max_hidden"], tuned["min_tokens"], tuned["max_tokens"], tuned["shape"]) == (8192, 1, 1023, 4)
    assert [e["source"] for e in new["launch"]][0] == "another card" and len(new["launch"]) == 2
    mine = new["launch"][1]
    assert mine["programmatic"] is True and mine["note"] == "kept" and mine["device"] == CARD
    assert mine["measured"]["8192"]["16"] == {"pdl_off": 3.0, "pdl_on": 2.5, "pdl_off_repeat": 3.0}
    assert "won (by more than the noise |off - off repeat|) at 3 of 3" in mine["source"]
    tuning.clear_cache()
    on, why = tuning.programmatic_launch(CARD)
    assert on is True and str(fresh_tuning) in why
    assert tuning.norm_shape(CARD, 1000, 8192, 2) == 4 and tuning.norm_shape(CARD, 2000, 8192, 2) == 0
    assert tuning.norm_shape(CARD, 10, 5120, 2) == 5 and tuning.norm_shape(CARD, 10, 1024, 4) == 9

    # a re-tune where shape 0 wins everywhere removes the stale ranges of what it measured, writes none
    quiet = _norm_results({4096: {1: 0}, 8192: {1: 0}})
    tune.write_config(fresh_tuning, CARD, "Test GPU", [], norm=tune.make_norm_entries(quiet, 2, "world", _one_prov()),
                      scopes=tune.norm_scopes(CARD, 2, [4096, 8192], "world"))
    assert [e["source"] for e in json.loads(fresh_tuning.read_text())["norm"]] == [
        old_norm[1]["source"], old_norm[2]["source"]]


def test_run_plan_writes_all_three_sections(fresh_tuning, capsys):
    plan = tune.Plan(2, False, (1024, 2048), tuple(tune.token_grid(8192)), "bfloat16", "world", str(fresh_tuning),
                     None, 5, 3, show_progress=False)
    setting = []
    op = FakeNormOp(speed=_shape4_below(4096), pdl=setting, different=(6,), wrong=(7,))
    one = tune.OneGpu(norm=op, num_shapes=11, launch=lambda on, t: 3.0 - 0.3 * on, set_programmatic=setting.append)
    tuned = tune.run_plan(plan, FakeTimer(), LIMITS, _one_prov(), one)
    doc = json.loads(fresh_tuning.read_text())
    assert len(doc["entries"]) == 1 and doc["entries"][0]["world_size"] == 2
    assert [(e.get("max_hidden"), e["min_tokens"], e["max_tokens"], e["shape"]) for e in doc["norm"]] == [
        (2048, 1, 4095, 4)]
    assert doc["launch"][0]["programmatic"] is True
    assert json.loads(json.dumps(tuned.launch_entry)) == doc["launch"][0]
    tuning.clear_cache()
    assert tuning.norm_shape(CARD, 4095, 2048, 2) == 4 and tuning.norm_shape(CARD, 4096, 2048, 2) == 0
    assert tuning.programmatic_launch(CARD)[0] is True
    assert tuning.dispatch_config(CARD, 2, 2, 1024).source.startswith(str(fresh_tuning))
    tune.report(plan, tuned, CARD)
    out = capsys.readouterr().out
    assert "norm, bfloat16, hidden <= 2048, 1-4095 tokens: shape 4" in out and "programmatic dependent launch on" in out
    rows = tune.one_gpu_rows(tuned.norm, tuned.launch, 2048, "bfloat16")
    assert {r["table"] for r in rows} == {"norm", "launch"} and all(r["us"] > 0 for r in rows)

    # float32: nothing measured or written for "norm", and it says so; --no-allreduce: no dispatch entries
    fresh_tuning.unlink()
    plan32 = tune.Plan(1, False, (1024,), (1, 16), "float32", "shape", str(fresh_tuning), None, 5, 3,
                       show_progress=False, allreduce=False)
    op = FakeNormOp()
    one = tune.OneGpu(norm=op, num_shapes=11, launch=lambda on, t: 3.0, set_programmatic=setting.append)
    tuned = tune.run_plan(plan32, None, None, _one_prov(), one)
    doc = json.loads(fresh_tuning.read_text())
    assert doc["entries"] == [] and "norm" not in doc and op.calls == []
    assert doc["launch"][0]["programmatic"] is False  # every point a tie
    assert any("2-byte dtypes only" in n for n in tuned.notes)


def test_command_line_stages():
    plan = tune.resolve(_args("--hidden", "4096", "8192", "--no-allreduce"), visible_gpus=1)
    assert (plan.world_size, plan.emulated, plan.allreduce, plan.norm, plan.launch) == (1, False, False, True, True)
    plan = tune.resolve(_args("--hidden", "1024", "--emulated", "2", "--no-norm"), visible_gpus=1)
    assert plan.allreduce and not plan.norm and plan.launch
    for argv, message in [(("--hidden", "1024", "--no-allreduce", "--tp", "2"), "leave out --tp"),
                          (("--hidden", "1024", "--no-allreduce", "--emulated", "2"), "leave out --tp"),
                          (("--hidden", "1024", "--no-allreduce", "--no-norm", "--no-launch"), "nothing to measure")]:
        with pytest.raises(SystemExit, match=message):
            tune.resolve(_args(*argv), visible_gpus=2)
