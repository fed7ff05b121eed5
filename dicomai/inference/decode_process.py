"""What runs inside a decode process (:mod:`dicomai.inference.prepare` starts and feeds them):
its set-up, its memory limit, and the loop answering requests for a model input or a key
image's picture, with a failed allocation told apart from a file that cannot be decoded."""

from __future__ import annotations

import os
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import pydicom

from dicomai.config import PreprocessingSettings
from dicomai.errors import UnsupportedInput
from dicomai.inference.findings import Task

__all__ = ["Prepared", "prepare_file", "serve"]

#: ``("ok", input)`` or ``("unsupported", message)``.
Prepared = tuple[str, np.ndarray | str]


def _init_process() -> None:
    """Per process: one torch thread (the pool is the parallelism), no inherited signals,
    the preprocessing imported now rather than on the first image."""
    import signal

    import torch

    # Imported now, not on the first image: preprocessing (torch, pydicom's decoders) and
    # the key images' pictures (highdicom, Pillow).
    import dicomai.inference.processing
    import dicomai.results.sc  # noqa: F401

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the pool
    torch.set_num_threads(1)


def _data_segment_bytes() -> int | None:
    """This process's data segment (``VmData``: heap and private writable mappings), or
    None where ``/proc`` does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmData:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _limit_memory(memory_mb: int | None) -> None:
    """Limit this process's data segment to its current size plus ``memory_mb``."""
    if not memory_mb:
        return
    import resource

    base = _data_segment_bytes()
    if base is None:
        return
    limit = base + memory_mb * 1024 * 1024
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))


def prepare_file(path: str, task: str, pre: PreprocessingSettings) -> Prepared:
    """Read ``path`` and return its model input for ``task`` (run in a decode process).

    Returns
    -------
    tuple
        ``("ok", float32 array [C, S, S])``, or ``("unsupported", message)`` where the
        in-thread preprocessing raises :class:`UnsupportedInput`. Other errors (a missing or
        unreadable file) are raised.
    """
    try:
        return "ok", _prepare(path, task, pre)
    except UnsupportedInput as exc:
        return "unsupported", str(exc)


def _prepare(path: str, task: str, pre: PreprocessingSettings) -> np.ndarray:
    from dicomai.inference.processing import preprocessor_for

    return preprocessor_for(Task(task))(pydicom.dcmread(path), pre)


def _out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was caused by, a failed allocation."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, MemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _render(path: str, frame: int) -> np.ndarray:
    from dicomai.results.sc import render_key_image

    return render_key_image(pydicom.dcmread(path), frame)


#: What a decode process does, by request kind.
_WORK: dict[str, Callable[..., np.ndarray]] = {"prepare": _prepare, "render": _render}


def serve(conn: Connection, memory_mb: int | None) -> None:
    """A decode process: answer ``(kind, *arguments)`` requests (:data:`_WORK`: a model
    input, a key image's picture) until ``None`` or EOF.

    Answers are ``("ok", array)``, ``("unsupported", message)``, ``("memory", None)`` (an
    allocation failed under the memory limit) or ``("error", type name)``.
    """
    _init_process()
    _limit_memory(memory_mb)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        answer: tuple[str, Any]
        try:
            answer = ("ok", _WORK[request[0]](*request[1:]))
        except Exception as exc:  # reported to the parent, which fails the image's job
            # Preprocessing wraps decoder errors in UnsupportedInput: a failed allocation
            # underneath is the memory limit, not the input.
            if _out_of_memory(exc):
                answer = ("memory", None)
            elif isinstance(exc, UnsupportedInput):
                answer = ("unsupported", str(exc))
            else:
                answer = ("error", type(exc).__name__)
        try:
            conn.send(answer)
        except MemoryError:
            conn.send(("memory", None))
        del answer
