"""Split candidates, thresholds, the tuner and its on-disk cache (pure Python, no processes)."""
import json
import math

import pytest

from tokenweave.split import (DEFAULT_MIN_SPLIT_TOKENS, DEFAULT_OVERLAP_CTAS, MIN_TUNABLE_TOKENS, GemmShape, Split,
                              SplitPolicy, TuningCache, cache_dir, gemm_wave_cost, published_split_point,
                              split_candidates, token_bucket)

# Llama-3-70B per rank at TP4 (QKV, O, gate_up, down) on a 132-SM H100/H200.
GEMMS_70B_TP4 = [GemmShape(2560, 8192), GemmShape(8192, 2048), GemmShape(14336, 8192), GemmShape(8192, 7168)]
SMS = 132


def _covers_once(split: Split):
    rows = [r for a, b in split.bounds for r in range(a, b)]
    return rows == list(range(split.tokens))


@pytest.mark.parametrize("tokens", [256, 1000, 1024, 3000, 4096, 8192, 12345, 16384])
def test_free_candidates_are_tile_aligned_balanced_and_cover_every_token(tokens):
    points = split_candidates(tokens, GEMMS_70B_TP4, SMS, max_candidates=5)
    assert points, tokens
    assert len(set(points)) == len(points)
    window = max(256, tokens // 8)
    for p in points:
        assert p % 128 == 0 and 0 < p < tokens
        assert abs(p - tokens / 2) <= window + 128
        assert _covers_once(Split(tokens, p))


def test_best_candidate_minimises_modelled_waves():
    tokens = 8192
    points = split_candidates(tokens, GEMMS_70B_TP4, SMS, max_candidates=50)

    def cost(p):
        return gemm_wave_cost(p, GEMMS_70B_TP4, SMS) + gemm_wave_cost(tokens - p, GEMMS_70B_TP4, SMS)

    assert cost(points[0]) == min(cost(p) for p in points)
    assert [cost(p) for p in points] == sorted(cost(p) for p in points)
    # never worse than the published rule (half rounded to 256 + offset in {0,128,256}) under the model
    assert cost(points[0]) <= min(cost(published_split_point(tokens, off)) for off in (0, 128, 256))


def test_wave_cost_counts_whole_waves():
    one = [GemmShape(n=256, k=64)]
    # 132 tiles of 128x256 fill one wave on 132 SMs; one more row of tiles needs a second wave
    assert gemm_wave_cost(132 * 128, one, 132, tile_shapes=[(128, 256)]) == 128 * 256 * 64
    assert gemm_wave_cost(132 * 128 + 1, one, 132, tile_shapes=[(128, 256)]) == 2 * 128 * 256 * 64
    assert gemm_wave_cost(0, one, 132) == 0


def test_wave_aware_choice_avoids_a_nearly_empty_wave():
    # 1 GEMM whose tile count per 128 rows is 66: a part of 256 rows is exactly one wave on 132 SMs.
    gemm = [GemmShape(n=66 * 128, k=1024)]
    tokens = 1024 + 256
    best = split_candidates(tokens, gemm, 132, tile_shapes=[(128, 128)])[0]
    # 640/640 needs 3 + 3 waves; 512/768 or 768/512 needs 2 + 3
    assert best in (512, 768)


def test_boundaries_restrict_points_to_sequence_starts():
    tokens = 4096
    boundaries = [0, 1000, 1500, 2900, 3072, 4096, 5000]
    points = split_candidates(tokens, GEMMS_70B_TP4, SMS, boundaries=boundaries, max_candidates=10)
    assert set(points) == {1500, 2900, 3072}  # 1000 would leave part A under a quarter of the tokens
    assert split_candidates(tokens, GEMMS_70B_TP4, SMS, boundaries=[0, tokens]) == []
    assert split_candidates(tokens, GEMMS_70B_TP4, SMS, boundaries=[100, 4000]) == []


def test_split_validates_and_reports_bounds():
    assert Split(10).bounds == [(0, 10)] and not Split(10).is_split
    assert Split(10, 4).bounds == [(0, 4), (4, 10)]
    for bad in (0, 10, -1, 11):
        with pytest.raises(ValueError):
            Split(10, bad)


def test_token_bucket():
    assert [token_bucket(t) for t in (1, 2, 3, 1024, 1025, 16384)] == [1, 2, 4, 1024, 2048, 16384]
    with pytest.raises(ValueError):
        token_bucket(0)


def _policy(tmp_path, **kw):
    return SplitPolicy(GEMMS_70B_TP4, SMS, "dev/sm132/tp4/p2p/bfloat16/h8192/m",
                       cache=TuningCache(str(tmp_path / "cache.json")), **kw)


def test_untuned_policy_threshold(tmp_path):
    policy = _policy(tmp_path)
    for tokens in (1, 64, MIN_TUNABLE_TOKENS, DEFAULT_MIN_SPLIT_TOKENS - 1):
        assert not policy.choose(tokens).is_split
    for tokens in (DEFAULT_MIN_SPLIT_TOKENS, 4096, 16384):
        s = policy.choose(tokens)
        assert s.is_split and s.point == policy.candidates(tokens)[0] and s.ctas == DEFAULT_OVERLAP_CTAS
    assert not policy.choose(4096, boundaries=[]).is_split  # one sequence, attention cannot cross: no split


def test_tuner_picks_fastest_caches_and_transfers_within_bucket(tmp_path):
    policy = _policy(tmp_path)
    tokens = 3000
    candidates = policy.candidates(tokens)
    target_point, target_ctas = candidates[1], 32
    calls = []

    def time_fn(split):
        calls.append(split)
        if not split.is_split:
            return 1000.0
        return 500.0 - (split.point == target_point) * 100 - (split.ctas == target_ctas) * 50

    chosen = policy.tune(tokens, time_fn)
    assert (chosen.point, chosen.ctas) == (target_point, target_ctas)
    assert len(calls) <= policy.max_candidates + 3  # "minutes, not a day"
    data = json.loads((tmp_path / "cache.json").read_text())
    entry = data["entries"][policy.key(tokens)]
    assert entry["split"] and entry["candidate"] == 1 and entry["ctas"] == 32 and "no_split" in entry["timings_us"]

    # a fresh policy on the same file reuses the choice without timing, for any size of the bucket
    again = _policy(tmp_path)
    assert again.tune(tokens, lambda s: pytest.fail("cached bucket must not be re-timed")) == chosen
    other = 2100  # same bucket (4096)
    assert again.choose(other) == Split(other, again.candidates(other)[1], 32)
    assert again.tuned(8000) is None  # another bucket: the untuned default
    assert again.choose(8000) == Split(8000, again.candidates(8000)[0], DEFAULT_OVERLAP_CTAS)


def test_tuner_measures_the_threshold(tmp_path):
    """When no split beats the unsplit run the bucket becomes fuse-only, even above the default threshold."""
    policy = _policy(tmp_path)
    chosen = policy.tune(2048, lambda s: 100.0 if not s.is_split else 120.0)
    assert not chosen.is_split
    assert not _policy(tmp_path).choose(2048).is_split
    # and a tuned small bucket may split below the untuned threshold
    low = 600
    assert policy.tune(low, lambda s: 100.0 if s.is_split else 200.0).is_split


def test_cache_tolerates_garbage_and_other_versions(tmp_path):
    path = tmp_path / "cache.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning):
        assert TuningCache(str(path)).load() == {}
    path.write_text(json.dumps({"version": -1, "entries": {"k": {}}}))
    with pytest.warns(UserWarning):
        assert TuningCache(str(path)).get("k") is None
    cache = TuningCache(str(tmp_path / "sub" / "dir" / "c.json"))
    cache.put("a", {"split": False})
    cache.put("b", {"split": True})
    assert cache.get("a") == {"split": False} and cache.get("b") == {"split": True}
    # an entry with unknown fields reads as untuned instead of crashing
    policy = SplitPolicy(GEMMS_70B_TP4, SMS, "p", cache=TuningCache(str(tmp_path / "x.json")))
    policy.cache.put(policy.key(4096), {"bogus": 1})
    assert policy.tuned(4096) is None


def test_cache_dir_env_override(tmp_path):
    assert cache_dir({"TOKENWEAVE_CACHE_DIR": str(tmp_path)}) == str(tmp_path)
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == "/x/tokenweave"
    assert cache_dir({}).endswith(".cache/tokenweave")


def test_candidates_handle_tiny_and_odd_token_counts():
    for tokens in (2, 3, 129, 255, 257):
        for p in split_candidates(tokens, GEMMS_70B_TP4, SMS):
            assert 0 < p < tokens
    assert math.isfinite(gemm_wave_cost(1, GEMMS_70B_TP4, SMS))


def test_tuner_without_candidates_times_nothing(tmp_path):
    policy = _policy(tmp_path)
    never = lambda s: pytest.fail("nothing to time")  # noqa: E731
    assert policy.tune(100, never) == Split(100)  # below the tunable size
    assert policy.tune(4096, never, boundaries=[10]) == Split(4096)  # no boundary near the middle
    assert not (tmp_path / "cache.json").exists()
