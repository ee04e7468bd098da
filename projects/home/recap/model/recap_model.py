"""The recap heavy ranker: features -> [split towers] -> [backbone] -> one tower per task -> calibrated
probabilities; and the train module that adds the multi-task loss.

Feature segments, in concatenation order: the featurized block (`continuous` then the appended tensors),
the dense vectors (TwHIN), the position embedding, then the embedding vectors (small tables, large-table
features) last, where DLRM expects them.
Heads: logit = tower(x) * scale + bias (fixed affine map, identity when unset); probability =
sigmoid(logit) with its odds scaled back to the data's: p * r / (1 - p + r * p),
r = neg_rate / (pos_rate * pos_weight). Negative downsampling multiplies the odds the model learns by
pos_rate / neg_rate, and BCE with pos_weight w fits w times the odds; r undoes both.

Every forward here that contains TorchRec tables (RecapTrainModule, RecapModel, LargeEmbeddings) is
fx-traced by TorchRec's sparse-dist train pipeline to find the tables: it must not iterate a returned
tensor or dict, nor branch on tensor shapes (checks like that live in leaf modules, e.g. MultiTaskLoss),
and `batch.sparse` must reach the tables unchanged.

Shapes: B = batch, F = input features, T = tasks.

Example:
    model = build_model(config, {"continuous": 10, "binary": 3}, [], {})
    out = model(batch)  # {"logits": [B, T], "probabilities": [B, T]}
    loss, outputs = RecapTrainModule(model)(batch)
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
from tml.projects.home.recap.model.split_towers import SplitTowers
from tml.reader.batch import RecapBatch


def sanitize(task_name: str) -> str:
    """ModuleDict keys cannot contain dots; task names do (`recap.engagement.is_favorited`)."""
    return task_name.replace(".", "__")


def odds_correction(p: torch.Tensor, odds_ratio: torch.Tensor) -> torch.Tensor:
    """Scale the odds of p by r: p' = p*r / (1 - p + r*p), so p' / (1 - p') = r * p / (1 - p).

    Args:
        p: [B, T] probabilities the model learned.
        odds_ratio: [T] r per task, neg_rate / (pos_rate * pos_weight) (see the module docstring).

    Example:
        odds_correction(torch.tensor([[0.5]]), torch.tensor([0.1]))  # [[0.0909]]
    """
    return p * odds_ratio / (1.0 - p + odds_ratio * p)


class RecapModel(nn.Module):
    """Multi-task ranking model (build it with `build_model`).

    Args:
        task_names: T task names, the output column order.
        featurizer: dense block module.
        towers: {task name: [B, F_tower] -> [B, 1]} in task order.
        odds_ratios, affine_scales, affine_biases, pos_weights, loss_weights: [T] floats per task
            (odds_ratios: r of `odds_correction`). They derive from the config, so they are buffers
            left out of the state dict: a checkpoint never overrides what the config says.
        dense_vectors, position, small, large: optional input modules.
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
        odds_ratios: list[float],
        affine_scales: list[float],
        affine_biases: list[float],
        pos_weights: list[float],
        loss_weights: list[float],
        dense_vectors: DenseVectorNorms | None = None,
        position: PositionDebias | None = None,
        small: SmallEmbeddings | None = None,
        large: LargeEmbeddings | None = None,
        split: SplitTowers | None = None,
        backbone: nn.Module | None = None,
        share_partial: bool = False,
    ) -> None:
        super().__init__()
        self.task_names = list(task_names)
        self.featurizer = featurizer
        self.dense_vectors = dense_vectors
        self.position = position
        self.small_embeddings = small
        self.large_embeddings = large
        self.split_towers = split
        self.backbone = backbone
        self.share_partial = share_partial
        self.towers = nn.ModuleDict({sanitize(name): towers[name] for name in self.task_names})
        for name, values in [
            ("odds_ratios", odds_ratios),
            ("affine_scales", affine_scales),
            ("affine_biases", affine_biases),
            ("pos_weights", pos_weights),
            ("loss_weights", loss_weights),
        ]:
            assert len(values) == len(self.task_names), name
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32), persistent=False)

    def segments(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        """Named feature segments [B, width] in concatenation order (embedding vectors last)."""
        block = self.featurizer(batch.dense)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, width in self.featurizer.layout:
            out[name] = block[:, start : start + width]
            start += width
        # Returned dicts are read by the names each module declares in its layout, never iterated:
        # TorchRec's sparse-dist pipeline fx-traces this method, and a traced dict cannot be iterated.
        if self.dense_vectors is not None:
            vectors = self.dense_vectors(batch.dense)
            for name, _ in self.dense_vectors.layout:
                out[name] = vectors[name]
        if self.position is not None:
            out["position_debias"] = self.position(batch.dense["discrete"])
        if self.small_embeddings is not None:
            small = self.small_embeddings(batch.dense["discrete"])
            for name, _ in self.small_embeddings.layout:
                out[name] = small[name]
        if self.large_embeddings is not None:
            if batch.sparse is None:
                raise ValueError("the model has large_embeddings but batch.sparse is None")
            # batch.sparse goes to the tables untouched, so the pipeline can run their input
            # all-to-all one batch ahead.
            pooled = self.large_embeddings(batch.sparse)
            for name, _ in self.large_embeddings.layout:
                out[name] = pooled[name]
        return out

    def features(self, batch: RecapBatch) -> torch.Tensor:
        """The backbone input [B, F]: split-tower output, or all segments concatenated."""
        segments = self.segments(batch)
        if self.split_towers is not None:
            return self.split_towers(segments)
        return torch.cat(list(segments.values()), dim=1)

    def group_embeddings(self, batch: RecapBatch, groups: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Run only the named split-tower groups: {group: [B, D_group]} (to precompute embeddings)."""
        if self.split_towers is None:
            raise ValueError("group_embeddings needs model.split_towers in the config")
        return self.split_towers.group_embeddings(self.segments(batch), groups)

    def forward(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        x = self.features(batch)
        if self.backbone is not None:
            hidden = self.backbone(x)
            x = torch.cat([hidden, x], dim=1) if self.share_partial else hidden
        raw = torch.cat([self.towers[sanitize(name)](x) for name in self.task_names], dim=1)
        logits = raw * self.affine_scales + self.affine_biases
        probabilities = odds_correction(torch.sigmoid(logits), self.odds_ratios)
        return {"logits": logits, "probabilities": probabilities}


class MultiTaskLoss(nn.Module):
    """The multi-task loss: per task t, BCE-with-logits with pos_weight[t], averaged over the batch with
    weights[:, t] (sum(w * l) / sum(w), 0 when all weights are 0); loss = sum_t loss_weight[t] * loss_t.

    A module of its own so that the shape check stays out of the traced forwards (see the module
    docstring): TorchRec's pipeline treats a module without tables as a leaf and does not trace into it.

    Args:
        task_names: the T tasks, for error messages.

    Shapes: logits, labels, weights [B, T]; pos_weights, loss_weights [T] -> (loss [], per_task [T]).

    Example:
        loss, per_task = MultiTaskLoss(["fav"])(logits, labels, weights, torch.ones(1), torch.ones(1))
    """

    def __init__(self, task_names: list[str]) -> None:
        super().__init__()
        self.task_names = list(task_names)

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        weights: torch.Tensor,
        pos_weights: torch.Tensor,
        loss_weights: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if tuple(labels.shape) != tuple(logits.shape) or weights.shape != labels.shape:
            raise ValueError(
                f"batch labels {tuple(labels.shape)} / weights {tuple(weights.shape)} do not match the "
                f"model's [B, T={len(self.task_names)}] outputs for tasks {self.task_names}"
            )
        per_example = nn.functional.binary_cross_entropy_with_logits(
            logits, labels.float(), pos_weight=pos_weights, reduction="none"
        )
        weights = weights.float()
        weight_sum = weights.sum(dim=0)
        per_task = (per_example * weights).sum(dim=0) / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)
        per_task = torch.where(weight_sum > 0, per_task, torch.zeros_like(per_task))
        return (per_task * loss_weights).sum(), per_task


class RecapTrainModule(nn.Module):
    """Wraps RecapModel with the loss (MultiTaskLoss): forward(batch) -> (loss, outputs), per docs/design.md.

    outputs: logits, probabilities, labels, weights [B, T] and `loss/<task>` scalars (detached, not
    multiplied by loss_weight).

    Args:
        model: the RecapModel.

    Example:
        loss, outputs = RecapTrainModule(model)(batch); loss.backward()
    """

    def __init__(self, model: RecapModel) -> None:
        super().__init__()
        self.model = model
        self.loss = MultiTaskLoss(model.task_names)

    def forward(self, batch: RecapBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        loss, per_task = self.loss(
            outputs["logits"], batch.labels, batch.weights, self.model.pos_weights, self.model.loss_weights
        )
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
        parameter_groups(RecapTrainModule(model))  # {"backbone": ["model.featurizer.", ...], "fav": [...]}
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
