"""The recap heavy ranker: features -> [split towers] -> [backbone] -> one tower per task -> heads; and the
train module that adds the multi-task loss.

Feature segments, in concatenation order: the featurized block (`continuous` then the appended tensors),
the dense vectors (TwHIN), the position embedding, the sparse linear layer (over the discretizer's bins and
sparse continuous features), then the embedding vectors (small tables, large-table features) last, where
DLRM expects them.
Heads (`heads.TaskHeads`): the fixed affine map of each tower's logit, sigmoid, the odds correction for
downsampling and pos_weight, the calibrator. The loss's constants (pos_weight, loss_weight) belong to the
train module's `MultiTaskLoss`; the serving face (plain tensors in, scores out) is `serving.py`.

Every forward here that contains TorchRec tables (RecapTrainModule, RecapModel, LargeEmbeddings) is
fx-traced by TorchRec's sparse-dist train pipeline to find the tables: it must not iterate a returned
tensor or dict, nor branch on tensor shapes (checks like that live in leaf modules, e.g. MultiTaskLoss),
and `batch.sparse` must reach the tables unchanged.

Shapes: B = batch, F = input features, T = tasks.

Example:
    model = build_model(config, {"continuous": 10, "binary": 3}, [], {})
    out = model(batch)  # {"logits": [B, T], "probabilities": [B, T]}
    loss, outputs = RecapTrainModule(model, build_loss(config))(batch)
"""

from __future__ import annotations

import torch
from torch import nn

from tml.projects.home.recap.model.embeddings import (
    DenseVectorNorms,
    LargeEmbeddings,
    PositionDebias,
    SmallEmbeddings,
)
from tml.projects.home.recap.model.featurization import DenseFeaturizer
from tml.projects.home.recap.model.heads import TaskHeads
from tml.projects.home.recap.model.sparse_linear import SparseFeatures
from tml.projects.home.recap.model.split_towers import SplitTowers
from tml.reader.batch import RecapBatch, SparseValues


def sanitize(task_name: str) -> str:
    """ModuleDict keys cannot contain dots; task names do (`recap.engagement.is_favorited`)."""
    return task_name.replace(".", "__")


