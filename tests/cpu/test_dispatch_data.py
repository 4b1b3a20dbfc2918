"""Dispatch decisions as data (tokenweave/tuning.py + configs), the lean plan's traffic count, shard ranges."""
import json

import pytest

from tokenweave import tuning
from tokenweave.comm import shard_range, traffic_per_byte


@pytest.mark.parametrize("algo,residual,hand", [
    # W = 4, counted by hand from the kernels (DESIGN-NOTES.md's table for today's two-shot), as
    # (local reads, remote reads, local writes, remote writes):
    ("two_shot", "replicated", (3.25, 0, 2.5, 1.5)),  # scatter 1 + 0.25 local; reduce 1.25; epilogue 1 read, 2 writes
    ("lean", "sharded", (2.0, 0, 0.5, 1.5)),          # 0.75 + 0.75 slots + 0.25 x + 0.25 residual; out/res 0.25 each
    ("lean", "replicated", (2.0, 0, 0.5, 2.25)),      # + the residual pushed to 3 peers (0.75)
    ("lean_bulk", "sharded", (2.0, 0, 0.5, 1.5)),     # lean's bytes, the scatter by bulk copies
    # no scatter: my 0.25 of x + 0.25 residual here, the 3 peers' 0.25 of x there; out 0.25 here + 0.75 there,
    # my residual piece 0.25
    ("lean_pull", "sharded", (0.5, 0.75, 0.5, 0.75)),
    ("lean_pull", "replicated", (0.5, 0.75, 0.5, 1.5)),  # + the residual pushed to 3 peers (0.75)
    ("lean_pull", "none", (0.25, 0.75, 0.25, 0.75)),
    ("one_shot", "replicated", (6, 0, 3, 3)),         # x 1 + 4 slots + residual; own slot, residual, out; 3 peers
    ("lamport", "replicated", (10, 0, 7, 3)),         # + one poll of 4 slots, + re-filling 4 slots
    # scatter 0.75 x; owner 0.75 S pieces + 0.75 polled again + 0.25 x + 0.25 residual; epilogue 1 G + 1 polled
    # again; writes: my G piece 0.25, out 1, residual 1, re-fill 8 slots of 0.25; remote 0.75 scatter + 0.75 G
    ("lamport_two_shot", "replicated", (4.75, 0, 4.25, 1.5)),
    ("lamport_two_shot", "sharded", (4.75, 0, 3.5, 1.5)),  # the residual: the owner's 0.25 instead of all rows (1)
    ("lamport_two_shot", "none", (4.5, 0, 3.25, 1.5)),
])
def test_traffic_per_byte_matches_hand_count(algo, residual, hand):
    t = traffic_per_byte(algo, 4, residual)
    assert (t["local_reads"], t["remote_reads"], t["local_writes"], t["remote_writes"]) == pytest.approx(hand)
    assert t["total"] == pytest.approx(sum(hand))


def test_lean_meets_issue_targets_at_every_world():
    for w in range(2, 9):
        assert traffic_per_byte("lean", w, "sharded")["total"] <= 4.0 + 1e-9
        assert traffic_per_byte("lean", w, "replicated")["total"] <= 5.75 + 1e-9
        assert traffic_per_byte("lean", w, "sharded")["total"] < traffic_per_byte("two_shot", w)["total"]
        # lean_pull drops the scatter: 2 + 2 / W with a sharded residual, 1.5 (W - 1) / W fewer than lean
        assert traffic_per_byte("lean_pull", w, "sharded")["total"] == pytest.approx(2 + 2 / w)
        assert traffic_per_byte("lean_pull", w, "replicated")["total"] < traffic_per_byte("lean", w, "sharded")["total"]
    with pytest.raises(ValueError, match="sharded"):
        traffic_per_byte("two_shot", 4, "sharded")
    with pytest.raises(ValueError, match="sharded"):
        traffic_per_byte("lamport", 4, "sharded")


