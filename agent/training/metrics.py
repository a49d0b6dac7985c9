"""Evaluation metrics in the paper's format: per-class precision/recall/F1, macro and micro means,
per-subject micro-F1 deltas before/after personalization, and a PNG plot of those deltas.

Micro F1 over single-label multi-class predictions equals accuracy (each sample counts once).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedfer.security.errors import ValidationError

__all__ = [
    "ClassReport",
    "SubjectDelta",
    "classification_report",
    "format_report",
    "format_subject_deltas",
    "plot_subject_deltas",
    "subject_deltas",
]


@dataclass(frozen=True, slots=True)
class ClassReport:
    """Per-class and mean scores (fractions in [0, 1])."""

    classes: tuple[str, ...]
    precision: tuple[float, ...]
    recall: tuple[float, ...]
    f1: tuple[float, ...]
    support: tuple[int, ...]
    macro_precision: float
    macro_recall: float
    macro_f1: float
    micro_f1: float
    confusion: tuple[tuple[int, ...], ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "classes": list(self.classes),
            "per_class": {
                c: {"precision": p, "recall": r, "f1": f, "support": s}
                for c, p, r, f, s in zip(
                    self.classes, self.precision, self.recall, self.f1, self.support, strict=True
                )
            },
            "macro_precision": self.macro_precision,
            "macro_recall": self.macro_recall,
            "macro_f1": self.macro_f1,
            "micro_f1": self.micro_f1,
            "confusion": [list(r) for r in self.confusion],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ClassReport:
        """Inverse of :meth:`as_dict` (e.g. a report read back from JSON).

        Raises:
            ValidationError: ``data`` is not such a report.
        """
        try:
            classes = tuple(str(c) for c in data["classes"])
            rows = [data["per_class"][c] for c in classes]
            return cls(
                classes=classes,
                precision=tuple(float(r["precision"]) for r in rows),
                recall=tuple(float(r["recall"]) for r in rows),
                f1=tuple(float(r["f1"]) for r in rows),
                support=tuple(int(r["support"]) for r in rows),
                macro_precision=float(data["macro_precision"]),
                macro_recall=float(data["macro_recall"]),
                macro_f1=float(data["macro_f1"]),
                micro_f1=float(data["micro_f1"]),
                confusion=tuple(tuple(int(x) for x in row) for row in data["confusion"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValidationError("not a classification report") from exc


def classification_report(
    y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray, classes: Sequence[str]
) -> ClassReport:
    """Per-class precision, recall and F1 plus macro (class-averaged) and micro (sample-averaged) F1.

    A class with no prediction has precision 0; with no sample, recall 0 (and it still counts in the macro
    mean, as in the paper's tables).

    Raises:
        ValidationError: lengths differ, nothing to score, or a label is outside ``range(len(classes))``.
    """
    t = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(y_pred, dtype=np.int64)
    k = len(classes)
    if t.shape != p.shape or t.ndim != 1 or t.size == 0:
        raise ValidationError("y_true and y_pred must be non-empty 1-d sequences of equal length")
    if k == 0 or t.min() < 0 or p.min() < 0 or t.max() >= k or p.max() >= k:
        raise ValidationError("labels must lie in range(len(classes))")
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    tp = np.diag(cm).astype(np.float64)
    pred_n = cm.sum(axis=0).astype(np.float64)
    true_n = cm.sum(axis=1).astype(np.float64)
    prec = np.divide(tp, pred_n, out=np.zeros(k), where=pred_n > 0)
    rec = np.divide(tp, true_n, out=np.zeros(k), where=true_n > 0)
    denom = prec + rec
    f1 = np.divide(2 * prec * rec, denom, out=np.zeros(k), where=denom > 0)
    return ClassReport(
        classes=tuple(classes),
        precision=tuple(float(x) for x in prec),
        recall=tuple(float(x) for x in rec),
        f1=tuple(float(x) for x in f1),
        support=tuple(int(x) for x in true_n),
        macro_precision=float(prec.mean()),
        macro_recall=float(rec.mean()),
        macro_f1=float(f1.mean()),
        micro_f1=float(tp.sum() / t.size),
        confusion=tuple(tuple(int(x) for x in row) for row in cm),
    )


def format_report(report: ClassReport, *, title: str = "") -> str:
    """The paper's table: one row per class (P, R, F1 in %), then the macro and micro means."""
    lines = [title] if title else []
    lines.append(f"{'class':<12}{'P':>8}{'R':>8}{'F1':>8}{'n':>8}")
    for c, p, r, f, s in zip(
        report.classes, report.precision, report.recall, report.f1, report.support, strict=True
    ):
        lines.append(f"{c:<12}{100 * p:8.1f}{100 * r:8.1f}{100 * f:8.1f}{s:8d}")
    lines.append(
        f"{'macro':<12}{100 * report.macro_precision:8.1f}{100 * report.macro_recall:8.1f}"
        f"{100 * report.macro_f1:8.1f}{sum(report.support):8d}"
    )
    lines.append(f"{'micro':<12}{'':8}{'':8}{100 * report.micro_f1:8.1f}")
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SubjectDelta:
    """One subject's micro F1 before and after personalization."""

    subject: str
    before: float
    after: float

    @property
    def delta(self) -> float:
        """``after - before``."""
        return self.after - self.before


def subject_deltas(
    before: Mapping[str, float], after: Mapping[str, float], *, tolerance: float = 1e-9
) -> dict[str, Any]:
    """Summarize per-subject micro-F1 changes: mean delta and counts improved / unchanged / worse.

    Raises:
        ValidationError: the two mappings cover different subjects, or none.
    """
    if set(before) != set(after) or not before:
        raise ValidationError("before/after must cover the same, non-empty set of subjects")
    rows = [SubjectDelta(s, float(before[s]), float(after[s])) for s in sorted(before)]
    deltas = np.array([r.delta for r in rows])
    return {
        "subjects": [
            {"subject": r.subject, "before": r.before, "after": r.after, "delta": r.delta} for r in rows
        ],
        "mean_delta": float(deltas.mean()),
        "improved": int((deltas > tolerance).sum()),
        "unchanged": int((np.abs(deltas) <= tolerance).sum()),
        "worse": int((deltas < -tolerance).sum()),
    }


def format_subject_deltas(summary: Mapping[str, Any]) -> str:
    """Per-subject before/after micro F1 (%) and the summary line."""
    lines = [f"{'subject':<14}{'before':>8}{'after':>8}{'delta':>8}"]
    for row in summary["subjects"]:
        lines.append(
            f"{row['subject']:<14}{100 * row['before']:8.1f}{100 * row['after']:8.1f}"
            f"{100 * row['delta']:+8.1f}"
        )
    lines.append(
        f"mean delta {100 * summary['mean_delta']:+.1f} points; improved {summary['improved']}, "
        f"unchanged {summary['unchanged']}, worse {summary['worse']}"
    )
    return "\n".join(lines)


def plot_subject_deltas(summary: Mapping[str, Any], path: Path, *, title: str = "") -> Path:
    """Save a PNG bar chart of per-subject micro F1 before/after (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["subjects"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(rows)), 4.0))
    ax.bar(x - 0.2, [100 * r["before"] for r in rows], width=0.4, label="before")
    ax.bar(x + 0.2, [100 * r["after"] for r in rows], width=0.4, label="after")
    ax.set_xticks(x, [r["subject"] for r in rows], rotation=60, ha="right")
    ax.set_ylabel("micro F1 (%)")
    ax.set_title(title or "per-subject micro F1 before/after personalization")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
    return path
