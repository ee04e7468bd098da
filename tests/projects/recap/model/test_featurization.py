"""Featurization numerics on hand-made inputs, and the z-score stats file round trip."""

import json
import math

import pytest
import torch

from tml.projects.home.recap.config.model import FeaturizationConfig
from tml.projects.home.recap.model.build import build_featurizer
from tml.projects.home.recap.model.featurization import (
    BatchRenorm,
    ClipLog1pAbs,
    DoubleNormLog,
    Log1pAbs,
    ZScoreLog,
)
from tml.projects.home.recap.model.stats import (
    ContinuousStats,
    compute_continuous_stats,
    load_stats,
    save_stats,
)
from tml.reader.batch import RecapBatch

pytestmark = pytest.mark.unit

NASTY = torch.tensor([[0.0, 1.0, -1.0, math.e - 1, float("nan"), float("inf"), -float("inf"), 1e6]])


def test_log1p_abs_maps_non_finite_to_zero():
    out = Log1pAbs()(NASTY)
    expected = torch.tensor([[0.0, math.log(2), -math.log(2), 1.0, 0.0, 0.0, 0.0, math.log1p(1e6)]])
    torch.testing.assert_close(out, expected)


def test_clip_log1p_abs_clamps_raw_values_first():
    out = ClipLog1pAbs(clip_magnitude=math.e - 1)(NASTY)
    expected = torch.tensor([[0.0, math.log(2), -math.log(2), 1.0, 0.0, 0.0, 0.0, 1.0]])
    torch.testing.assert_close(out, expected)


def test_z_score_log_standardises_and_clamps():
    mean = torch.tensor([1.0, 0.0, 0.0])
    std = torch.tensor([2.0, 0.0, 0.1])  # std 0: a constant feature is only centred
    z = ZScoreLog(mean, std, clip_magnitude=3.0)
    x = torch.tensor([[math.e**5 - 1, 1e6, 1.0], [float("nan"), -(math.e - 1), -1.0]])
    expected = torch.tensor([[2.0, 3.0, 3.0], [-0.5, -1.0, -3.0]])
    torch.testing.assert_close(z(x), expected)


def test_double_norm_log_batch_norm_then_clamp():
    layer = DoubleNormLog(2, batch_norm_affine=False, batch_norm_momentum=0.5, clip_magnitude=0.9)
    x = torch.tensor([[math.e - 1, 0.0], [-(math.e - 1), float("inf")]])
    out = layer(x)  # log -> [[1, 0], [-1, 0]]; batch-normed -> [[1, 0], [-1, 0]] (std 1); clamped to 0.9
    torch.testing.assert_close(out, torch.tensor([[0.9, 0.0], [-0.9, 0.0]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(layer.batch_norm.running_mean, torch.zeros(2))


def test_double_norm_featurizer_layer_norms_the_whole_block():
    config = FeaturizationConfig.model_validate(
        {
            "double_norm_log_config": {
                "batch_norm_config": {"affine": False},
                "layer_norm_config": {"center": False, "scale": False},
            }
        }
    )
    feat = build_featurizer(config, {"continuous": 3, "binary": 2})
    dense = {"continuous": torch.randn(5, 3) * 100, "binary": torch.randint(0, 2, (5, 2)).float()}
    out = feat(dense)
    assert out.shape == (5, 5) and feat.layout == [("continuous", 3), ("binary", 2)]
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(5), atol=1e-5, rtol=0)
    assert not list(feat.parameters())


def test_log1p_featurizer_appends_binary_unchanged():
    config = FeaturizationConfig.model_validate({"log1p_abs_config": {}})
    feat = build_featurizer(config, {"continuous": 2, "binary": 2})
    dense = {"continuous": torch.tensor([[math.e - 1, float("nan")]]), "binary": torch.tensor([[1.0, 0.0]])}
    torch.testing.assert_close(feat(dense), torch.tensor([[1.0, 0.0, 1.0, 0.0]]))


def test_batch_renorm_uses_running_stats_in_eval():
    layer = BatchRenorm(2, momentum=1.0)
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    train_out = layer(x)
    # Running stats start at (0, 1): r and d are clipped, the output is not the plain batch norm.
    assert not torch.allclose(train_out, (x - x.mean(0)) / x.std(0, unbiased=False))
    torch.testing.assert_close(layer.running_mean, torch.tensor([2.0, 4.0]))
    layer.eval()
    torch.testing.assert_close(layer(x), torch.tensor([[-1.0, -1.0], [1.0, 1.0]]), atol=1e-4, rtol=0)


def _batch(continuous):
    n = continuous.shape[0]
    return RecapBatch(dense={"continuous": continuous}, labels=torch.zeros(n, 1), weights=torch.ones(n, 1))


def test_compute_stats_ignores_non_finite_and_round_trips(tmp_path):
    a = math.e - 1
    batches = [
        _batch(torch.tensor([[a, 1e3], [float("nan"), 1e3]])),
        _batch(torch.tensor([[-a, 1e3], [a, float("inf")]])),
    ]
    stats = compute_continuous_stats(batches)
    assert stats.count == [3, 3]
    # Column 0: values 1, -1, 1 -> mean 1/3, population std sqrt(8/9).
    assert stats.mean[0] == pytest.approx(1 / 3) and stats.std[0] == pytest.approx(math.sqrt(8 / 9))
    assert stats.mean[1] == pytest.approx(math.log1p(1e3)) and stats.std[1] == pytest.approx(0.0, abs=1e-6)
    path = str(tmp_path / "stats.json")
    save_stats(stats, path)
    assert load_stats(path) == stats


def test_z_score_featurizer_reads_the_stats_file(tmp_path):
    path = tmp_path / "stats.json"
    save_stats(ContinuousStats(mean=[1.0, 0.0], std=[2.0, 1.0], count=[1, 1]), str(path))
    config = FeaturizationConfig.model_validate(
        {
            "z_score_log_config": {"analysis_path": str(path), "clip_magnitude": 5.0},
            "feature_names_to_concat": [],
        }
    )
    feat = build_featurizer(config, {"continuous": 2})
    out = feat({"continuous": torch.tensor([[math.e**3 - 1, -1e9]])})
    torch.testing.assert_close(out, torch.tensor([[1.0, -5.0]]))


def test_z_score_stats_width_mismatch_names_the_file(tmp_path):
    path = tmp_path / "stats.json"
    save_stats(ContinuousStats(mean=[0.0], std=[1.0], count=[1]), str(path))
    config = FeaturizationConfig.model_validate({"z_score_log_config": {"analysis_path": str(path)}})
    with pytest.raises(ValueError, match=r"stats\.json.*1 features.*has 3"):
        build_featurizer(config, {"continuous": 3, "binary": 1})


def test_load_stats_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_stats(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"mean": [0.0]}))
    with pytest.raises(ValueError, match=r"bad\.json.*count.*std"):
        load_stats(str(bad))
    with pytest.raises(ValueError, match="no batches"):
        compute_continuous_stats([])


def test_featurizer_needs_its_tensors():
    config = FeaturizationConfig.model_validate({"log1p_abs_config": {}})
    with pytest.raises(ValueError, match=r"feature_names_to_concat.*'binary'"):
        build_featurizer(config, {"continuous": 2})
    with pytest.raises(ValueError, match=r"featurization_config.*'continuous'"):
        build_featurizer(config, {"binary": 2})
