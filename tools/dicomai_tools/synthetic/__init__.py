"""Deterministic synthetic DICOM studies (head CT, radiographs, MR) for tests and demos.

One module per subject: `common` (identifiers, UIDs, the modules every instance shares),
`drawing` (phantoms), `head_ct`, `radiograph`, `mr`, and `output` (transfer syntaxes, files).
UIDs, dates and pixels derive from the seed, so the same arguments give the same bytes.
"""

from dicomai_tools.synthetic.common import PatientInfo, derive_uid
from dicomai_tools.synthetic.head_ct import CT_RESCALE_INTERCEPT, make_head_ct
from dicomai_tools.synthetic.mr import make_mr
from dicomai_tools.synthetic.output import recompress, write_study
from dicomai_tools.synthetic.radiograph import XRAY_KINDS, make_xray

__all__ = [
    "CT_RESCALE_INTERCEPT",
    "XRAY_KINDS",
    "PatientInfo",
    "derive_uid",
    "make_head_ct",
    "make_mr",
    "make_xray",
    "recompress",
    "write_study",
]
