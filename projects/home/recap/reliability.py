"""What `tml-recap evaluate` reports about calibration: the metrics of the isotonic-calibrated
probabilities beside those of the probabilities as trained, and a reliability diagram per task.

With a calibration file, every ranking metric key `<segment/><task>/<metric>` gets a companion
`<segment/><task>/isotonic_<metric>` for auroc, log_loss, rce, calibration and mean_prediction (the same
batches, the probabilities passed through the fitted map), so the evaluation table shows both in one row.
The diagrams plot, in 20 groups of predictions of equal weight, the observed (weighted) positive rate
against the mean prediction, before and after the map, on log axes; they are written next to the metrics
file as `<stem>.<partition>.<task>.reliability.png`.

Example:
    report = CalibrationReport(build_metrics(config, device), config, knots, device)
    evaluate(module, batches, report, None, env)      # ranking metrics + isotonic_* columns
    write_diagrams({"valid": report}, list(config.model.tasks), "runs/x/evaluate/step-10")
"""

from __future__ import annotations

import numpy as np
import torch

from tml.projects.home.recap.isotonic import BinnedStats
from tml.projects.home.recap.model.heads import Calibrator

ISOTONIC_METRICS = ("auroc", "log_loss", "rce", "calibration", "mean_prediction")
GROUPS = 20


class CalibrationReport:
    """The eval loop's metrics protocol: `metrics` on the probabilities as trained, and with `knots` the
    same metrics of the calibrated probabilities (`isotonic_<metric>`); binned sums of both for the
    diagrams (`before`, `after` once computed).

    Args:
        metrics: the ranking metrics of the partition (build_metrics).
        config: the RecapConfig (tasks, stratifiers, calibration.num_bins).
        knots: task -> (x, y) of the fitted map, None: no calibration file.
        device: where the state lives.
    """

    def __init__(self, metrics, config, knots: dict | None, device: torch.device) -> None:
        from tml.projects.home.recap.build import build_metrics

        self.tasks = list(config.model.tasks)
        self.metrics = metrics
        bins = config.calibration.num_bins
        self._before = BinnedStats(len(self.tasks), bins, device)
        self.calibrator = self._after = self.calibrated = None
        if knots is not None:
            self.calibrator = Calibrator([knots[t] for t in self.tasks]).to(device)
            self.calibrated = build_metrics(config, device)
            self._after = BinnedStats(len(self.tasks), bins, device)
        self.before: BinnedStats | None = None
        self.after: BinnedStats | None = None

    def update(self, batch, outputs: dict[str, torch.Tensor]) -> None:
        self.metrics.update(batch, outputs)
        p = outputs["probabilities"].float()
        self._before.update(p, outputs["labels"], outputs["weights"])
        if self.calibrator is not None:
            q = self.calibrator(p)
            self.calibrated.update(batch, {**outputs, "probabilities": q})
            self._after.update(q, outputs["labels"], outputs["weights"])

    def compute(self) -> dict[str, float]:
        results = self.metrics.compute()
        self.before = self._before.reduced()
        if self.calibrator is not None:
            for key, value in self.calibrated.compute().items():
                head, _, metric = key.rpartition("/")
                if metric in ISOTONIC_METRICS:
                    results[f"{head}/isotonic_{metric}"] = value
            self.after = self._after.reduced()
        return results

    def reset(self) -> None:
        for part in (self.metrics, self.calibrated, self._before, self._after):
            if part is not None:
                part.reset()


def _groups(stats: BinnedStats, task: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean prediction, observed rate) of GROUPS runs of bins holding about equal weight."""
    x, y, w = stats.points(task)
    edges = np.searchsorted(np.cumsum(w) / w.sum(), np.linspace(0, 1, GROUPS + 1)[1:-1], side="right")
    means, rates = [], []
    for part in np.split(np.arange(len(w)), np.unique(edges)):
        if len(part):
            weight = w[part].sum()
            means.append((w[part] * x[part]).sum() / weight)
            rates.append((w[part] * y[part]).sum() / weight)
    return np.array(means), np.array(rates)


def write_diagrams(reports: dict[str, CalibrationReport], tasks: list[str], stem: str) -> list[str]:
    """One PNG per partition and task, `<stem>.<partition>.<task>.reliability.png`; their paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    paths = []
    for partition, report in reports.items():
        for t, task in enumerate(tasks):
            figure = Figure(figsize=(4.5, 4.5), dpi=100)
            FigureCanvasAgg(figure)
            axes = figure.add_subplot()
            curves = [("as trained", report.before, "o-")]
            if report.after is not None:
                curves.append(("isotonic", report.after, "s-"))
            low, high = 1.0, 0.0
            for label, stats, style in curves:
                weight, labels, predictions = stats.totals(t)
                if weight <= 0:
                    continue  # no example of this task in the partition
                mean, rate = _groups(stats, t)
                shown = rate > 0  # log axes: a group without positives has no point
                ratio = f"{predictions / labels:.3f}" if labels > 0 else "n/a, no positives"
                axes.plot(mean[shown], rate[shown], style, ms=4, label=f"{label} (calibration {ratio})")
                values = np.concatenate([mean, rate[shown]])
                low, high = min(low, values.min()), max(high, values.max())
            if low < high:
                axes.plot([low, high], [low, high], "k--", lw=0.8, label="perfect")
            axes.set(xscale="log", yscale="log", xlabel="mean prediction", ylabel="observed positive rate")
            axes.set_title(f"{task}\n{partition}", fontsize=9)
            axes.legend(fontsize=7, loc="upper left")
            figure.tight_layout()
            path = f"{stem}.{partition}.{task}.reliability.png"
            figure.savefig(path)
            paths.append(path)
    return paths
