"""Preprocessing (pure numpy), batching and postprocessing of a model run into Findings."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import numpy as np
import pydicom.pixels
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset

from dicomai.config import ModelSettings, PreprocessingSettings
from dicomai.errors import Interrupted, UnsupportedInput
from dicomai.inference.decode import align, decode_reduced
from dicomai.inference.findings import Findings, ModelIdentity, Task
from dicomai.ingest.pixel_guard import check_frame

__all__ = [
    "Predictor",
    "analyse",
    "ct_windows",
    "order_slices",
    "preprocess_ct_slice",
    "preprocess_xray",
    "preprocessor_for",
    "resize",
]

_CT_MAX_KEY_SLICES = 5
#: Radiographs are decoded at reduced resolution down to this many times the model input on the
#: short side: most of a full decode's time is saved, and the model input stays close to a full
#: decode's, where decoding right down to the input size would differ several times more (the
#: figures are in the README, "Compute per study"). Without a stored window the 1-99
#: percentile window comes from the less noisy reduced image.
_REDUCED_OVERSAMPLE = 2


class Predictor(Protocol):
    """The part of a model backend inference needs."""

    @property
    def identity(self) -> ModelIdentity: ...

    @property
    def labels(self) -> tuple[str, ...]: ...

    def predict(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...


def _check_greyscale(ds: Dataset) -> int:
    """Refuse what preprocessing cannot use; returns the frame to analyse (the middle one)."""
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise UnsupportedInput("instance has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedInput("only greyscale images are analysed")
    frame = int(ds.get("NumberOfFrames", 1) or 1) // 2
    check_frame(ds, frame)  # size limits and the codestream's own header, before decoding
    return frame


def _first_frame(ds: Dataset) -> np.ndarray:
    frame = _check_greyscale(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder errors come in many types
        raise UnsupportedInput("pixel data could not be decoded") from exc
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        arr = arr[frame]
    if arr.ndim != 2 or min(arr.shape) < 8:
        raise UnsupportedInput("image has an unsupported shape")
    return arr


def _frame_for_size(ds: Dataset, min_side: int) -> tuple[np.ndarray, float]:
    """The analysed frame's stored values, decoded at reduced resolution when the transfer
    syntax allows it (JPEG 2000, JPEG baseline) and both sides stay ≥ ``min_side``, else in
    full; with the sampling phase that :func:`dicomai.inference.decode.align` removes (0 in
    full)."""
    frame = _check_greyscale(ds)
    reduced = decode_reduced(ds, min_side, frame=frame)
    if reduced is None:
        return _first_frame(ds), 0.0
    return reduced.pixels, reduced.phase


def _halve(image: np.ndarray) -> np.ndarray:
    """Exactly what the antialiased bilinear resize does at a factor of 2 ([1, 3, 3, 1] / 8,
    renormalised at the edges), in numpy: much cheaper than torch's general path."""

    def along_last(a: np.ndarray) -> np.ndarray:
        even, odd = a[..., 0::2], a[..., 1::2]
        out = 3.0 * (even + odd)
        out[..., 1:] += odd[..., :-1]
        out[..., :-1] += even[..., 1:]
        out *= 1.0 / 8.0
        out[..., 0] *= 8.0 / 7.0
        out[..., -1] *= 8.0 / 7.0
        return out

    rows = along_last(image)
    return np.ascontiguousarray(np.swapaxes(along_last(np.swapaxes(rows, -1, -2)), -1, -2))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2D or channel-first 3D float image to ``size`` x ``size`` (antialiased)."""
    if image.shape[-2:] == (2 * size, 2 * size) and size >= 2:  # a 512² CT slice at 256²
        out = _halve(np.asarray(image, dtype=np.float32))
        return out[None] if out.ndim == 2 else out
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    if tensor.ndim == 2:
        tensor = tensor[None]
    resized = F.interpolate(
        tensor[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized[0].numpy()


def _normalise(channels: np.ndarray, pre: PreprocessingSettings) -> np.ndarray:
    mean = np.asarray(pre.normalize_mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.normalize_std, dtype=np.float32)[:, None, None]
    return ((channels - mean) / std).astype(np.float32)


def _rescale_float32(arr: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """A plain linear rescale of integer pixels, in float32 when that is exact enough and
    cannot overflow (cheaper than float64 on a large radiograph); None otherwise."""
    if arr.dtype.kind not in "ui" or "ModalityLUTSequence" in ds or arr.size == 0:
        return None
    slope, intercept = 1.0, 0.0
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:  # as pydicom: both, or neither
        try:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        except (TypeError, ValueError):
            return None  # empty or several values: pydicom decides
    bound = max(abs(int(arr.max())), abs(int(arr.min()))) * abs(slope) + abs(intercept)
    if not (math.isfinite(bound) and bound < 2.0**24):
        return None  # leave large ranges to float64 (float32 keeps integers exact to 2^24)
    out = arr.astype(np.float32)
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
    return out


def _modality(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT (rescale) in float64, refused unless every value is finite in float32."""
    fast = _rescale_float32(arr, ds)
    if fast is not None:
        return fast
    try:
        with np.errstate(all="ignore"):
            out = pydicom.pixels.apply_modality_lut(arr.astype(np.float64), ds)
            out = np.asarray(out, dtype=np.float64)
            finite = bool(np.isfinite(out).all()) and (
                out.size == 0 or float(np.abs(out).max()) < np.finfo(np.float32).max
            )
    except Exception as exc:
        raise UnsupportedInput("modality LUT could not be applied") from exc
    if not finite:
        raise UnsupportedInput("rescale gives non-finite values")
    return out.astype(np.float32)


