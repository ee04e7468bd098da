"""summarize(): rows per module down to max_depth, parameter counts (shared counted once), EBC tables."""

import pytest
import torch
from torch import nn

from tml.core.model_summary import summarize

pytestmark = pytest.mark.unit


def _model():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential(nn.Linear(4, 3), nn.ReLU()))
    model.add_module("head", nn.Linear(3, 1))
    return model


def test_rows_depth_and_total():
    text = summarize(_model(), max_depth=2)
    lines = text.splitlines()
    assert lines[0].split() == ["module", "type", "parameters", "trainable"]
    assert lines[1].split() == ["encoder", "Sequential", "15", "15"]
    assert lines[2].startswith("  encoder.0") and lines[2].split()[1:] == ["Linear", "15", "15"]
    assert lines[-1] == "total parameters: 19"
    shallow = summarize(_model(), max_depth=1)
    assert "encoder.0" not in shallow and "head" in shallow


def test_frozen_and_shared_parameters():
    model = _model()
    model.encoder[0].weight.requires_grad_(False)
    model.add_module("tied", model.head)  # the same module twice: counted once
    text = summarize(model)
    assert "trainable parameters: 7" in text
    assert text.splitlines()[-1] == "total parameters: 19"


def test_meta_and_torchrec_tables():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    tables = [
        EmbeddingBagConfig(name="a", num_embeddings=100, embedding_dim=8, feature_names=["f"]),
        EmbeddingBagConfig(name="b", num_embeddings=10, embedding_dim=4, feature_names=["g"]),
    ]
    model = nn.Module()
    model.ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    model.linear = nn.Linear(12, 1)
    text = summarize(model, max_depth=3)
    assert "ebc.embedding_bags.a" in text
    assert text.splitlines()[-1] == f"total parameters: {800 + 40 + 13}"
