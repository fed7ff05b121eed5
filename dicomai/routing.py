"""Pure routing: a study's series and the routes in; the route and the series to analyse out."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

from dicomai.config import RouteSettings

__all__ = ["RouteDecision", "SeriesInfo", "StudyInfo", "select_route", "summarise_series"]

_FRONTAL = {"PA", "AP", "AP_SUPINE", "PA_ERECT", ""}
_LOCALIZER_WORDS = ("LOCALIZER", "SCOUT", "TOPOGRAM", "SCANOGRAM", "SURVIEW")
_AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True, slots=True)
class SeriesInfo:
    """What routing needs to know about one series."""

    series_instance_uid: str
    modality: str
    body_part: str
    instance_count: int
    series_number: int | None = None
    study_description: str = ""
    series_description: str = ""
    image_types: frozenset[str] = frozenset()
    view_positions: frozenset[str] = frozenset()
    orientation: str = ""

    @property
    def is_localizer(self) -> bool:
        """Scout/localizer images (by ImageType or description)."""
        text = " ".join([*self.image_types, self.series_description.upper()])
        return any(word in text for word in _LOCALIZER_WORDS)

    @property
    def is_axial(self) -> bool:
        """Orientation within ~10 degrees of axial, or unknown."""
        if not self.orientation:
            return True
        try:
            values = [float(v) for v in self.orientation.split("\\")]
        except ValueError:
            return True
        if len(values) != 6:
            return True
        row, col = values[:3], values[3:]
        normal_z = abs(row[0] * col[1] - row[1] * col[0])
        return normal_z > 0.98

    @property
    def is_frontal(self) -> bool:
        """Every view position is frontal (PA/AP) or absent."""
        return all(v in _FRONTAL for v in self.view_positions) if self.view_positions else True


@dataclass(frozen=True, slots=True)
class StudyInfo:
    """A study's series, as routing sees it."""

    study_instance_uid: str
    series: tuple[SeriesInfo, ...]


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """The route that matched and the series chosen for analysis."""

    route: str
    model: str
    destinations: tuple[str, ...]
    series_instance_uids: tuple[str, ...]
    priority: int = 0


def summarise_series(rows: Iterable[dict[str, object]]) -> list[SeriesInfo]:
    """Group per-instance header fields (dicts with the Instance columns) into SeriesInfo."""
    groups: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault(str(row["series_instance_uid"]), []).append(row)
    out = []
    for uid, items in groups.items():
        first = items[0]
        image_types = frozenset(
            part for it in items for part in str(it.get("image_type") or "").split("\\") if part
        )
        views = frozenset(str(it.get("view_position") or "") for it in items) - {""}
        orientation = str(first.get("orientation") or "")
        out.append(
            SeriesInfo(
                series_instance_uid=uid,
                modality=str(first.get("modality") or "").upper(),
                body_part=str(first.get("body_part") or "").upper(),
                instance_count=len(items),
                series_number=cast("int | None", first.get("series_number")),
                study_description=str(first.get("study_description") or ""),
                series_description=str(first.get("series_description") or ""),
                image_types=image_types,
                view_positions=views,
                orientation=orientation,
            )
        )
    return out


def _matches(series: SeriesInfo, route: RouteSettings) -> bool:
    if series.modality not in route.modality:
        return False
    if route.body_part and series.body_part not in route.body_part:
        return False
    if route.study_description and not any(
        re.search(p, series.study_description, re.IGNORECASE) for p in route.study_description
    ):
        return False
    if route.series_description and not any(
        re.search(p, series.series_description, re.IGNORECASE) for p in route.series_description
    ):
        return False
    return True


def _choose(candidates: Sequence[SeriesInfo], rule: str) -> tuple[str, ...]:
    if rule == "ct_axial_most_slices":
        usable = [s for s in candidates if not s.is_localizer and s.is_axial]
        if not usable:
            return ()
        best = max(usable, key=lambda s: (s.instance_count, -(s.series_number or 0)))
        return (best.series_instance_uid,)
    if rule == "xray_frontal":
        usable = [s for s in candidates if not s.is_localizer] or list(candidates)
        # Frontal views first; among those the latest acquisition (highest SeriesNumber).
        best = sorted(
            usable,
            key=lambda s: (not s.is_frontal, -(s.series_number or 0), s.series_instance_uid),
        )[0]
        return (best.series_instance_uid,)
    return tuple(s.series_instance_uid for s in candidates)


def select_route(study: StudyInfo, routes: Sequence[RouteSettings]) -> RouteDecision | None:
    """The first route with a matching, usable series, or ``None`` (the study is skipped).

    Parameters
    ----------
    study
        The study's series.
    routes
        Routes in configuration order.

    Returns
    -------
    RouteDecision | None
        Route name, model, destinations and the series to analyse.
    """
    for route in routes:
        candidates = [s for s in study.series if _matches(s, route)]
        if not candidates:
            continue
        chosen = _choose(candidates, route.series_rule)
        if chosen:
            return RouteDecision(
                route=route.name,
                model=route.model,
                destinations=tuple(route.destinations),
                series_instance_uids=chosen,
                priority=route.priority,
            )
    return None
