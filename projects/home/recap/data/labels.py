"""The known random label function of the synthetic recap data, and a streaming AUC.

For T tasks and a row with numeric feature signal `phi` [P] (standardized log1p continuous values, centred
bits, embedding vectors; each group scaled to unit total variance), categorical values and sparse ids:

    numeric_t  = tanh(phi @ W1) @ w2_t + phi @ l_t            (a one-hidden-layer random network)
    discrete_t = sum over informative discrete columns of effect_t[value]
    sparse_t   = sum over sparse id columns of effect_t[id] / sqrt(1 + rank(id) / HEAD_IDS)
    logit_t    = scale_t * (numeric_t + 0.5 discrete_t + 0.7 sparse_t [+ a affinity]) + 0.5 u + bias_t
    label_t    ~ Bernoulli(sigmoid(logit_t))

`affinity` is present only when the data is generated with a user-author affinity (synthetic.Affinity):
the same standardized score of the row's (user, author) pair for every task, weighing `a`.
Every per-task weight is `0.8 * shared + 0.6 * own`, and `u` ~ N(0, 1) is one unobserved factor per row
shared by all tasks, so labels are correlated. An id's effect shrinks with its popularity rank, as with
real authors: the popular ones differ and are seen often enough to learn, the long tail is near average. Components are standardized and `scale_t` set on a
calibration sample so the signal has std SIGNAL_STD; `bias_t` is found by bisection to hit the task's base
rate (BASE_RATES, DEFAULT_BASE_RATE otherwise).

Example:
    model = LabelModel.create(rng, phi_widths=[32, 16], discrete_cards=[[5, 40]],
                              sparse_ranks=[np.arange(1000)], num_tasks=2)
    model.calibrate(phi_groups, discrete, sparse, u, base_rates=[0.03, 0.01])
    logits = model.logits(phi_groups, discrete, sparse, u)     # [N, T]
"""

from __future__ import annotations

import dataclasses

import numpy as np

BASE_RATES = {
    "recap.engagement.is_favorited": 0.03,
    "recap.engagement.is_replied": 0.005,
    "recap.engagement.is_retweeted": 0.01,
    "recap.engagement.is_report_tweet_clicked": 0.0001,
    "recap.engagement.is_negative_feedback_v2": 0.002,
    "recap.engagement.is_good_clicked_convo_desc_v2": 0.02,
    "recap.engagement.is_video_playback_50": 0.015,
}
RECAP_DEFAULT_RATE = 0.01
DEFAULT_BASE_RATE = 0.05
SIGNAL_STD = 1.6
SHARED_LATENT = 0.5
HIDDEN = 16
HEAD_IDS = 100


def base_rate(task: str) -> float:
    """Target positive rate of a label: the recap rates, 1% for other recap tasks, 5% otherwise."""
    if task in BASE_RATES:
        return BASE_RATES[task]
    return RECAP_DEFAULT_RATE if task.startswith("recap.") else DEFAULT_BASE_RATE


def _task_weights(rng: np.random.Generator, shape: tuple[int, ...], num_tasks: int) -> np.ndarray:
    shared = rng.standard_normal((*shape, 1))
    return (0.8 * shared + 0.6 * rng.standard_normal((*shape, num_tasks))).astype(np.float32)


