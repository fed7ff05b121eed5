"""Coded concepts of the result objects: label tables per task, with the status of each code.

Status (``ai-result-objects.md`` section 7):

- ``DICOM``: in the PS3.16 code tables shipped with pydicom 3.0.2 (``pydicom.sr._concepts_dict``).
- ``SCT-public``: SNOMED CT, in no DICOM CID; same code and meaning in two or more independent
  public sources, not checked in a SNOMED CT release. Confirm before clinical use.
- ``UNVERIFIED``: no code confirmed. Never emitted as SNOMED CT: the row carries a fallback,
  either ``1386000`` "Intracranial hemorrhage" plus a DICOM finding site that tells the subtype,
  or a code in our private scheme :data:`PRIVATE_SCHEME` (declared in every SR that uses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomai.inference.findings import Task

__all__ = [
    "ABNORMAL",
    "ABSENT",
    "BONE_XRAY",
    "CHEST_XRAY",
    "HEAD_CT_ICH",
    "ICH",
    "NORMAL",
    "NORMALITY",
    "PRESENT",
    "PRIVATE_SCHEME",
    "PROCEDURE_CT",
    "PROCEDURE_XR",
    "QUALITATIVE_EVALUATIONS",
    "UNVERIFIED_CANDIDATES",
    "CodeStatus",
    "LabelCode",
    "bone_site",
    "private_scheme_item",
    "table_for",
]


class CodeStatus(StrEnum):
    """How far a label's code has been checked."""

    DICOM = "DICOM"
    SCT_PUBLIC = "SCT-public"
    UNVERIFIED = "UNVERIFIED"


#: Private coding scheme for concepts without a confirmed standard code.
PRIVATE_SCHEME = "99DICOMAI"

PRESENT, ABSENT = codes.SCT.Present, codes.SCT.Absent  # CID 240
NORMALITY = codes.DCM.Normality  # (121402, DCM)
ABNORMAL, NORMAL = codes.SCT.Abnormal, codes.SCT.Normal  # CID 222
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")  # TID 1500 row 12
ICH = Code("1386000", "SCT", "Intracranial hemorrhage")
PROCEDURE_CT = codes.LN.CTUnspecifiedBodyRegion  # (25045-6, LN), CID 100
PROCEDURE_XR = codes.SCT.ImagingProcedure  # (363679005, SCT); see doc section 10 on 43468-8

#: SNOMED CT candidates we found but could not confirm. A unit test checks none is emitted.
UNVERIFIED_CANDIDATES = frozenset(
    {
        "35486000",  # subdural hemorrhage? (seen once, labelled "Subdural hematoma")
        "274110009",  # intraventricular hemorrhage? (one public code base only)
        "87433001",  # pulmonary emphysema? (not in pydicom's tables; not checked)
    }
)


class LabelCode(NamedTuple):
    """How one model label is coded.

    ``finding`` names the qualitative evaluation and the group's finding; ``values`` are its
    value at/above and below the threshold; ``status`` is the status of the label's concept
    (for UNVERIFIED rows, ``finding``/``site`` are the fallback that is emitted).
    """

    finding: Code
    site: Code
    status: CodeStatus
    title: str
    values: tuple[Code, Code] = (PRESENT, ABSENT)


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


_D, _S, _U = CodeStatus.DICOM, CodeStatus.SCT_PUBLIC, CodeStatus.UNVERIFIED

#: ChestX-ray14 labels. Codes from doc section 7, except infiltration and fibrosis (pydicom's
#: DICOM tables) and emphysema, pleural thickening and hernia (none found: private scheme).
CHEST_XRAY: Mapping[str, LabelCode] = MappingProxyType(
    {
        "atelectasis": LabelCode(
            Code("46621007", "SCT", "Atelectasis"), codes.SCT.Lung, _S, "Atelectasis"
        ),
        # 287272002 is DICOM (CID 12248/12249); public CXR label maps use 8186001: confirm.
        "cardiomegaly": LabelCode(codes.SCT.Cardiomegaly, codes.SCT.Heart, _D, "Cardiomegaly"),
        "effusion": LabelCode(codes.SCT.PleuralEffusion, codes.SCT.Pleura, _D, "Effusion"),
        "infiltration": LabelCode(codes.DCM.Infiltrate, codes.SCT.Lung, _D, "Infiltration"),
        "mass": LabelCode(codes.SCT.Mass, codes.SCT.Lung, _D, "Mass"),
        "nodule": LabelCode(codes.SCT.Nodule, codes.SCT.Lung, _D, "Nodule"),
        "pneumonia": LabelCode(
            Code("233604007", "SCT", "Pneumonia"), codes.SCT.Lung, _S, "Pneumonia"
        ),
        "pneumothorax": LabelCode(codes.SCT.Pneumothorax, codes.SCT.Pleura, _D, "Pneumothorax"),
        "consolidation": LabelCode(
            Code("95436008", "SCT", "Lung consolidation"), codes.SCT.Lung, _S, "Consolidation"
        ),
        "edema": LabelCode(codes.SCT.PulmonaryEdema, codes.SCT.Lung, _D, "Edema"),
        # Only "Mediastinal emphysema" (16838000) is in pydicom's tables: a different concept.
        "emphysema": LabelCode(
            _private("CXR-EMPHYSEMA", "Emphysema"), codes.SCT.Lung, _U, "Emphysema"
        ),
        "fibrosis": LabelCode(codes.SCT.Fibrosis, codes.SCT.Lung, _D, "Fibrosis"),
        "pleural_thickening": LabelCode(
            _private("CXR-PLEURALTHICK", "Pleural thickening"),
            codes.SCT.Pleura,
            _U,
            "Pleural thickening",
        ),
        # ChestX-ray14 "Hernia" is mostly hiatal hernia, but the label does not say so.
        "hernia": LabelCode(_private("CXR-HERNIA", "Hernia"), codes.SCT.Chest, _U, "Hernia"),
    }
)

