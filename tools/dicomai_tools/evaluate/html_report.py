"""The self-contained HTML report, with ROC curves drawn by matplotlib."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from dicomai_tools.evaluate.tables import (
    format_value,
    format_with_ci,
    label_row,
    suggested_thresholds_toml,
)


def _roc_png(label: str, roc: Mapping[str, Sequence[float]], row: Mapping[str, Any]) -> str:
    """Base64 PNG of one label's ROC curve with its operating point(s)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4), dpi=96)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=1)
    ax.plot(
        roc["fpr"],
        roc["tpr"],
        drawstyle="default",
        color="#1f5fa8",
        linewidth=2,
        label=f"AUROC {format_value(row['auroc'])}",
    )
    if row["sensitivity"] is not None and row["specificity"] is not None:
        ax.plot(
            [1 - row["specificity"]],
            [row["sensitivity"]],
            "o",
            color="#c0392b",
            label=f"threshold {row['threshold']:g}",
        )
    sg = row.get("suggested")
    if sg and sg.get("sensitivity") is not None and sg.get("specificity") is not None:
        ax.plot(
            [1 - sg["specificity"]],
            [sg["sensitivity"]],
            "s",
            color="#27ae60",
            label=f"suggested {sg['threshold']:.4f}",
        )
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(label)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_html(report: Mapping[str, Any], path: Path) -> Path:
    """A self-contained HTML report (tables, ROC PNGs embedded as base64)."""
    e = html.escape
    m, d, b = report["model"], report["data"], report["bootstrap"]
    suggest = report.get("target_sensitivity") is not None

    def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    headers = [
        "label",
        "n",
        "positives",
        "AUROC (95% CI)",
        "threshold",
        "sensitivity (95% CI)",
        "specificity (95% CI)",
        "PPV",
        "NPV",
    ]
    if suggest:
        headers += [
            f"suggested threshold (sensitivity {report['target_sensitivity']:g})",
            "sensitivity",
            "specificity",
        ]
    rows = []
    for r in report["labels"]:
        row = label_row(r, suggest)
        rows.append(row)
    figures = "".join(
        f'<figure><img alt="ROC curve of {e(r["label"])}" src="data:image/png;base64,'
        f'{_roc_png(r["label"], report["roc"][r["label"]], r)}"></figure>'
        for r in report["labels"]
    )
    sub = ""
    if report["subgroups"]:
        sub = (
            "<h2>Subgroups</h2>"
            + table(
                [
                    "attribute",
                    "value",
                    "label",
                    "n",
                    "positives",
                    "AUROC (95% CI)",
                    "sensitivity (95% CI)",
                    "specificity (95% CI)",
                ],
                [
                    [
                        r["attribute"],
                        r["value"],
                        r["label"],
                        str(r["n"]),
                        str(r["positives"]),
                        format_with_ci(r["auroc"], r["auroc_ci"]),
                        format_with_ci(r["sensitivity"], r["sensitivity_ci"]),
                        format_with_ci(r["specificity"], r["specificity_ci"]),
                    ]
                    for r in report["subgroups"]
                ],
            )
            + "<p>Small subgroups give wide intervals; a dash means the subgroup lacks "
            "positives or negatives for that figure.</p>"
        )
    toml = suggested_thresholds_toml(report)
    toml_html = f"<h2>Suggested thresholds</h2><pre>{e(toml)}</pre>" if toml else ""
    reasons = ", ".join(f"{k}: {v}" for k, v in d["not_analysed_reasons"].items()) or "none"
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>dicomai evaluation: {e(m["name"])} {e(m["version"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f2f2f2; }}
figure {{ display: inline-block; margin: 0.5em; }}
.note {{ color: #555; }}
</style></head><body>
<h1>Evaluation of {e(m["name"])} {e(m["version"])}</h1>
<p class="note">Generated {e(report["generated_at"])} by dicomai. Model file
{e(m["path"])}, SHA-256 {e(str(m["sha256"]))}, device {e(m["device"])}.<br>
{e(str(m["description"] or ""))}</p>
<h2>Data</h2>
<p>{d["analysed"]} studies analysed of {d["labelled"]} labelled ({d["labelled_not_found"]}
labelled but not found under {e(d["directory"])}; {d["not_analysed"]} not analysed: {e(reasons)};
{d["analysed_without_route_match"]} analysed without matching the model's route;
{d["files_skipped"]} files skipped as not DICOM images).</p>
<p>A study is positive for a label when its study-level score reaches the threshold.
95% confidence intervals are percentiles of {b["resamples"]} study-level bootstrap
resamples (seed {b["seed"]}).</p>
<h2>Per label</h2>
{table(headers, rows)}
{toml_html}
<h2>ROC curves</h2>
{figures}
{sub}
</body></html>
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path
