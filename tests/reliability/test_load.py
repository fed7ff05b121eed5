"""Load: 8 concurrent associations deliver 2,000 instances while studies are analysed and sent.

`dicomai serve` as a real process (chest-xray route only), eight DCMTK storescu processes as
the modalities, a LocalPacs in the test process. The daemon's VmRSS is sampled every 0.5 s.
Figures are printed (``pytest -s``) and written to ``<tmp_path>/load_figures.json``.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from dicomai_tools import synthetic
from tests.reliability.conftest import RelRssSampler, rel_storescu
from tests.waiting import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.dcmtk]

SENDERS = 8
STUDIES = 40
PER_STUDY = 50  # 49 lateral images in series 1, one PA image in series 2
PEAK_RSS_LIMIT_KB = 3 * 1024 * 1024
GROWTH_LIMIT = 1.5


def _chest_study(k: int) -> tuple[list, str]:
    """A chest study: a lateral series of 49 images and a later PA series of one image.

    Routing (xray_frontal) must pick the PA series, so one image per study is analysed.
    """
    study_uid = synthetic.derive_uid("load", k, "study")
    lateral_uid = synthetic.derive_uid("load", k, "lateral")
    frontal_uid = synthetic.derive_uid("load", k, "frontal")
    out = []
    for i in range(PER_STUDY - 1):
        ds = synthetic.make_xray("chest", view_position="LL", rows=64, cols=64,
                                 seed=1000 * k + i, study_uid=study_uid, series_uid=lateral_uid)
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        out.append(ds)
    pa = synthetic.make_xray("chest", view_position="PA", rows=64, cols=64, seed=1000 * k + 999,
                             study_uid=study_uid, series_uid=frontal_uid)
    pa.SeriesNumber, pa.InstanceNumber = 2, 1
    out.append(pa)
    return out, str(pa.SOPInstanceUID)


def test_8_associations_2000_instances(rel_serve, rel_storescu_runs, local_pacs, tmp_path,
                                       rel_report):
    studies = {}
    files_per_sender: list[list] = [[] for _ in range(SENDERS)]
    for k in range(STUDIES):
        datasets, pa_uid = _chest_study(k)
        studies[datasets[0].StudyInstanceUID] = pa_uid
        # Sender k % 8 sends its studies one after the other, as a PACS forwards them.
        files_per_sender[k % SENDERS] += synthetic.write_study(datasets, tmp_path / f"s{k}")
    total = sum(len(f) for f in files_per_sender)
    assert total == STUDIES * PER_STUDY == 2000

    serve = rel_serve(local_pacs.port, quiet=5.0, routes=["chest-xray"])
    proc = serve.start()
    with RelRssSampler(proc.pid, probe=serve.instance_count) as rss:
        t0 = time.monotonic()
        runs = [rel_storescu(serve.port, files, calling_ae=f"MOD{i}")
                for i, files in enumerate(files_per_sender)]
        rel_storescu_runs.extend(runs)
        for run in runs:
            assert run.wait(300) == 0, run.out[-2000:]
        receive_s = time.monotonic() - t0
        for run in runs:
            assert run.statuses == ["Success"] * len(run.files)
        assert serve.instance_count() == total

        def all_done() -> bool:
            counts = serve.status()["counts"]
            bad = {s: n for s, n in counts.items() if s in ("failed", "cancelled", "skipped")
                   and n}
            assert not bad, bad
            return counts["done"] == STUDIES

        wait_until(all_done, timeout=180, interval=0.5, what="all studies done")
        done_s = time.monotonic() - t0
        wait_until(lambda: len(rss.samples) >= 2 and rss.samples[-1][2] == total, timeout=10,
                   what="a final RSS sample")
    assert proc.poll() is None, serve.log_tail()

    # Every study once: one generation, one SR at the PACS; routing chose the PA image.
    data = serve.status()
    assert data["counts"]["done"] == STUDIES
    per_study = Counter(s["study_instance_uid"] for s in data["studies"])
    assert set(per_study) == set(studies)
    for s in data["studies"]:
        assert (s["generation"], s["instances"], s["route"]) == (1, PER_STUDY, "chest-xray")
    srs = [o for o in local_pacs.objects() if o.modality == "SR"]
    assert Counter(o.study_instance_uid for o in srs) == {uid: 1 for uid in studies}
    for sr in srs:
        (series,) = sr.dataset.CurrentRequestedProcedureEvidenceSequence[0] \
            .ReferencedSeriesSequence
        refs = [r.ReferencedSOPInstanceUID for r in series.ReferencedSOPSequence]
        assert refs == [studies[sr.study_instance_uid]]
    assert len({o.sop_instance_uid for o in local_pacs.objects()}) == len(local_pacs.objects())

    # Memory: bounded peak, no runaway growth once the daemon is fully up. The port opens
    # before the models load and the decode process starts, so the first 500 instances can
    # arrive before either; the growth is measured from 1000 instances (after the first
    # analyses) to the end.
    peak_kb = max(kb for _, kb, _ in rss.samples)
    at_500_kb = next(kb for _, kb, n in rss.samples if n >= 500)
    at_1000_kb = next(kb for _, kb, n in rss.samples if n >= 1000)  # after the first analyses
    end_kb = rss.samples[-1][1]
    growth = end_kb / at_1000_kb
    inference = [s["inference_seconds"] for s in data["studies"]]
    figures = {
        "instances": total,
        "associations": SENDERS,
        "receive_seconds": round(receive_s, 2),
        "instances_per_second": round(total / receive_s, 1),
        "all_done_seconds": round(done_s, 2),
        "inference_seconds_mean": round(sum(inference) / len(inference), 3),
        "rss_start_mb": round(rss.samples[0][1] / 1024, 1),
        "rss_after_500_mb": round(at_500_kb / 1024, 1),
        "rss_after_1000_mb": round(at_1000_kb / 1024, 1),
        "rss_peak_mb": round(peak_kb / 1024, 1),
        "rss_end_mb": round(end_kb / 1024, 1),
        "rss_growth_end_over_1000": round(growth, 3),
        "rss_samples": len(rss.samples),
        "daemon_start_seconds": serve.started,
    }
    (tmp_path / "load_figures.json").write_text(json.dumps(
        {**figures, "samples_seconds_kb_instances": rss.samples}, indent=1))
    for key, value in figures.items():
        rel_report(key, value)
    rel_report("figures file", tmp_path / "load_figures.json")
    assert peak_kb < PEAK_RSS_LIMIT_KB
    assert growth <= GROWTH_LIMIT
