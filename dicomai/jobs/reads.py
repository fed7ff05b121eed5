"""Every read query of the database, in one place: what the pipeline, the scheduler, `dicomai
status`, the CLI and the metrics ask of it.

Functions take a session factory (or an open session) and return plain rows or ORM objects
detached from their session; none of them writes. Writes (transitions, claims, results, the
instance index) live beside the state they change, in :mod:`dicomai.jobs.queue` and
:mod:`dicomai.ingest.index`.
"""

from __future__ import annotations

# -- pipeline reads (worker, sender, scheduler) -----------------------------------------------

# -- operator reads (status, CLI, metrics) ----------------------------------------------------
