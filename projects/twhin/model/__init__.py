"""The TwHIN model: tables, relation operators, comparators and the loss (see twhin_model.py)."""

from tml.projects.twhin.model.operators import RelationOperators, compare, pairwise
from tml.projects.twhin.model.twhin_model import EdgeLoss, TableSpec, TwhinModel, TwhinTrainModule

__all__ = [
    "EdgeLoss",
    "RelationOperators",
    "TableSpec",
    "TwhinModel",
    "TwhinTrainModule",
    "compare",
    "pairwise",
]
