"""`dicomai models evaluate` on a generated labelled set whose figures are known by
construction: a tiny TorchScript model scores each radiograph by its mean intensity."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from dicomai.ops import cli

from dicomai_tools import synthetic
from dicomai.config import load_settings
from dicomai_tools.evaluate import (
    EvaluationError,
    age_band,
    auroc,
    evaluate,
    load_labels,
    roc_curve,
    sensitivity_specificity,
    suggest_threshold,
    write_html,
)
from dicomai.models.reference import METADATA_FILE

LABELS = ("effusion", "nodule")
# Study i (1..8) has mean grey 0.1 i + 0.05: 0.15 ... 0.85, so the model's "effusion" score
# rises with i and crosses 0.5 between i = 4 and 5; "nodule" falls with i.
EFFUSION_POSITIVE = {3, 5, 7, 8}  # AUROC 13/16; at 0.5: sensitivity 3/4, specificity 3/4
NODULE_POSITIVE = {1, 2}  # AUROC 1; at 0.5 (i <= 4 positive): sensitivity 1, specificity 4/6
MALE = {1, 2, 3, 8}  # effusion AUROC: male 1.0, female (4, 5, 6, 7) 3/4


class MeanIntensity(nn.Module):
    """Logits +-20 (mean - 0.5): monotone in the image's mean intensity; no CAMs."""

    def forward(self, x: Tensor) -> Tensor:
        m = x.mean(dim=[1, 2, 3])
        return torch.stack([20.0 * (m - 0.5), -20.0 * (m - 0.5)], dim=1)


def write_model(path: Path) -> Path:
    meta = {"name": "toy", "architecture": "mean-intensity", "task": "chest_xray",
            "labels": list(LABELS), "version": "1.0.0", "input_channels": 3,
            "min_input_size": 32, "weights": "test", "description": "Mean intensity (test)."}
    torch.jit.save(torch.jit.script(MeanIntensity().eval()), str(path),
                   _extra_files={METADATA_FILE: json.dumps(meta)})
    return path


def write_config(tmp_path: Path, model_path: Path) -> Path:
    cfg = tmp_path / "eval.toml"
    cfg.write_text(f"""
[general]
data_dir = "{tmp_path / 'data'}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 4242
[[routes]]
name = "chest"
model = "toy"
modality = ["DX", "CR"]
body_part = ["CHEST"]
series_rule = "xray_frontal"
[models.toy]
path = "{model_path}"
version = "1.0.0"
task = "chest_xray"
device = "cpu"
threshold = 0.5
[models.toy.preprocessing]
input_size = 32
normalize_mean = [0.0, 0.0, 0.0]
normalize_std = [1.0, 1.0, 1.0]
""")
    return cfg


