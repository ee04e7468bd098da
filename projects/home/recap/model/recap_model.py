"""The recap heavy ranker: features -> [split towers] -> [backbone] -> one tower per task -> calibrated
probabilities; and the train module that adds the multi-task loss.

Feature segments, in concatenation order: the featurized block (`continuous` then the appended tensors),
the dense vectors (TwHIN), the position embedding, then the embedding vectors (small tables, large-table
features) last, where DLRM expects them.
Heads: logit = tower(x) * scale + bias (fixed affine map, identity when unset); probability =
sigmoid(logit) corrected for negative downsampling: p * r / (1 - p + r * p), r = neg_rate / pos_rate.

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


def downsampling_correction(p: torch.Tensor, odds_ratio: torch.Tensor) -> torch.Tensor:
    """Undo negative downsampling: odds scale by r = neg_rate / pos_rate, so p' = p*r / (1 - p + r*p)."""
    return p * odds_ratio / (1.0 - p + odds_ratio * p)


class RecapModel(nn.Module):
    """Multi-task ranking model (build it with `build_model`).

    Args:
        task_names: T task names, the output column order.
        featurizer: dense block module.
        towers: {task name: [B, F_tower] -> [B, 1]} in task order.
        odds_ratios, affine_scales, affine_biases, pos_weights, loss_weights: [T] floats per task.
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
            self.register_buffer(name, torch.tensor(values, dtype=torch.float32))

    def segments(self, batch: RecapBatch) -> dict[str, torch.Tensor]:
        """Named feature segments [B, width] in concatenation order (embedding vectors last)."""
        block = self.featurizer(batch.dense)
        out: dict[str, torch.Tensor] = {}
        start = 0
        for name, width in self.featurizer.layout:
            out[name] = block[:, start : start + width]
            start += width
        if self.dense_vectors is not None:
            out.update(self.dense_vectors(batch.dense))
        if self.position is not None:
            out["position_debias"] = self.position(batch.dense["discrete"])
        if self.small_embeddings is not None:
            out.update(self.small_embeddings(batch.dense["discrete"]))
        if self.large_embeddings is not None:
            if batch.sparse is None:
                raise ValueError("the model has large_embeddings but batch.sparse is None")
            pooled = self.large_embeddings(batch.sparse)
            out.update({name: pooled[name] for name, _ in self.large_embeddings.layout})
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
        probabilities = downsampling_correction(torch.sigmoid(logits), self.odds_ratios)
        return {"logits": logits, "probabilities": probabilities}


class RecapTrainModule(nn.Module):
    """Wraps RecapModel with the loss: forward(batch) -> (loss, outputs), per docs/design.md.

    Per task t: BCE-with-logits with pos_weight[t], averaged over the batch with weights[:, t]
    (sum(w * l) / sum(w), 0 when all weights are 0); loss = sum_t loss_weight[t] * loss_t.
    outputs: logits, probabilities, labels, weights [B, T] and `loss/<task>` scalars (detached).

    Args:
        model: the RecapModel.

    Example:
        loss, outputs = RecapTrainModule(model)(batch); loss.backward()
    """

    def __init__(self, model: RecapModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: RecapBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        outputs = self.model(batch)
        logits = outputs["logits"]
        tasks = self.model.task_names
        if tuple(batch.labels.shape) != tuple(logits.shape) or batch.weights.shape != batch.labels.shape:
            raise ValueError(
                f"batch labels {tuple(batch.labels.shape)} / weights {tuple(batch.weights.shape)} do not "
                f"match the model's [B, T={len(tasks)}] outputs for tasks {tasks}"
            )
        labels = batch.labels.float()
        weights = batch.weights.float()
        per_example = nn.functional.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=self.model.pos_weights, reduction="none"
        )
        weight_sum = weights.sum(dim=0)
        per_task = (per_example * weights).sum(dim=0) / weight_sum.clamp(min=torch.finfo(torch.float32).tiny)
        per_task = torch.where(weight_sum > 0, per_task, torch.zeros_like(per_task))
        loss = (per_task * self.model.loss_weights).sum()
        outputs = dict(outputs, labels=labels, weights=weights)
        outputs.update({f"loss/{name}": per_task[i].detach() for i, name in enumerate(tasks)})
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

    Prefixes end with "." and match `name.startswith(prefix)` over `model.named_parameters()`.
    """
    recap, prefix = _unwrap(model)
    groups: dict[str, list[str]] = {"backbone": []}
    for child_name, child in recap.named_children():
        if child_name in ("towers", "large_embeddings") or not any(True for _ in child.parameters()):
            continue
        groups["backbone"].append(f"{prefix}{child_name}.")
    for name in recap.task_names:
        groups[name] = [f"{prefix}towers.{sanitize(name)}."]
    return groups
