"""Bundled real de-identified DICOM samples, and demo studies built from them and synthetic data."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final, Literal

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomai_tools import synthetic

__all__ = [
    "REAL_SAMPLES",
    "SAMPLES_DIR",
    "DemoKind",
    "DemoStudy",
    "demo_studies",
    "real_sample",
]

#: Folder of the bundled real samples; provenance and licences are in ``PROVENANCE.md`` there.
SAMPLES_DIR: Final = Path(__file__).resolve().parent / "real"

#: Relative paths (under `SAMPLES_DIR`) of every bundled real sample.
REAL_SAMPLES: Final = (
    "chest_xray/RG1_J2KI.dcm",
    "chest_xray/nih_cxr14_dx_sc.dcm",
    "extremity_xray/RG2_J2KI.dcm",
    "extremity_xray/RG3_J2KR.dcm",
    "head_ct/CT2_UNC.dcm",
    "other/misc/pcir_cspine_cr_lat_16x16.dcm",
)

DemoKind = Literal["chest-xray", "bone-xray", "head-ct", "unroutable"]

_CHEST_SAMPLE: Final = "chest_xray/RG1_J2KI.dcm"
_BONE_SAMPLE: Final = "extremity_xray/RG3_J2KR.dcm"
_HEAD_CT_SLICES: Final = 24


@dataclass(frozen=True, slots=True)
class DemoStudy:
    """One demo study written to disk, ready to C-STORE.

    Parameters
    ----------
    kind
        Which route it should take: ``chest-xray``, ``bone-xray``, ``head-ct``, or
        ``unroutable`` (no route should match).
    description
        What the study is and what was changed from its source, for the demo's output.
    files
        The written DICOM files.
    study_instance_uid
        The study's (fresh) StudyInstanceUID.
    """

    kind: DemoKind
    description: str
    files: list[Path]
    study_instance_uid: str


def real_sample(relpath: str | os.PathLike[str]) -> Path:
    """Return the path of a bundled real sample.

    Parameters
    ----------
    relpath
        Path relative to `SAMPLES_DIR`, with ``/`` separators, e.g.
        ``"chest_xray/RG1_J2KI.dcm"``.

    Returns
    -------
    Path
        The absolute path of the file. Treat it as read-only.

    Raises
    ------
    ValueError
        If `relpath` is absolute or leaves `SAMPLES_DIR`.
    FileNotFoundError
        If no such sample is bundled.
    """
    rel = PurePosixPath(Path(relpath).as_posix())
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise ValueError('Argument "relpath" must be a relative path inside SAMPLES_DIR.')
    path = SAMPLES_DIR.joinpath(*rel.parts)
    if not path.is_file():
        raise FileNotFoundError(f"no bundled sample {rel.as_posix()!r}")
    return path


def demo_studies(
    tmp_dir: str | os.PathLike[str],
    uid_seed: str,
    *,
    include_unroutable: bool = False,
    bone_body_part: str | None = None,
) -> list[DemoStudy]:
    """Write one study per routed kind (plus optionally an unroutable one) for the demo.

    - ``chest-xray``: a copy of the real CR PA chest ``chest_xray/RG1_J2KI.dcm``
      (BodyPartExamined CHEST).
    - ``bone-xray``: a copy of the real CR AP right distal tibia/ankle
      ``extremity_xray/RG3_J2KR.dcm``, whose BodyPartExamined is ``EXTREMITY``.
    - ``head-ct``: a generated 24-slice 256x256 axial head CT phantom with a small
      hyperdense subdural crescent (`synthetic.make_head_ct`).
    - ``unroutable`` (only with `include_unroutable`): a generated 3-slice sagittal MR knee.

    Every copy gets new Study, Series and SOP Instance UIDs derived from `uid_seed`, so a
    second run with another seed is not deduplicated against the first, while the same seed
    always gives the same UIDs. Pixel data and every other attribute are copied unchanged,
    except where a description says otherwise. Generated studies carry the PHI sentinels of
    `synthetic.PatientInfo`.

    Parameters
    ----------
    tmp_dir
        Folder to write into; files go to ``<tmp_dir>/demo-<hash of uid_seed>/<kind>/``.
    uid_seed
        Non-empty text that fixes every new UID, for example a timestamp or a run id.
    include_unroutable
        Also write the MR knee study.
    bone_body_part
        If given, BodyPartExamined to write into the bone copy instead of the source's
        ``EXTREMITY`` (for example ``ANKLE`` or ``LEG`` when the bone route does not list
        ``EXTREMITY``); the description then says so.

    Returns
    -------
    list of DemoStudy
        In the order chest-xray, bone-xray, head-ct, then unroutable if requested.

    Raises
    ------
    ValueError
        If `uid_seed` is empty or `bone_body_part` is not an upper-case code string.
    """
    if not isinstance(uid_seed, str) or not uid_seed:
        raise ValueError('Argument "uid_seed" must be a non-empty string.')
    if bone_body_part is not None and (
        not bone_body_part or not bone_body_part.isupper() or len(bone_body_part) > 16
    ):
        raise ValueError('Argument "bone_body_part" must be an upper-case code string.')
    run_tag = hashlib.sha256(uid_seed.encode()).hexdigest()[:12]
    root = Path(tmp_dir) / f"demo-{run_tag}"
    seed = int(run_tag, 16) % 2**32

    studies = [
        _copy_real(
            "chest-xray",
            _CHEST_SAMPLE,
            root / "chest-xray",
            uid_seed,
            "Real CR PA chest radiograph (NEMA WG-04 RG1: Philips, MONOCHROME1, "
            "lossy JPEG 2000, 1955x1841)",
            ensure={"BodyPartExamined": "CHEST"},
        ),
        _copy_real(
            "bone-xray",
            _BONE_SAMPLE,
            root / "bone-xray",
            uid_seed,
            "Real CR AP radiograph of the right distal tibia/ankle (NEMA WG-04 RG3: Fuji, "
            "MONOCHROME1, lossless JPEG 2000, 1760x1760)",
            ensure={"BodyPartExamined": "EXTREMITY"},
            override={"BodyPartExamined": bone_body_part} if bone_body_part else {},
        ),
    ]

    ct_study_uid = synthetic.derive_uid("demo", uid_seed, "head-ct", "study")
    head_ct = synthetic.make_head_ct(_HEAD_CT_SLICES, study_uid=ct_study_uid, seed=seed, bleed=True)
    studies.append(
        DemoStudy(
            kind="head-ct",
            description=(
                f"Generated non-contrast axial head CT phantom: {_HEAD_CT_SLICES} slices of "
                "256x256, 5 mm, with a 72 HU right subdural crescent on a few middle slices; "
                "PHI-sentinel patient"
            ),
            files=synthetic.write_study(head_ct, root / "head-ct"),
            study_instance_uid=ct_study_uid,
        )
    )
    if include_unroutable:
        mr_study_uid = synthetic.derive_uid("demo", uid_seed, "unroutable", "study")
        mr = synthetic.make_mr("KNEE", 3, study_uid=mr_study_uid, seed=seed)
        studies.append(
            DemoStudy(
                kind="unroutable",
                description=(
                    "Generated sagittal MR knee, 3 slices (MR Image Storage): no route "
                    "should match; PHI-sentinel patient"
                ),
                files=synthetic.write_study(mr, root / "unroutable"),
                study_instance_uid=mr_study_uid,
            )
        )
    return studies


def _copy_real(
    kind: DemoKind,
    relpath: str,
    out_dir: Path,
    uid_seed: str,
    description: str,
    *,
    ensure: dict[str, str],
    override: dict[str, str] | None = None,
) -> DemoStudy:
    """Copy one real sample with new UIDs, adding missing `ensure` attributes."""
    ds = dcmread(real_sample(relpath))
    notes = ["copied with new Study/Series/SOP Instance UIDs"]
    for keyword, value in ensure.items():
        if not ds.get(keyword):
            setattr(ds, keyword, value)
            notes.append(f"{keyword} {value} added (missing in the source)")
    for keyword, value in (override or {}).items():
        old = ds.get(keyword) or "(none)"
        setattr(ds, keyword, value)
        notes.append(f"{keyword} changed from {old} to {value}")
    study_uid = _renew_uids(ds, uid_seed, kind)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return DemoStudy(
        kind=kind,
        description=f"{description}; {'; '.join(notes)}",
        files=[path],
        study_instance_uid=study_uid,
    )


def _renew_uids(ds: Dataset, uid_seed: str, kind: str) -> str:
    study_uid = synthetic.derive_uid("demo", uid_seed, kind, "study")
    series_uid = synthetic.derive_uid("demo", uid_seed, kind, "series")
    sop_uid = synthetic.derive_uid("demo", uid_seed, kind, "instance", 0)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    if "FrameOfReferenceUID" in ds:
        ds.FrameOfReferenceUID = synthetic.derive_uid("demo", uid_seed, kind, "frame")
    return str(study_uid)