def _display_range(arr: np.ndarray, ds: Dataset) -> tuple[float, float]:
    """The (low, high) modality values that map to black and white.

    The first window of WindowCenter/WindowWidth when present; else the 1st-99th percentile.
    (A VOI LUT sequence is applied by the caller before this.)
    """
    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = float(np.atleast_1d(ds.WindowCenter)[0])
            width = float(np.atleast_1d(ds.WindowWidth)[0])
            if math.isfinite(center) and math.isfinite(width) and width > 0:
                low, high = center - width / 2.0, center + width / 2.0
                if math.isfinite(low) and math.isfinite(high) and high > low:
                    return low, high
        except (TypeError, ValueError):
            pass
    if arr.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(arr, [1, 99])
    return float(low), float(high)


def preprocess_xray(ds: Dataset, pre: PreprocessingSettings) -> np.ndarray:
    """Radiograph → normalised [3, S, S] float32.

    Applies the modality LUT, the first VOI LUT or window (else a 1-99 percentile window),
    inverts MONOCHROME1, scales to [0, 1], resizes and normalises. JPEG 2000 and JPEG baseline
    images are decoded only at the resolution the input needs (:mod:`dicomai.inference.decode`).
    """
    stored, phase = _frame_for_size(ds, _REDUCED_OVERSAMPLE * pre.input_size)
    arr = _modality(stored, ds)
    grey: np.ndarray | None = None
    if "VOILUTSequence" in ds:
        try:
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            out = pydicom.pixels.apply_voi_lut(arr, ds, index=0).astype(np.float32)
            grey = np.clip(out / float(2**bits - 1), 0.0, 1.0)
        except Exception:
            grey = None  # a broken VOI LUT: fall back to the window / percentiles
    if grey is None:
        low, high = _display_range(arr, ds)
        grey = np.clip((arr - low) / max(high - low, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 1.0 - grey
    small = resize(align(grey, phase), pre.input_size)[0]
    return _normalise(np.repeat(small[None], 3, axis=0), pre)


def ct_windows(hu: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """HU slice → one [0, 1] channel per (center, width) window, shape [C, H, W]."""
    out = np.empty((len(windows), *hu.shape), dtype=np.float32)
    for i, (center, width) in enumerate(windows):
        low = center - width / 2.0
        out[i] = np.clip((hu - low) / max(width, 1e-6), 0.0, 1.0)
    return out


def preprocess_ct_slice(ds: Dataset, pre: PreprocessingSettings) -> np.ndarray:
    """CT slice → normalised [3, S, S] float32 of brain, subdural and bone windows."""
    hu = _modality(_first_frame(ds), ds)
    channels = ct_windows(hu, pre.windows)
    return _normalise(resize(channels, pre.input_size), pre)


def order_slices(datasets: Sequence[Dataset]) -> list[Dataset]:
    """Slices ordered along the slice normal (else by InstanceNumber)."""

    def key(ds: Dataset) -> tuple[float, float]:
        ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
        if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
            r, c = [float(v) for v in iop[:3]], [float(v) for v in iop[3:]]
            n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
            return (sum(float(p) * q for p, q in zip(ipp, n, strict=True)), 0.0)
        return (float(ds.get("InstanceNumber") or 0), 0.0)

    return sorted(datasets, key=key)


def preprocessor_for(task: Task) -> Callable[[Dataset, PreprocessingSettings], np.ndarray]:
    """The function that turns one instance into a model input for ``task`` (the worker's
    decode processes call the same one)."""
    return preprocess_ct_slice if task is Task.HEAD_CT_ICH else preprocess_xray


def _run_batches(
    predictor: Predictor,
    inputs: list[np.ndarray],
    batch_size: int,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    probs, cams = [], []
    for start in range(0, len(inputs), batch_size):
        if should_stop is not None and should_stop():
            raise Interrupted("stopping between batches")
        batch = np.stack(inputs[start : start + batch_size])
        p, c = predictor.predict(batch)
        probs.append(p)
        if c is not None:
            cams.append(c)
    all_cams = np.concatenate(cams) if len(cams) == len(probs) and cams else None
    return np.concatenate(probs), all_cams


def analyse(
    task: Task,
    datasets: Sequence[Dataset],
    predictor: Predictor,
    settings: ModelSettings,
    started: datetime,
    should_stop: Callable[[], bool] | None = None,
    preprocess: Callable[[Dataset, PreprocessingSettings], np.ndarray] | None = None,
) -> Findings:
    """Run a model over a study's selected instances and threshold the scores.

    Parameters
    ----------
    task
        Decides preprocessing and aggregation.
    datasets
        The selected series' instances, with pixel data.
    predictor
        A loaded model backend.
    settings
        The model's configuration (preprocessing, thresholds).
    started
        Inference start time (aware UTC).
    should_stop
        Checked between batches; when it returns True, :class:`Interrupted` is raised.
    preprocess
        Gives an instance's model input instead of :func:`preprocessor_for` ``(task)`` (the
        worker passes results computed in its decode processes); it must give the same
        array, and raise :class:`UnsupportedInput` where that would.

    Returns
    -------
    Findings
        Study-level scores (X-ray: max over images; CT: max or top-3 mean over slices),
        per-image scores, key images (most suspicious first) and heat maps of the top label.

    Raises
    ------
    UnsupportedInput
        No instance could be analysed.
    """
    if not datasets:
        raise UnsupportedInput("no instances to analyse")
    pre = settings.preprocessing
    ordered = order_slices(datasets) if task is Task.HEAD_CT_ICH else list(datasets)
    prep = preprocess or preprocessor_for(task)
    inputs, used = [], []
    for ds in ordered:
        try:
            inputs.append(prep(ds, pre))
            used.append(ds)
        except UnsupportedInput:
            if task is not Task.HEAD_CT_ICH:
                raise
    if not inputs:
        raise UnsupportedInput("no slice could be analysed")
    probs, cams = _run_batches(predictor, inputs, pre.batch_size, should_stop)
    labels = tuple(settings.labels) or predictor.labels
    if probs.shape[1] != len(labels):
        raise UnsupportedInput("model output does not match its labels")
    uids = [str(ds.SOPInstanceUID) for ds in used]
    if task is Task.HEAD_CT_ICH and settings.preprocessing.ct_aggregation == "top3_mean":
        top = np.sort(probs, axis=0)[-3:]
        study = top.mean(axis=0)
    else:
        study = probs.max(axis=0)
    study_scores = {lab: float(study[i]) for i, lab in enumerate(labels)}
    thresholds = {lab: settings.threshold_for(lab) for lab in labels}
    top_index = int(np.argmax(study / np.asarray([thresholds[lab] for lab in labels])))
    top_label = labels[top_index]
    order = np.argsort(-probs[:, top_index], kind="stable")
    n_key = _CT_MAX_KEY_SLICES if task is Task.HEAD_CT_ICH else 1
    key_idx = [int(i) for i in order[:n_key]]
    heatmaps = {} if cams is None else {uids[i]: cams[i, top_index] for i in key_idx}
    label_heatmaps: dict[str, dict[str, np.ndarray]] = {}
    if cams is not None:
        for j, label in enumerate(labels):
            if study_scores[label] >= thresholds[label]:
                hits = np.flatnonzero(probs[:, j] >= thresholds[label])
                label_heatmaps[label] = {uids[int(i)]: cams[int(i), j] for i in hits}
    return Findings(
        model=predictor.identity,
        labels=labels,
        thresholds=thresholds,
        study_scores=study_scores,
        image_scores={
            uid: {lab: float(probs[i, j]) for j, lab in enumerate(labels)}
            for i, uid in enumerate(uids)
        },
        key_image_uids=tuple(uids[i] for i in key_idx),
        started=started,
        heatmaps=heatmaps,
        top_label=top_label,
        label_heatmaps=label_heatmaps,
    )
