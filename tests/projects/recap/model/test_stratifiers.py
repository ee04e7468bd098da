"""Recap's evaluation segments: `model.stratifiers` as masks over batch.dense['discrete'], fed to core's
RankingMetrics (which names no batch field of its own)."""

import pytest
import torch

from tml.core.metrics import RankingMetrics
from tml.projects.home.recap.model.stratifiers import StratifierMasks, stratifier_segments
from tml.reader.batch import RecapBatch

pytestmark = pytest.mark.unit


def _batch(discrete) -> RecapBatch:
    discrete = torch.as_tensor(discrete)
    ones = torch.ones(discrete.shape[0], 1)
    return RecapBatch(dense={"discrete": discrete}, labels=ones, weights=ones)


def test_masks_select_rows_whose_column_equals_the_value():
    names, masks = stratifier_segments([("country", 1, 2), ("surface", 0, 0)])
    assert names == ["country=2", "surface=0"]
    got = masks(_batch([[0, 2], [1, 2], [0, 5]]))
    assert got.dtype == torch.bool
    assert got.tolist() == [[True, True], [True, False], [False, True]]
    assert stratifier_segments([]) == ([], None)


def test_metrics_per_stratifier_segment():
    names, masks = stratifier_segments([("country", 1, 2)])
    metrics = RankingMetrics(["t"], names, masks)
    p = torch.tensor([[0.9], [0.2], [0.4]])
    y = torch.tensor([[1.0], [0.0], [1.0]])
    metrics.update(
        _batch([[0, 2], [1, 2], [0, 5]]), {"probabilities": p, "labels": y, "weights": torch.ones(3, 1)}
    )
    r = metrics.compute()
    assert r["t/count"] == 3.0 and r["country=2/t/count"] == 2.0
    assert r["country=2/t/auroc"] == 1.0 and r["country=2/t/mean_label"] == 0.5


def test_errors_name_the_stratifiers_and_the_batch():
    masks = StratifierMasks([("country", 3, 2)])
    with pytest.raises(
        ValueError, match=r"read `discrete` columns \[3\], but batch.dense\['discrete'\] has shape \(1, 2\)"
    ):
        masks(_batch([[0, 2]]))
    batch = RecapBatch(
        dense={"continuous": torch.zeros(1, 2)}, labels=torch.ones(1, 1), weights=torch.ones(1, 1)
    )
    with pytest.raises(ValueError, match=r"need batch.dense\['discrete'\].*dense keys: \['continuous'\]"):
        masks(batch)
