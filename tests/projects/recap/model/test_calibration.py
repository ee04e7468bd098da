"""A model trained with pos_weight and on negatively downsampled data stays calibrated: its probabilities undo
both (odds_ratio = neg_rate / (pos_rate * pos_weight)). Trained on the synthetic generator's data, evaluated
on a fresh sample reweighted by the inverse downsampling rates, as `tml-recap evaluate` does."""

import itertools

import pytest
import torch

from tml.core.metrics import RankingMetrics
from tml.projects.home.recap.config.model import ModelConfig
from tml.projects.home.recap.data.synthetic import generate
from tml.projects.home.recap.model import RecapTrainModule, build_loss, build_model
from tml.projects.home.recap.model.heads import odds_correction
from tml.reader.config import DataConfig, ValidationDataConfig, dense_widths
from tml.reader.dataset import build_dataset, build_eval_dataset

pytestmark = pytest.mark.slow

TASK = "click"  # the generator's base rate for an unknown name: 5%
POS_WEIGHT = 4.0
NEG_RATE = 0.5


def _data(path: str, kind=DataConfig):
    return kind.model_validate(
        {
            "inputs": f"{path}/*.parquet",
            "global_batch_size": 1024,
            "seg_dense_schema": {
                "features": [{"name": "continuous", "length": 8}, {"name": "binary", "length": 4}]
            },
            "tasks": {TASK: {"neg_downsampling_rate": NEG_RATE}},
        }
    )


def test_pos_weight_and_downsampling_are_undone_in_the_probabilities(tmp_path):
    train, valid = _data(str(tmp_path / "train")), _data(str(tmp_path / "valid"), ValidationDataConfig)
    generate(train, 40_000, str(tmp_path / "train"), seed=3, progress=False, split=0)
    generate(valid, 40_000, str(tmp_path / "valid"), seed=3, progress=False, split=1)
    config = ModelConfig.model_validate(
        {"tasks": {TASK: {"mlp_config": {"layer_sizes": [16, 1]}, "pos_weight": POS_WEIGHT}}}
    )
    torch.manual_seed(0)
    model = build_model(config, dense_widths(train), [], {TASK: (1.0, NEG_RATE)})
    module = RecapTrainModule(model, build_loss(config))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for batch in itertools.islice(build_dataset(train, [TASK], num_epochs=None), 300):
        loss, _ = module(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    corrected, downsampling_only = RankingMetrics([TASK]), RankingMetrics([TASK])
    module.eval()
    with torch.no_grad():
        for batch in build_eval_dataset(valid, [TASK]):
            _, outputs = module(batch)
            corrected.update(batch, outputs)
            # What the probabilities were before pos_weight was undone: only the downsampling correction.
            biased = odds_correction(torch.sigmoid(outputs["logits"]), torch.tensor([NEG_RATE]))
            downsampling_only.update(batch, dict(outputs, probabilities=biased))
    good, bad = corrected.compute(), downsampling_only.compute()
    assert good[f"{TASK}/mean_label"] == pytest.approx(0.05, abs=0.01)
    assert good[f"{TASK}/calibration"] == pytest.approx(1.0, abs=0.1)
    assert bad[f"{TASK}/calibration"] > 2.0  # pos_weight 4 fits 4x the odds (2.8x the mean here)
    assert good[f"{TASK}/rce"] > bad[f"{TASK}/rce"] + 5.0
    # The same ranking (up to ties within a histogram bin).
    assert good[f"{TASK}/auroc"] == pytest.approx(bad[f"{TASK}/auroc"], abs=1e-4)