class RecapModel(nn.Module):
    """Multi-task ranking model (build it with `build_model`).

    Args:
        task_names: T task names, the output column order.
        featurizer: dense block module.
        towers: {task name: [B, F_tower] -> [B, 1]} in task order.
        heads: raw tower logits -> logits and calibrated probabilities (`heads.TaskHeads`).
        dense_vectors, position, sparse_linear, small, large: optional input modules.
        split: optional split towers over the segments.
        backbone: optional shared network.
        share_partial: towers read [backbone output, backbone input] instead of the backbone output.

    Shapes: RecapBatch -> {"logits": [B, T], "probabilities": [B, T]}.
    """

    def __init__(
        self,
        task_names: list[str],
        featurizer: DenseFeaturizer,
        towers: dict[str, nn.Module],
        heads: TaskHeads,
        dense_vectors: DenseVectorNorms | None = None,
        position: PositionDebias | None = None,
        sparse_linear: SparseFeatures | None = None,
        small: SmallEmbeddings | None = None,
        large: LargeEmbeddings | None = None,
        split: SplitTowers | None = None,
        backbone: nn.Module | None = None,
        share_partial: bool = False,
    ) -> None:
        super().__init__()
        assert heads.task_names == list(task_names), "heads and towers must list the same tasks"
        self.task_names = list(task_names)
        self.featurizer = featurizer
        self.dense_vectors = dense_vectors
        self.position = position
        self.sparse_linear = sparse_linear
        self.small_embeddings = small
        self.large_embeddings = large
        self.split_towers = split
        self.backbone = backbone
        self.share_partial = share_partial
        self.towers = nn.ModuleDict({sanitize(name): towers[name] for name in self.task_names})
        self.heads = heads

    def dense_segments(
        self, dense: dict[str, torch.Tensor], sparse_continuous: dict[str, SparseValues] | None = None
    ) -> dict[str, torch.Tensor]:
        """The segments computed from dense tensors [B, width] (and sparse continuous features), in
        concatenation order (all but the large-table features, which come last)."""
        block = self.featurizer(dense)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, width in self.featurizer.layout:
            out[name] = block[:, start : start + width]
            start += width
        # Returned dicts are read by the names each module declares in its layout, never iterated:
        # TorchRec's sparse-dist pipeline fx-traces this method, and a traced dict cannot be iterated.
        if self.dense_vectors is not None:
            vectors = self.dense_vectors(dense)
            for name, _ in self.dense_vectors.layout:
                out[name] = vectors[name]
        if self.position is not None:
            out["position_debias"] = self.position(dense["discrete"])
        if self.sparse_linear is not None:
            out["sparse_linear"] = self.sparse_linear(dense, sparse_continuous)
        if self.small_embeddings is not None:
            small = self.small_embeddings(dense["discrete"])
            for name, _ in self.small_embeddings.layout:
                out[name] = small[name]
        return out

    def segments(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        """Named feature segments [B, width] in concatenation order (embedding vectors last)."""
        out = self.dense_segments(batch.dense, batch.sparse_continuous)
        if self.large_embeddings is not None:
            if batch.sparse is None:
                raise ValueError("the model has large_embeddings but batch.sparse is None")
            # batch.sparse goes to the tables untouched, so the pipeline can run their input
            # all-to-all one batch ahead.
            pooled = self.large_embeddings(batch.sparse)
            # The reader pads batch.sparse to a fixed number of rows (reader/ranking.py): keep B of them.
            rows = out[self.featurizer.layout[0][0]].shape[0]
            for name, _ in self.large_embeddings.layout:
                out[name] = pooled[name][:rows]
        return out

    def combine(self, segments: dict[str, torch.Tensor]) -> torch.Tensor:
        """The backbone input [B, F]: split-tower output, or all segments concatenated."""
        if self.split_towers is not None:
            return self.split_towers(segments)
        return torch.cat(list(segments.values()), dim=1)

    def features(self, batch: RecapBatch) -> torch.Tensor:
        """The backbone input [B, F] of a batch."""
        return self.combine(self.segments(batch))

    def group_embeddings(self, batch: RecapBatch, groups: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Run only the named split-tower groups: {group: [B, D_group]} (to precompute embeddings)."""
        if self.split_towers is None:
            raise ValueError("group_embeddings needs model.split_towers in the config")
        return self.split_towers.group_embeddings(self.segments(batch), groups)

    def from_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone, towers and heads on the backbone input [B, F]: logits and probabilities [B, T]."""
        if self.backbone is not None:
            hidden = self.backbone(x)
            x = torch.cat([hidden, x], dim=1) if self.share_partial else hidden
        raw = torch.cat([self.towers[sanitize(name)](x) for name in self.task_names], dim=1)
        heads = self.heads(raw)
        return {"logits": heads["logits"], "probabilities": heads["probabilities"]}

    def forward(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        return self.from_features(self.features(batch))


class MultiTaskLoss(nn.Module):
    """The multi-task loss: per task t, BCE-with-logits with pos_weight[t], averaged over the batch with
    weights[:, t] (sum(w * l) / sum(w), 0 when all weights are 0); loss = sum_t loss_weight[t] * loss_t.

    A module of its own so that the shape check stays out of the traced forwards (see the module
    docstring): TorchRec's pipeline treats a module without tables as a leaf and does not trace into it.
    pos_weights and loss_weights derive from the config: buffers kept out of the state dict.

    Args:
        task_names: the T tasks, for error messages.
        pos_weights: [T] BCE weight of the positives per task.
        loss_weights: [T] weight of each task's loss in the total.

    Shapes: logits, labels, weights [B, T] -> (loss [], per_task [T]).

    Example:
        loss, per_task = MultiTaskLoss(["fav"], [1.0], [1.0])(logits, labels, weights)
    """

    def __init__(self, task_names: list[str], pos_weights: list[float], loss_weights: list[float]) -> None:
        super().__init__()
        self.task_names = list(task_names)
        for name, values in [("pos_weights", pos_weights), ("loss_weights", loss_weights)]:
            assert len(values) == len(self.task_names), name
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(labels.shape) != tuple(logits.shape) or weights.shape != labels.shape:
            raise ValueError(
                f"batch labels {tuple(labels.shape)} / weights {tuple(weights.shape)} do not match the "
                f"model's [B, T={len(self.task_names)}] outputs for tasks {self.task_names}"
            )
        per_example = nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float(), pos_weight=self.pos_weights, reduction="none"
        )
        weights = weights.float()
        weight_sum = weights.sum(dim=0)
        per_task = (per_example * weights).sum(dim=0) / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)
        per_task = torch.where(weight_sum > 0, per_task, torch.zeros_like(per_task))
        return (per_task * self.loss_weights).sum(), per_task


class RecapTrainModule(nn.Module):
    """Wraps RecapModel with the loss (MultiTaskLoss): forward(batch) -> (loss, outputs), per docs/design.md.

    outputs: logits, probabilities, labels, weights [B, T] and `loss/<task>` scalars (detached, not
    multiplied by loss_weight).

    Args:
        model: the RecapModel.
        loss: its MultiTaskLoss (`build_loss(config)`), same tasks.

    Example:
        loss, outputs = RecapTrainModule(model, build_loss(config))(batch); loss.backward()
    """

    def __init__(self, model: RecapModel, loss: MultiTaskLoss) -> None:
        super().__init__()
        assert loss.task_names == model.task_names, "the loss and the model must list the same tasks"
        self.model = model
        self.loss = loss

    def forward(self, batch: RecapBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        loss, per_task = self.loss(outputs["logits"], batch.labels, batch.weights)
        outputs = dict(outputs, labels=batch.labels.float(), weights=batch.weights.float())
        for i, name in enumerate(self.model.task_names):
            outputs[f"loss/{name}"] = per_task[i].detach()
        return loss, outputs


def _unwrap(model: nn.Module) -> tuple[RecapModel, str]:
    if isinstance(model, RecapTrainModule):
        return model.model, "model."
    assert isinstance(model, RecapModel), f"expected RecapModel or RecapTrainModule, got {type(model)}"
    return model, ""


def embedding_table_prefixes(model: nn.Module) -> list[str]:
    """Parameter-name prefixes of the large (TorchRec) tables, one per table; [] when there are none."""
    recap, prefix = _unwrap(model)
    if recap.large_embeddings is None:
        return []
    return [f"{prefix}large_embeddings.ebc.embedding_bags.{t.name}." for t in recap.large_embeddings.tables]


def parameter_groups(model: nn.Module) -> dict[str, list[str]]:
    """{"backbone": prefixes of every non-tower, non-large-table parameter, <task>: its tower's prefixes}.

    "backbone" is left out when there are no such parameters (share_none with a parameter-free
    featurization). Prefixes end with "." and match `name.startswith(prefix)` over
    `model.named_parameters()`.

    Example:
        parameter_groups(train_module)  # {"backbone": ["model.featurizer.", ...], "fav": [...]}
    """
    recap, prefix = _unwrap(model)
    backbone = [
        f"{prefix}{child_name}."
        for child_name, child in recap.named_children()
        if child_name not in ("towers", "large_embeddings") and any(True for _ in child.parameters())
    ]
    groups: dict[str, list[str]] = {"backbone": backbone} if backbone else {}
    for name in recap.task_names:
        groups[name] = [f"{prefix}towers.{sanitize(name)}."]
    return groups
