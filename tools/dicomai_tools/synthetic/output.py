"""How generated datasets leave the generator: encoded in a transfer syntax, written as files."""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSNearLossless,
)

from dicomai_tools.synthetic.common import is_valid_uid

_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_WRITABLE_NATIVE = _UNCOMPRESSED | {DeflatedExplicitVRLittleEndian}


def encode_as(datasets: list[Dataset], transfer_syntax: str) -> list[Dataset]:
    """Put every dataset into `transfer_syntax`, compressing where needed."""
    ts = UID(transfer_syntax)
    if ts in _WRITABLE_NATIVE:
        for ds in datasets:
            ds.file_meta.TransferSyntaxUID = ts
        return datasets
    if not ts.is_compressed:
        raise ValueError('Argument "transfer_syntax" must be little endian or a compressed syntax.')
    return [compress_in_place(ds, ts, {}) for ds in datasets]


def compress_in_place(ds: Dataset, ts: UID, kwargs: dict[str, Any]) -> Dataset:
    options = dict(kwargs)
    if ts == JPEG2000 and "j2k_cr" not in options and "j2k_psnr" not in options:
        options["j2k_cr"] = [10.0]
    if ts == JPEGLSNearLossless and "jls_error" not in options:
        options["jls_error"] = 2
    ds.compress(ts, generate_instance_uid=False, **options)
    return ds


def write_study(datasets: Iterable[Dataset], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write each dataset as ``<out_dir>/<SOPInstanceUID>.dcm`` in DICOM file format.

    Parameters
    ----------
    datasets
        Datasets with file meta, such as those from `make_head_ct`.
    out_dir
        Folder to write into; created if missing. Existing files of the same name are replaced.

    Returns
    -------
    list of Path
        The written files, in input order.

    Raises
    ------
    ValueError
        If a SOP Instance UID is not a valid UID (it becomes a file name).
    """
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in datasets:
        sop_uid = str(ds.SOPInstanceUID)
        if not is_valid_uid(sop_uid):
            raise ValueError('Argument "datasets" holds an invalid SOP Instance UID.')
        path = folder / f"{sop_uid}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def recompress(ds: Dataset, transfer_syntax: str, **kwargs: Any) -> Dataset:
    """Return a copy of `ds` encoded in `transfer_syntax`, keeping its SOP Instance UID.

    Works with native (uncompressed) pixel data. Encoders present in this environment: RLE
    Lossless (pydicom), JPEG-LS lossless and near-lossless (pyjpegls), JPEG 2000 lossless and
    lossy (pylibjpeg-openjpeg). JPEG baseline/lossless have no encoder. Lossy JPEG 2000
    defaults to ``j2k_cr=[10]`` and near-lossless JPEG-LS to ``jls_error=2``; lossy results get
    ``LossyImageCompression = "01"``.

    Parameters
    ----------
    ds
        A dataset with native pixel data; not modified.
    transfer_syntax
        The target transfer syntax UID; a native little-endian syntax just relabels the copy.
    **kwargs
        Passed to `pydicom.dataset.Dataset.compress` (for example ``j2k_cr`` or ``jls_error``).

    Returns
    -------
    Dataset
        The re-encoded copy.

    Raises
    ------
    ValueError
        If `ds` is already compressed or the syntax is not supported.
    RuntimeError
        If no encoder plugin for the syntax is installed (raised by pydicom).
    """
    if UID(ds.file_meta.TransferSyntaxUID).is_compressed:
        raise ValueError('Argument "ds" must have native (uncompressed) pixel data.')
    ts = UID(transfer_syntax)
    out = copy.deepcopy(ds)
    if ts in _WRITABLE_NATIVE:
        out.file_meta.TransferSyntaxUID = ts
        return out
    if not ts.is_compressed:
        raise ValueError('Argument "transfer_syntax" must be little endian or compressed.')
    out = compress_in_place(out, ts, kwargs)
    if ts in {JPEG2000, JPEGLSNearLossless}:
        out.LossyImageCompression = "01"
    return out