@pytest.mark.parametrize("tokens,world", [(1, 4), (3, 4), (37, 8), (300, 2), (8, 8)])
def test_shard_ranges_cover_every_row_once(tokens, world):
    rows = []
    for r in range(world):
        first, n = shard_range(tokens, world, r)
        assert n >= 0
        rows += list(range(first, first + n))
    assert rows == list(range(tokens))


def test_config_entries_and_heuristic(tmp_path, monkeypatch):
    tuning._all_entries.cache_clear()
    monkeypatch.delenv("TOKENWEAVE_CONFIG", raising=False)
    h200_tp4 = tuning.dispatch_config("h200", 4, 2, 8192)
    assert h200_tp4.one_shot_max_bytes == 512 << 10 and "fused_allreduce_rmsnorm-h200-tp4" in h200_tp4.source
    assert tuning.dispatch_config("h200", 8, 2, 8192) == tuning.HEURISTIC  # no TP8 entry
    assert tuning.dispatch_config("unknown-card", 4, 2, 8192) == tuning.HEURISTIC
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"entries": [{"world_size": 4, "hidden": 4096, "one_shot_max_bytes": 1 << 20,
                                             "source": "my run"}]}))
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(user))
    tuning._all_entries.cache_clear()
    mine = tuning.dispatch_config("h200", 4, 2, 4096)
    assert mine.one_shot_max_bytes == 1 << 20 and "my run" in mine.source   # the user's file first
    assert tuning.dispatch_config("h200", 4, 2, 8192).one_shot_max_bytes == 512 << 10  # other hidden: shipped
    tuning._all_entries.cache_clear()


def test_every_shipped_entry_names_its_run():
    for path in tuning.CONFIG_DIR.glob("*.json"):
        for e in json.loads(path.read_text())["entries"]:
            assert e.get("source") and "bench/results/" in e["source"], (path.name, e)


def test_programmatic_launch_from_env_then_config_then_heuristic(tmp_path, monkeypatch):
    tuning.clear_cache()
    monkeypatch.delenv("TOKENWEAVE_PDL", raising=False)
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"launch": [{"programmatic": True, "source": "my chained run"}]}))
    monkeypatch.setenv("TOKENWEAVE_CONFIG", str(user))
    tuning.clear_cache()
    assert tuning.programmatic_launch("unknown-card") == (True, f"{user}: my chained run")  # the user's file
    monkeypatch.setenv("TOKENWEAVE_PDL", "0")
    assert tuning.programmatic_launch("unknown-card") == (False, "TOKENWEAVE_PDL")  # the variable decides
    monkeypatch.delenv("TOKENWEAVE_PDL")
    monkeypatch.delenv("TOKENWEAVE_CONFIG")
    tuning.clear_cache()
    assert tuning.programmatic_launch("unknown-card") == (False, "heuristic")  # unmeasured: off
    on, source = tuning.programmatic_launch("h200")  # the shipped file: measured on, and says where
    assert on is True and "bench/results/" in source
    tuning.clear_cache()


def _norm_shapes():
    """(threads, target_vecs, max_vecs, pieces) of every add + RMSNorm block shape, read from csrc/kernels/launch.cu
    (the stash shapes' shared-memory bound on the row is not modelled; ``pieces``: 8-byte pieces, another element
    order than the 16-byte shapes with the same row group)."""
    import re
    from pathlib import Path

    src = (Path(__file__).resolve().parents[2] / "csrc" / "kernels" / "launch.cu").read_text()
    two_pass = int(re.search(r"constexpr int kTwoPassVecs = 1 << (\d+);", src).group(1))
    table = re.search(r"constexpr NormConfig kNormConfigs\[\] = \{(.*?)\};", src, re.S).group(1)
    shapes = []
    entry = r"\{(\d+), (\d+), (\w+), (?:true|false)(?:, (?:true|false))?(?:, (true|false))?\}"
    for threads, target, most, pieces in re.findall(entry, table):
        shapes.append((int(threads), int(target), 1 << two_pass if most == "kTwoPassVecs" else int(most),
                       pieces == "true"))
    assert len(shapes) == table.count("{"), "a kNormConfigs entry this parser does not read"
    return shapes


