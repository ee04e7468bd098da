"""The recap heavy-ranker model: build_model, build_loss, RecapModel, RecapTrainModule, parameter groups, z-score stats.

Importing this package does not import torchrec (only LargeEmbeddings does, when built).
"""

from tml.projects.home.recap.model.build import build_loss, build_model
from tml.projects.home.recap.model.recap_model import (
    RecapModel,
    RecapTrainModule,
    embedding_table_prefixes,
    parameter_groups,
)
from tml.projects.home.recap.model.stats import (
    ContinuousStats,
    compute_continuous_stats,
    load_stats,
    save_stats,
)

__all__ = [
    "ContinuousStats",
    "RecapModel",
    "RecapTrainModule",
    "build_loss",
    "build_model",
    "compute_continuous_stats",
    "embedding_table_prefixes",
    "load_stats",
    "parameter_groups",
    "save_stats",
]