def make_study(i: int, out: Path, *, body_part: str = "CHEST") -> str:
    """Study i: a 48x48 DX of constant stored value so that the displayed grey is 0.1 i + 0.05."""
    patient = synthetic.PatientInfo(sex="M" if i in MALE else "F")
    ds = synthetic.make_xray("chest", rows=48, cols=48, seed=500 + i, patient=patient,
                             body_part=body_part)
    grey = 0.1 * i + 0.05
    ds.PixelData = np.full((48, 48), round(grey * 4096), dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"  # grey = stored / 4096
    for kw in ("VOILUTSequence", "RescaleSlope", "RescaleIntercept", "RescaleType"):
        if kw in ds:
            delattr(ds, kw)
    ds.PatientAge = "030Y" if i <= 4 else "070Y"
    synthetic.write_study([ds], out / f"study{i}")
    return str(ds.StudyInstanceUID)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    studies = root / "studies"
    uids = {i: make_study(i, studies) for i in range(1, 9)}
    unlabelled = make_study(9, studies)
    (studies / "notes.txt").write_text("not DICOM")
    wide = root / "wide.csv"
    wide.write_text("study_instance_uid,effusion,nodule\n" + "".join(
        f"{uids[i]},{int(i in EFFUSION_POSITIVE)},{int(i in NODULE_POSITIVE)}\n"
        for i in range(1, 9)) + "1.2.3.404,1,0\n")
    long = root / "long.csv"
    long.write_text("study_instance_uid,label,value\n" + "".join(
        f"{uids[i]},effusion,{int(i in EFFUSION_POSITIVE)}\n" for i in range(1, 9)))
    model = write_model(root / "toy.pt")
    cfg = write_config(root, model)
    return {"root": root, "studies": studies, "uids": uids, "unlabelled": unlabelled,
            "wide": wide, "long": long, "cfg": cfg}


# -- statistics by hand --------------------------------------------------------------------
def test_auroc_roc_and_operating_points_by_hand() -> None:
    y = np.array([0, 0, 1, 0, 1, 0, 1, 1])
    s = np.arange(1, 9) / 10
    assert auroc(y, s) == pytest.approx(13 / 16)
    assert auroc(y, -s) == pytest.approx(3 / 16)
    assert auroc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5  # ties count one half
    assert auroc([1, 1], [0.1, 0.2]) is None
    fpr, tpr, _ = roc_curve(y, s)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert np.trapezoid(tpr, fpr) == pytest.approx(13 / 16)
    st = sensitivity_specificity(y, s, 0.45)
    assert (st["sensitivity"], st["specificity"], st["tp"], st["fp"]) == (0.75, 0.75, 3, 1)
    sg = suggest_threshold(y, s, 0.75)
    assert sg == {"threshold": 0.5, "sensitivity": 0.75, "specificity": 0.75}
    sg = suggest_threshold(y, s, 1.0)
    assert sg["threshold"] == pytest.approx(0.3) and sg["specificity"] == 0.5
    assert age_band("045Y") == "40-59" and age_band("006M") == "0-17"
    assert age_band("") == "unknown" and age_band("85Y") == "80+"


# -- the whole evaluation ------------------------------------------------------------------
def test_evaluate_known_figures_subgroups_and_html(dataset, tmp_path) -> None:
    settings = load_settings(dataset["cfg"], environ={})
    report = evaluate(settings, "toy", dataset["studies"], dataset["wide"], subgroups=True,
                      target_sensitivity=0.75, resamples=200, seed=7)
    data = report["data"]
    assert data["studies_found"] == 9 and data["labelled"] == 9
    assert data["labelled_not_found"] == 1 and data["analysed"] == 8
    assert data["files_skipped"] == 1 and data["analysed_without_route_match"] == 0
    rows = {r["label"]: r for r in report["labels"]}
    eff, nod = rows["effusion"], rows["nodule"]
    assert (eff["n"], eff["positives"], eff["negatives"]) == (8, 4, 4)
    assert eff["auroc"] == pytest.approx(0.8125)
    assert (eff["sensitivity"], eff["specificity"]) == (0.75, 0.75)
    assert nod["auroc"] == 1.0
    assert nod["sensitivity"] == 1.0 and nod["specificity"] == pytest.approx(4 / 6, abs=1e-4)
    lo, hi = eff["auroc_ci"]
    assert 0 <= lo <= 0.8125 <= hi <= 1
    assert eff["suggested"]["sensitivity"] == 0.75 and eff["suggested"]["specificity"] == 0.75
    assert 0.5 < eff["suggested"]["threshold"] < 0.9  # the score of study 5, rounded down
    # Bootstrap CIs are seeded: the same seed gives the same intervals.
    again = evaluate(settings, "toy", dataset["studies"], dataset["wide"], resamples=200, seed=7)
    assert again["labels"][0]["auroc_ci"] == eff["auroc_ci"]
    assert again["labels"][0]["sensitivity_ci"] == eff["sensitivity_ci"]

    sub = {(r["attribute"], r["value"], r["label"]): r for r in report["subgroups"]}
    assert sub[("sex", "M", "effusion")]["auroc"] == 1.0
    assert sub[("sex", "F", "effusion")]["auroc"] == 0.75
    assert sub[("sex", "F", "effusion")]["n"] == 4
    assert sub[("age_band", "18-39", "effusion")]["n"] == 4
    assert sub[("age_band", "60-79", "effusion")]["auroc"] == pytest.approx(2 / 3, abs=1e-4)
    assert sub[("manufacturer", "DICOMAI SYNTHETIC", "nodule")]["auroc"] == 1.0
    assert sub[("view_position", "PA", "effusion")]["n"] == 8
    assert sub[("age_band", "60-79", "nodule")]["auroc"] is None  # no positive there

    page = write_html(report, tmp_path / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(pngs) == 2
    assert all(base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    for text in ("effusion", "0.812", "Subgroups", "thresholds = { effusion = ",
                 "bootstrap"):
        assert text in page, text
    assert dataset["uids"][1] not in page  # aggregate figures only


def test_long_labels_and_unrouted_studies(dataset, tmp_path) -> None:
    settings = load_settings(dataset["cfg"], environ={})
    report = evaluate(settings, "toy", dataset["studies"], dataset["long"], resamples=0)
    assert [r["label"] for r in report["labels"]] == ["effusion"]
    assert report["labels"][0]["auroc"] == pytest.approx(0.8125)
    assert report["labels"][0]["auroc_ci"] is None  # no resamples, no interval
    # Without BodyPartExamined no route matches: analysed anyway with the route's series rule.
    odd = tmp_path / "odd"
    uid = make_study(6, odd, body_part="")
    (tmp_path / "odd.csv").write_text(f"study_instance_uid,effusion\n{uid},1\n")
    report = evaluate(settings, "toy", odd, tmp_path / "odd.csv", resamples=0)
    assert report["data"]["analysed_without_route_match"] == 1
    assert report["scores"][0]["scores"]["effusion"] > 0.5


def test_labels_file_errors(tmp_path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("uid,effusion\n1.2,1\n")
    with pytest.raises(EvaluationError, match="no study_instance_uid column"):
        load_labels(bad, LABELS)
    bad.write_text("study_instance_uid,effusion,cardiomegaly\n1.2,1,0\n")
    with pytest.raises(EvaluationError, match=r"no label.*cardiomegaly"):
        load_labels(bad, LABELS)
    bad.write_text("study_instance_uid,effusion\n1.2,yes\n")
    with pytest.raises(EvaluationError, match=r"line 2.*expected 0 or 1"):
        load_labels(bad, LABELS)
    bad.write_text("study_instance_uid,label,value\n1.2,mass,1\n")
    with pytest.raises(EvaluationError, match="no label 'mass'"):
        load_labels(bad, LABELS)
    with pytest.raises(EvaluationError, match="not found"):
        load_labels(tmp_path / "missing.csv", LABELS)
    bad.write_text("study_instance_uid,effusion\n1.2,\n3.4,1\n")
    assert load_labels(bad, LABELS) == {"3.4": {"effusion": 1}}  # empty = not labelled


def test_cli_models_evaluate(dataset, tmp_path, capsys) -> None:
    cfg = str(dataset["cfg"])
    html_path, json_path, scores = tmp_path / "r.html", tmp_path / "r.json", tmp_path / "s.csv"
    code = cli.main(["--config", cfg, "models", "evaluate", "--model", "toy",
                     str(dataset["studies"]), "--labels", str(dataset["wide"]), "--subgroups",
                     "--suggest-thresholds", "--target-sensitivity", "0.75", "--bootstrap",
                     "100", "--html", str(html_path), "--json", str(json_path),
                     "--scores-csv", str(scores)])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("per label", "effusion", "0.812", "subgroups", "suggested thresholds",
                 "[models.toy]", "HTML report"):
        assert text in out, text
    assert html_path.read_text().startswith("<!DOCTYPE html>")
    assert json.loads(json_path.read_text())["labels"][1]["auroc"] == 1.0
    assert len(scores.read_text().splitlines()) == 9  # header + 8 labelled studies found

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(["--config", cfg, "models", "evaluate", *argv])
        return code, capsys.readouterr().err

    code, err = run("--model", "nope", str(dataset["studies"]), "--labels",
                    str(dataset["wide"]))
    assert code == 2 and "no model named 'nope'" in err
    code, err = run("--model", "toy", str(dataset["studies"]), "--labels",
                    str(tmp_path / "missing.csv"))
    assert code == 2 and "labels file not found" in err
    code, err = run("--model", "toy", str(tmp_path / "nowhere"), "--labels",
                    str(dataset["wide"]))
    assert code == 2 and "not a directory" in err
    other = tmp_path / "other.csv"
    other.write_text("study_instance_uid,effusion\n1.2.3.999,1\n")
    code, err = run("--model", "toy", str(dataset["studies"]), "--labels", str(other))
    assert code == 1 and "none of the 1 labelled studies" in err
    code, err = run("--model", "toy", str(dataset["studies"]), "--labels",
                    str(dataset["wide"]), "--device", "tpu")
    assert code == 2 and "--device" in err