def _row_group(vecs, threads, target, most):
    """csrc/include/tokenweave/rownorm.cuh plan_row_group: threads per row, or -1."""
    g = 32
    while g < threads and g * target < vecs:
        g *= 2
    return g if -(-vecs // g) <= most else -1


def test_norm_shapes_never_change_a_rows_bits_with_the_batch():
    """A shipped "norm" config may switch shapes with the token count only between shapes that hold the row
    and share its row groups: a row's result must not depend on the batch it came in."""
    shapes = _norm_shapes()
    assert len(shapes) >= 11 and any(pieces for *_, pieces in shapes)  # the 8-byte-piece shape is read as such

    def group(shape, vecs, lanes):
        """(threads per row, pieces): the order a row is summed in; (-1, ...) where the shape cannot hold it."""
        if shape == 0:  # launch.cu add_rmsnorm: config 0 picks shape 1, else 2, else 3
            shape = next(k for k in (1, 2, 3) if _row_group(vecs, *shapes[k][:3]) > 0 or k == 3)
        threads, target, most, pieces = shapes[shape]
        g = _row_group(vecs, threads, target, most)
        if pieces and (lanes != 8 or g != threads):  # launch.cu group_of: 2-byte types, one row a CTA
            g = -1
        return g, pieces

    tuning._all_entries.cache_clear()
    tuning._norm_shape.cache_clear()
    tokens = sorted({1, 2, 127, 128, 1023, 1024, 4095, 4096, 4097, 8192, 65536} | {2 ** k for k in range(17)})
    for path in tuning.CONFIG_DIR.glob("*.json"):
        card = path.stem
        for itemsize in (2, 4):
            lanes = 16 // itemsize
            for hidden in (1032, 2048, 4096, 5120, 8192, 12288, 16384, 32768 if itemsize == 2 else 16384):
                vecs = hidden // lanes
                picked = {T: tuning.norm_shape(card, T, hidden, itemsize) for T in tokens}
                groups = {T: group(s, vecs, lanes) for T, s in picked.items()}
                assert all(g > 0 for g, _ in groups.values()), (card, itemsize, hidden, picked)
                assert len(set(groups.values())) == 1, (card, itemsize, hidden, picked, groups)
    for path in tuning.CONFIG_DIR.glob("*.json"):
        for e in json.loads(path.read_text()).get("norm", []):
            assert "bench/results/" in e["source"] and 0 <= e["shape"] < len(shapes), (path.name, e)


def test_a_programmatic_launch_choice_survives_the_first_op(monkeypatch):
    """The card's PDL default is applied once, on first use; a user's earlier choice must not be overwritten
    by it (it was, until the first op applied the default after the user's call)."""
    from tokenweave import ops

    class FakeExtension:
        on = None

        def set_programmatic_launch(self, on):
            calls.append(on)
            FakeExtension.on = on

        def programmatic_launch(self):
            return FakeExtension.on

    calls = []
    monkeypatch.setattr(ops, "_C", FakeExtension())
    monkeypatch.setattr(ops, "HAS_EXTENSION", True)
    monkeypatch.setattr(ops, "_OPS", None)
    monkeypatch.setattr(ops, "_Ops", lambda: object())
    monkeypatch.setattr(tuning, "programmatic_launch", lambda card: (True, "the card's config"))
    ops.set_programmatic_launch(False)
    ops._ops()  # what the first op does
    assert ops.programmatic_launch() is False and calls == [True, False]
    monkeypatch.setattr(ops, "_OPS", None)
    calls.clear()
    assert ops.programmatic_launch() is True and calls == [True]  # untouched: the card's default