@dataclasses.dataclass
class LabelModel:
    """Random parameters plus calibration statistics; `logits()` is deterministic given its inputs."""

    w1: np.ndarray
    w2: np.ndarray
    linear: np.ndarray
    discrete_effects: list[list[np.ndarray]]
    sparse_effects: list[np.ndarray]
    phi_mean: list[np.ndarray] = dataclasses.field(default_factory=list)
    phi_scale: list[np.ndarray] = dataclasses.field(default_factory=list)
    component_std: np.ndarray | None = None
    scale: np.ndarray | None = None
    bias: np.ndarray | None = None
    affinity_weight: float | None = None  # None: no affinity component

    @classmethod
    def create(
        cls,
        rng: np.random.Generator,
        phi_widths: list[int],
        discrete_cards: list[list[int]],
        sparse_ranks: list[np.ndarray],
        num_tasks: int,
        affinity_weight: float | None = None,
    ) -> LabelModel:
        width = sum(phi_widths)
        return cls(
            affinity_weight=affinity_weight,
            w1=(rng.standard_normal((width, HIDDEN)) * 1.0 / np.sqrt(max(len(phi_widths), 1))).astype(
                np.float32
            ),
            w2=_task_weights(rng, (HIDDEN,), num_tasks),
            linear=_task_weights(rng, (width,), num_tasks),
            discrete_effects=[
                [_task_weights(rng, (card,), num_tasks) for card in cards] for cards in discrete_cards
            ],
            sparse_effects=[
                _task_weights(rng, (len(ranks),), num_tasks) / np.sqrt(1.0 + ranks / HEAD_IDS)[:, None]
                for ranks in sparse_ranks
            ],
        )

    def _phi(self, phi_groups: list[np.ndarray]) -> np.ndarray:
        parts = [
            (group - mean) * scale
            for group, mean, scale in zip(phi_groups, self.phi_mean, self.phi_scale, strict=True)
        ]
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts, axis=1).astype(np.float32)

    def _components(
        self,
        phi_groups: list[np.ndarray],
        discrete: list[np.ndarray],
        sparse: list[np.ndarray],
        affinity: np.ndarray | None = None,
    ) -> np.ndarray:
        """[3, N, T]: numeric, discrete and sparse parts of the signal, before scaling ([4, N, T] with the
        affinity [N] of a model created with an affinity_weight)."""
        if (affinity is None) != (self.affinity_weight is None):
            raise ValueError("give the affinity exactly when the label model has an affinity_weight")
        rows = len(phi_groups[0]) if phi_groups else len(discrete[0]) if discrete else len(sparse[0])
        tasks = self.w2.shape[1]
        out = np.zeros((3 if affinity is None else 4, rows, tasks), dtype=np.float32)
        if affinity is not None:
            out[3] = affinity[:, None]
        if phi_groups:
            phi = self._phi(phi_groups)
            out[0] = np.tanh(phi @ self.w1) @ self.w2 + phi @ self.linear / np.sqrt(len(phi_groups))
        for values, effects in zip(discrete, self.discrete_effects, strict=True):
            for column, effect in enumerate(effects):
                out[1] += effect[values[:, column]]
        for ids, effect in zip(sparse, self.sparse_effects, strict=True):
            out[2] += effect[ids]
        return out

    def calibrate(
        self,
        phi_groups: list[np.ndarray],
        discrete: list[np.ndarray],
        sparse: list[np.ndarray],
        u: np.ndarray,
        base_rates: list[float],
        affinity: np.ndarray | None = None,
    ) -> None:
        """Fix standardization, signal scale and per-task bias from a calibration sample."""
        self.phi_mean = [group.mean(axis=0) for group in phi_groups]
        # Each group gets unit total variance, so a 200-d embedding does not drown 16 binary bits.
        self.phi_scale = [
            1.0 / (np.maximum(group.std(axis=0), 1e-6) * np.sqrt(group.shape[1])) for group in phi_groups
        ]
        components = self._components(phi_groups, discrete, sparse, affinity)
        std = components.std(axis=1)
        self.component_std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        mixed = self._mix(components)
        self.scale = (SIGNAL_STD / np.maximum(mixed.std(axis=0), 1e-6)).astype(np.float32)
        signal = mixed * self.scale + SHARED_LATENT * u[:, None]
        self.bias = np.array(
            [_bisect_bias(signal[:, t], rate) for t, rate in enumerate(base_rates)], np.float32
        )

    def _mix(self, components: np.ndarray) -> np.ndarray:
        weights = np.array([1.0, 0.5, 0.7, self.affinity_weight or 0.0], dtype=np.float32)
        weights = weights[: len(components), None, None]
        return (components / self.component_std[:, None, :] * weights).sum(axis=0)

    def logits(
        self,
        phi_groups: list[np.ndarray],
        discrete: list[np.ndarray],
        sparse: list[np.ndarray],
        u: np.ndarray,
        affinity: np.ndarray | None = None,
    ) -> np.ndarray:
        """[N, T] true logits of the labels."""
        mixed = self._mix(self._components(phi_groups, discrete, sparse, affinity))
        return mixed * self.scale + SHARED_LATENT * u[:, None] + self.bias


def _bisect_bias(signal: np.ndarray, rate: float) -> float:
    low, high = -40.0, 20.0
    for _ in range(60):
        mid = (low + high) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(signal + mid)))) < rate:
            low = mid
        else:
            high = mid
    return (low + high) / 2


class AucHistogram:
    """Streaming AUC of (logit, label) pairs per task: label counts in fine logit bins, ties count half."""

    LOW, HIGH, BINS = -25.0, 15.0, 1 << 15

    def __init__(self, num_tasks: int) -> None:
        self.pos = np.zeros((num_tasks, self.BINS), dtype=np.int64)
        self.neg = np.zeros((num_tasks, self.BINS), dtype=np.int64)

    def add(self, logits: np.ndarray, labels: np.ndarray) -> None:
        tasks = logits.shape[1]
        index = ((logits - self.LOW) * (self.BINS / (self.HIGH - self.LOW))).astype(np.int64)
        index = np.clip(index, 0, self.BINS - 1) + np.arange(tasks) * self.BINS
        size = tasks * self.BINS
        self.pos += np.bincount(index[labels], minlength=size).reshape(tasks, self.BINS)
        self.neg += np.bincount(index[~labels], minlength=size).reshape(tasks, self.BINS)

    def auc(self) -> list[float]:
        out = []
        for pos, neg in zip(self.pos, self.neg, strict=True):
            below = np.cumsum(neg) - neg
            pairs = pos.sum() * neg.sum()
            out.append(float((pos * (below + 0.5 * neg)).sum() / pairs) if pairs else float("nan"))
        return out
