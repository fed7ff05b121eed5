"""How a job row reads to an operator, the same in `dicomai status` and `dicomai studies`:
its latency and its one-line findings-or-error note."""

from __future__ import annotations

from typing import Any

from dicomai.jobs.states import JobState
from dicomai.timefmt import aware

__all__ = ["latency_seconds", "study_note"]


def latency_seconds(job: Any) -> float | None:
    """Seconds from a DONE job's last received instance to its finish (the delivery latency
    operators watch), rounded to the millisecond; None for any other job."""
    if job.state == JobState.DONE and job.finished_at and job.last_instance_at:
        return round((aware(job.finished_at) - aware(job.last_instance_at)).total_seconds(), 3)
    return None


def study_note(study: dict[str, Any]) -> str:
    """The positive findings ("none" for a done study without any); for a study not done,
    its last error and, when set, when it is tried next (``next_attempt_at``)."""
    done = study["state"] == JobState.DONE
    note = ", ".join(study["positive_findings"]) or ("none" if done else "")
    if study["last_error"] and not done:
        note = f"{note} {study['last_error']}".strip()
        if study.get("next_attempt_at"):
            note += f" (next attempt {study['next_attempt_at']})"
    return note
