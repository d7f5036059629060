"""``screener threshold tune``: choose the operating point on labelled images.

Scores the images with the current models, builds the papers' threshold table
(threshold -> sensitivity, specificity with Wilson 95% intervals), proposes the highest
threshold whose sensitivity meets the target (the best specificity at that sensitivity,
as Deep-COVID chose its cut-off), and writes ROC and precision-recall PNGs. Tune on a
validation set, never on the set you report. The command prints the proposal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from screener import evaluation as ev
from screener.settings import Settings

TABLE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass
class TuneProposal:
    model_name: str
    model_version: str
    target_sensitivity: float
    n_positive: int
    n_negative: int
    auc: float
    average_precision: float
    threshold: float | None
    sensitivity: ev.Proportion | None
    specificity: ev.Proportion | None
    table: list[ev.ThresholdRow] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    scheme: str = ""  # the scores' scheme; the threshold means nothing for another one
    # labelled images left out, by reason (study_failed, not_screened, not_found), and the
    # studies that failed (UID -> reason): a threshold tuned without them is not applied
    not_scored: dict[str, int] = field(default_factory=dict)
    failed_studies: dict[str, str] = field(default_factory=dict)

    @property
    def operating_point(self) -> str:
        if self.sensitivity is None or self.specificity is None:
            return ""
        se, sp = self.sensitivity, self.specificity
        return (
            f"target sensitivity {self.target_sensitivity:.3f}: sensitivity {se.value:.3f} "
            f"(Wilson 95% CI {se.low:.3f}-{se.high:.3f}, n={se.n}), specificity {sp.value:.3f} "
            f"({sp.low:.3f}-{sp.high:.3f}, n={sp.n}) on the tuning set; "
            f"model {self.model_name}@{self.model_version}"
            + (f", {self.scheme} scheme (calibrated probability)" if self.scheme else "")
        )

    def to_json(self) -> dict[str, Any]:
        def prop(p: ev.Proportion | None) -> dict[str, float] | None:
            return None if p is None else {"value": p.value, "low": p.low, "high": p.high, "n": p.n}

        return {
            "model": f"{self.model_name}@{self.model_version}",
            "scheme": self.scheme,
            "target_sensitivity": self.target_sensitivity,
            "n_positive": self.n_positive,
            "n_negative": self.n_negative,
            "not_scored": dict(self.not_scored),
            "failed_studies": [
                {"study_instance_uid": uid, "reason": reason}
                for uid, reason in sorted(self.failed_studies.items())
            ],
            "auc": self.auc,
            "average_precision": self.average_precision,
            "threshold": self.threshold,
            "sensitivity": prop(self.sensitivity),
            "specificity": prop(self.specificity),
            "operating_point": self.operating_point,
            "interval": "Wilson score 95%",
            "table": [
                {
                    "threshold": r.threshold,
                    "sensitivity": prop(r.sensitivity),
                    "specificity": prop(r.specificity),
                }
                for r in self.table
            ],
            "plots": self.plots,
        }


def proposal_from_scores(
    labels: list[bool],
    scores: list[float],
    target: float,
    *,
    model: tuple[str, str],
    plots_dir: Path | None = None,
) -> TuneProposal:
    """The pure part: table, proposed threshold and its operating point, plots."""
    if not any(labels) or all(labels):
        raise ValueError("tuning needs both positive and negative labelled images")
    threshold = ev.threshold_for_sensitivity(labels, scores, target)
    at = ev.confusion_at(labels, scores, threshold)
    table = ev.threshold_table(labels, scores, sorted({*TABLE_THRESHOLDS, threshold}))
    plots: list[str] = []
    if plots_dir is not None:
        plots_dir.mkdir(parents=True, exist_ok=True)
        plots = [
            str(ev.plot_roc(labels, scores, plots_dir / "roc.png")),
            str(ev.plot_pr(labels, scores, plots_dir / "pr.png")),
        ]
    return TuneProposal(
        model_name=model[0],
        model_version=model[1],
        target_sensitivity=target,
        n_positive=sum(labels),
        n_negative=len(labels) - sum(labels),
        auc=ev.roc_auc(labels, scores),
        average_precision=ev.average_precision(labels, scores),
        threshold=threshold if at.sensitivity.value >= target else None,
        sensitivity=at.sensitivity,
        specificity=at.specificity,
        table=table,
        plots=plots,
    )


def propose_threshold(
    settings: Settings,
    paths: list[Path],
    labels_csv: Path,
    target: float,
    plots_dir: Path | None,
    positive: str = "covid",
) -> TuneProposal:
    """Score the labelled images with the current models and propose a threshold."""
    from screener.offline_evaluation import read_labels
    from screener.offline_screening import OfflineScreener
    from screener.screening.models import ScreeningModels
    from screener.thresholds import embedded_info

    truth = {uid: row["label"] for uid, row in read_labels(labels_csv).items()}
    models = ScreeningModels.from_settings(settings)
    screener = OfflineScreener(
        settings, models, embedded_info(settings, models.scheme, models.manifest)
    )
    positive = positive.strip().lower()
    run = screener.score_labelled(paths, truth)  # every label accounted for
    labels = [label == positive for label, _, _ in run.scored]
    scores = [score for _, score, _ in run.scored]
    if not labels:
        raise ValueError("no screened image matched the labels CSV")
    info = models.model_info
    proposal = proposal_from_scores(
        labels, scores, target, model=(info.name, info.version), plots_dir=plots_dir
    )
    proposal.scheme = models.scheme
    proposal.not_scored = run.not_scored()
    proposal.failed_studies = dict(run.failed_studies)
    return proposal
