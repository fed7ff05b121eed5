"""The SR as DCMTK's dsr2html renders it (the text view many PACS offer): every value with its
label, every label once in the summary, never "Absent Absent"."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomai.inference.findings import Task
from dicomai.results import ResultOptions, build_results, table_for
from tests.unit.test_results import LABELS, _ct_series, _findings, _read

pytestmark = pytest.mark.dcmtk


def _html(sr: Dataset, tmp_path: Path) -> str:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    run = subprocess.run(["dsr2html", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return run.stdout


def _unlabelled(html: str) -> list[str]:
    """Content blocks whose first line is a bare value (no bold concept name, no heading)."""
    body = html.split("<hr>", 1)[-1]
    bad = []
    for chunk in body.split("<div>")[1:]:
        first = chunk.strip().splitlines()[0] if chunk.strip() else ""
        if not first.startswith(("<b>", "<h", "<small>", '<span class="under">')):
            bad.append(first)
    return bad


def _unnamed_evaluations(text: str, task: Task, findings: object) -> list[str]:
    """Labels whose evaluation is not printed as "<finding>: <value> (<code>)"."""
    table = table_for(task)
    missing = []
    for label in LABELS[task]:
        row = table[label]
        value = row.values[0] if findings.is_present(label) else row.values[1]  # type: ignore[attr-defined]
        if f"{row.finding.meaning}: {value.meaning} (" not in text:
            missing.append(label)
    return missing


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


@pytest.mark.parametrize("task", [Task.CHEST_XRAY, Task.HEAD_CT_ICH, Task.BONE_XRAY])
def test_every_value_has_its_label(task: Task, tmp_path: Path) -> None:
    if task is Task.HEAD_CT_ICH:
        sources = _ct_series(4, 64, study="text-view")
    else:
        rel = "chest_xray/nih_cxr14_dx_sc.dcm" if task is Task.CHEST_XRAY else (
            "extremity_xray/RG3_J2KR.dcm")
        sources = [_read(rel)]
    findings = _findings(sources, task)
    (sr,) = build_results(sources, findings, ResultOptions(emit_sc=False, emit_seg=False))
    html = _html(sr, tmp_path)
    assert _unlabelled(html) == []
    text = _text(html)
    assert "Absent Absent" not in text and "Present Present" not in text
    assert _unnamed_evaluations(text, task, findings) == []
    summary = text.split("Qualitative Evaluations", 1)[1]
    assert summary.count("Certainty of Finding =") == len(LABELS[task])
    assert "not for diagnostic use" in text.lower()


def test_the_check_finds_continuous_containers(tmp_path: Path) -> None:
    """A CONTINUOUS container (the old encoding) prints values without their names; the
    check above must see that, or it proves nothing."""
    src = _read("chest_xray/nih_cxr14_dx_sc.dcm")
    findings = _findings([src], Task.CHEST_XRAY)
    (sr,) = build_results([src], findings, ResultOptions(emit_sc=False, emit_seg=False))

    def continuous(items: pydicom.Sequence) -> None:
        for item in items:
            if item.ValueType == "CONTAINER":
                item.ContinuityOfContent = "CONTINUOUS"
            continuous(item.get("ContentSequence", []))

    sr.ContinuityOfContent = "CONTINUOUS"
    continuous(sr.ContentSequence)
    missing = _unnamed_evaluations(_text(_html(sr, tmp_path)), Task.CHEST_XRAY, findings)
    assert missing == list(LABELS[Task.CHEST_XRAY])