#: RSNA-style ICH labels (doc sections 6.2 and 7).
HEAD_CT_ICH: Mapping[str, LabelCode] = MappingProxyType(
    {
        "any": LabelCode(ICH, codes.SCT.Brain, _D, "Intracranial hemorrhage"),
        # Fallback: a private code, finding site Dura mater (18545000, DICOM CID 7151).
        "epidural": LabelCode(
            _private("ICH-EPIDURAL", "Epidural hemorrhage"),
            codes.SCT.DuraMater,
            _U,
            "Epidural hemorrhage",
        ),
        "intraparenchymal": LabelCode(
            Code("274100004", "SCT", "Cerebral hemorrhage"),
            codes.SCT.Brain,
            _S,
            "Intraparenchymal hemorrhage",
        ),
        # Fallback: a private code (not 1386000, which "any" uses: two rows of one study would
        # then read "Intracranial hemorrhage" twice), finding site Brain ventricle (35764002,
        # DICOM CID 7151), which covers the 3rd and 4th ventricles too.
        "intraventricular": LabelCode(
            _private("ICH-INTRAVENT", "Intraventricular hemorrhage"),
            codes.SCT.BrainVentricle,
            _U,
            "Intraventricular hemorrhage",
        ),
        "subarachnoid": LabelCode(
            Code("21454007", "SCT", "Subarachnoid hemorrhage"),
            codes.SCT.Brain,
            _S,
            "Subarachnoid hemorrhage",
        ),
        "subdural": LabelCode(
            _private("ICH-SUBDURAL", "Subdural hemorrhage"),
            codes.SCT.DuraMater,
            _U,
            "Subdural hemorrhage",
        ),
    }
)

#: Abnormal-vs-normal extremity classifier: Normality (121402, DCM) = Abnormal / Normal (CID
#: 222). The site here is the fallback; :func:`bone_site` refines it from BodyPartExamined.
BONE_XRAY: Mapping[str, LabelCode] = MappingProxyType(
    {"abnormal": LabelCode(NORMALITY, codes.SCT.Bone, _D, "Bone radiograph", (ABNORMAL, NORMAL))}
)

_TABLES: Mapping[Task, Mapping[str, LabelCode]] = MappingProxyType(
    {Task.CHEST_XRAY: CHEST_XRAY, Task.HEAD_CT_ICH: HEAD_CT_ICH, Task.BONE_XRAY: BONE_XRAY}
)

# BodyPartExamined (PS3.16 Annex L defined terms and common variants), spaces removed.
_UPPER_LIMB = frozenset(
    {
        "ARM", "UPPERARM", "HUMERUS", "ELBOW", "FOREARM", "RADIUS", "ULNA", "WRIST", "HAND",
        "FINGER", "THUMB", "UPPERLIMB", "UPPEREXTREMITY", "UPREXTREMITY", "UPREXTREM",
    }
)  # fmt: skip
_LOWER_LIMB = frozenset(
    {
        "LEG", "LOWERLEG", "THIGH", "FEMUR", "KNEE", "PATELLA", "TIBIA", "FIBULA", "ANKLE",
        "FOOT", "HEEL", "CALCANEUS", "TOE", "LOWERLIMB", "LOWEREXTREMITY", "LWREXTREMITY",
        "LOWEXTREMITY",
    }
)  # fmt: skip


def table_for(task: Task | str) -> Mapping[str, LabelCode]:
    """Label table of a task.

    Parameters
    ----------
    task
        A :class:`~dicomai.inference.findings.Task` or its value.

    Returns
    -------
    Mapping[str, LabelCode]
        Label to code row.
    """
    return _TABLES[Task(task)]


def bone_site(body_part: str | None) -> Code:
    """Finding site for a bone radiograph: bone of upper or lower limb where clear, else Bone.

    Shoulder, hip, pelvis and a bare "EXTREMITY" are not clear and give Bone (272673000).
    """
    key = "".join((body_part or "").upper().split()).replace("_", "")
    if key in _UPPER_LIMB:
        return codes.SCT.BoneOfUpperLimb
    if key in _LOWER_LIMB:
        return codes.SCT.BoneOfLowerLimb
    return codes.SCT.Bone


def private_scheme_item() -> CodingSchemeIdentificationItem:
    """Coding Scheme Identification item that declares :data:`PRIVATE_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="dicomai private codes for findings without a confirmed standard code",
        version="1",
        responsible_organization="dicomai",
    )
