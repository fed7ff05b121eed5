"""The report as text: the terminal table, the per-study score CSV, the suggested thresholds."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def suggested_thresholds_toml(report: Mapping[str, Any]) -> str | None:
    """``[models.NAME]`` + ``thresholds = {...}`` for the suggested operating points."""
    items = [
        (r["label"], r["suggested"]["threshold"]) for r in report["labels"] if r.get("suggested")
    ]
    if not items:
        return None
    body = ", ".join(
        f"{label} = {t:.4f}" if re.fullmatch(r"[A-Za-z0-9_-]+", label) else f'"{label}" = {t:.4f}'
        for label, t in items
    )
    return f"[models.{report['model']['name']}]\nthresholds = {{ {body} }}"


def format_value(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_with_ci(value: float | None, ci: Sequence[float] | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def render_table(report: Mapping[str, Any]) -> Any:
    """A rich renderable: per-label table, then subgroups (when computed)."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    m, d, b = report["model"], report["data"], report["bootstrap"]
    parts: list[Any] = [
        Text(
            f"{m['name']} {m['version']} on {d['analysed']} studies "
            f"({d['not_analysed']} not analysed, {d['labelled_not_found']} labelled but not "
            f"found, {d['analysed_without_route_match']} analysed without a route match); "
            f"95% CI from {b['resamples']} bootstrap resamples (seed {b['seed']})"
        )
    ]
    t = Table(box=box.SIMPLE, title="per label", title_justify="left")
    cols = [
        "label",
        "n",
        "pos",
        "AUROC (95% CI)",
        "threshold",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        "PPV",
        "NPV",
    ]
    suggest = report.get("target_sensitivity") is not None
    if suggest:
        cols += [f"suggested @ sens {report['target_sensitivity']:g}", "sens", "spec"]
    for c in cols:
        t.add_column(c, justify="left" if c == "label" else "right")
    for r in report["labels"]:
        row = label_row(r, suggest)
        t.add_row(*row)
    parts.append(t)
    if report["subgroups"]:
        st = Table(box=box.SIMPLE, title="subgroups", title_justify="left")
        for c in (
            "attribute",
            "value",
            "label",
            "n",
            "pos",
            "AUROC (95% CI)",
            "sensitivity",
            "specificity",
        ):
            st.add_column(c, justify="right" if c in ("n", "pos") else "left")
        for r in report["subgroups"]:
            st.add_row(
                r["attribute"],
                r["value"],
                r["label"],
                str(r["n"]),
                str(r["positives"]),
                format_with_ci(r["auroc"], r["auroc_ci"]),
                format_value(r["sensitivity"]),
                format_value(r["specificity"]),
            )
        parts.append(st)
    toml = suggested_thresholds_toml(report)
    if toml:
        parts.append(Text("suggested thresholds for the configuration:\n" + toml))
    return Group(*parts)


def write_scores_csv(report: Mapping[str, Any], path: Path) -> Path:
    """One row per study: UID, per-label score and label, error."""
    labels = [r["label"] for r in report["labels"]]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "study_instance_uid",
                *(f"score_{x}" for x in labels),
                *(f"label_{x}" for x in labels),
                "error",
            ]
        )
        for s in report["scores"]:
            scores = s["scores"] or {}
            w.writerow(
                [
                    s["study_instance_uid"],
                    *("" if x not in scores else f"{scores[x]:.6f}" for x in labels),
                    *(s["labels"].get(x, "") for x in labels),
                    s["error"] or "",
                ]
            )
    return Path(path)


def label_row(r: dict[str, Any], suggest: bool) -> list[str]:
    """One label's cells, as the terminal table and the HTML report show them."""
    row = [
        r["label"],
        str(r["n"]),
        str(r["positives"]),
        format_with_ci(r["auroc"], r["auroc_ci"]),
        f"{r['threshold']:g}",
        format_with_ci(r["sensitivity"], r["sensitivity_ci"]),
        format_with_ci(r["specificity"], r["specificity_ci"]),
        format_value(r["ppv"]),
        format_value(r["npv"]),
    ]
    if suggest:
        sg = r.get("suggested") or {}
        row += [
            format_value(sg.get("threshold"), 4),
            format_value(sg.get("sensitivity")),
            format_value(sg.get("specificity")),
        ]
    return row
