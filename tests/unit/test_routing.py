"""Tests of dicomai.routing with the routes of the shipped configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomai.config import RouteSettings, load_settings
from dicomai.routing import RouteDecision, SeriesInfo, StudyInfo, select_route, summarise_series

REPO = Path(__file__).resolve().parents[2]
ROUTES = load_settings(REPO / "config" / "dicomai.toml", environ={}).routes

AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\1.0000\\0.0000"
SAGITTAL = "0.0000\\1.0000\\0.0000\\0.0000\\0.0000\\-1.0000"
CORONAL = "1.0000\\0.0000\\0.0000\\0.0000\\0.0000\\-1.0000"
TILTED_AXIAL = "1.0000\\0.0000\\0.0000\\0.0000\\0.9962\\-0.0872"  # 5 degree gantry tilt


def series(
    uid: str,
    modality: str = "DX",
    body_part: str = "CHEST",
    count: int = 1,
    **kwargs: object,
) -> SeriesInfo:
    return SeriesInfo(
        series_instance_uid=uid,
        modality=modality,
        body_part=body_part,
        instance_count=count,
        **kwargs,  # type: ignore[arg-type]
    )


def study(*items: SeriesInfo) -> StudyInfo:
    return StudyInfo(study_instance_uid="1.2.3", series=tuple(items))


def route(name: str, **kwargs: object) -> RouteSettings:
    values: dict[str, object] = {"name": name, "model": name, "modality": ["DX", "CR"]}
    values.update(kwargs)
    return RouteSettings.model_validate(values)


# -- shipped routes ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_chest_radiograph_goes_to_chest_route(modality: str) -> None:
    decision = select_route(
        study(series("1.1", modality, "CHEST", view_positions=frozenset({"PA"}))), ROUTES
    )
    assert decision == RouteDecision(
        route="chest-xray",
        model="chest-xray",
        destinations=("pacs",),
        series_instance_uids=("1.1",),
    )


def test_head_ct_picks_axial_series_with_most_slices() -> None:
    decision = select_route(
        study(
            series("1.1", "CT", "HEAD", 1, series_number=1, orientation=SAGITTAL,
                   image_types=frozenset({"ORIGINAL", "PRIMARY", "LOCALIZER"})),
            series("1.2", "CT", "HEAD", 32, series_number=2, orientation=AXIAL,
                   image_types=frozenset({"ORIGINAL", "PRIMARY", "AXIAL"})),
            series("1.3", "CT", "HEAD", 24, series_number=3, orientation=TILTED_AXIAL),
            series("1.4", "CT", "HEAD", 120, series_number=4, orientation=SAGITTAL,
                   series_description="SAG MPR",
                   image_types=frozenset({"DERIVED", "SECONDARY", "REFORMATTED"})),
            series("1.5", "CT", "HEAD", 90, series_number=5, orientation=CORONAL),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.route == "brain-ct"
    assert decision.model == "head-ct-ich"
    assert decision.series_instance_uids == ("1.2",)


def test_head_ct_skips_localizer_even_when_it_has_most_images() -> None:
    decision = select_route(
        study(
            series("1.1", "CT", "HEAD", 500, series_number=1, orientation=AXIAL,
                   series_description="Topogram 0.6 T20s"),
            series("1.2", "CT", "HEAD", 30, series_number=2, orientation=AXIAL),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.2",)


def test_head_ct_tie_prefers_lower_series_number() -> None:
    decision = select_route(
        study(
            series("1.9", "CT", "BRAIN", 30, series_number=7, orientation=AXIAL),
            series("1.8", "CT", "BRAIN", 30, series_number=3, orientation=AXIAL),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.8",)


def test_head_ct_with_only_localizer_and_reformat_is_skipped() -> None:
    decision = select_route(
        study(
            series("1.1", "CT", "HEAD", 1, image_types=frozenset({"LOCALIZER"})),
            series("1.2", "CT", "HEAD", 100, orientation=SAGITTAL),
        ),
        ROUTES,
    )
    assert decision is None


@pytest.mark.parametrize("lateral", ["LAT", "LL", "RL"])
def test_xray_prefers_frontal_view_over_lateral(lateral: str) -> None:
    # The lateral is the latest acquisition, but any frontal view wins over it; among the
    # frontal views the latest (highest SeriesNumber) is chosen.
    decision = select_route(
        study(
            series("1.1", "DX", "CHEST", series_number=1, view_positions=frozenset({"PA"})),
            series("1.2", "DX", "CHEST", series_number=2, view_positions=frozenset({"AP"})),
            series("1.3", "DX", "CHEST", series_number=3, view_positions=frozenset({lateral})),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.2",)


def test_xray_series_with_a_lateral_image_is_not_frontal() -> None:
    decision = select_route(
        study(
            series("1.1", "CR", "CHEST", 2, series_number=5,
                   view_positions=frozenset({"PA", "LL"})),
            series("1.2", "CR", "CHEST", 1, series_number=4, view_positions=frozenset({"PA"})),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.2",)


def test_xray_localizer_is_not_chosen() -> None:
    decision = select_route(
        study(
            series("1.1", "DX", "HAND", series_number=9, image_types=frozenset({"LOCALIZER"})),
            series("1.2", "DX", "HAND", series_number=1, view_positions=frozenset({"PA"})),
        ),
        ROUTES,
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.2",)


def test_xray_lateral_only_is_still_analysed() -> None:
    decision = select_route(
        study(series("1.1", "CR", "CHEST", view_positions=frozenset({"LAT"}))), ROUTES
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.1",)


@pytest.mark.parametrize(
    "body_part", ["HAND", "WRIST", "FINGER", "ELBOW", "SHOULDER", "KNEE", "ANKLE", "FOOT", "HIP"]
)
def test_bone_body_parts_go_to_bone_route(body_part: str) -> None:
    decision = select_route(study(series("1.1", "DX", body_part)), ROUTES)
    assert decision is not None
    assert (decision.route, decision.model) == ("bone-xray", "bone-xray")
    assert decision.destinations == ("pacs",)


@pytest.mark.parametrize(
    ("modality", "body_part"),
    [("MR", "KNEE"), ("CT", ""), ("DX", ""), ("CT", "CHEST"), ("US", "HEAD"), ("DX", "ABDOMEN")],
)
def test_unroutable_studies(modality: str, body_part: str) -> None:
    assert select_route(study(series("1.1", modality, body_part, 20)), ROUTES) is None


def test_study_matching_two_routes_goes_to_the_first() -> None:
    # A chest and a hand radiograph in one study: chest-xray comes first in the config.
    decision = select_route(
        study(series("1.1", "DX", "HAND"), series("1.2", "DX", "CHEST")), ROUTES
    )
    assert decision is not None
    assert decision.route == "chest-xray"
    assert decision.series_instance_uids == ("1.2",)


def test_first_matching_route_wins_in_configuration_order() -> None:
    specific = route("specific", body_part=["CHEST"])
    general = route("general")
    one = study(series("1.1", "DX", "CHEST"))
    assert select_route(one, [specific, general]).route == "specific"  # type: ignore[union-attr]
    assert select_route(one, [general, specific]).route == "general"  # type: ignore[union-attr]


def test_route_without_body_part_matches_any_body_part() -> None:
    general = route("general", series_rule="all")
    decision = select_route(
        study(series("1.1", "DX", ""), series("1.2", "CR", "PELVIS"), series("1.3", "MR", "")),
        [general],
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.1", "1.2")


# -- description filters ----------------------------------------------------------------------


def test_study_description_regex_filters_case_insensitively() -> None:
    stroke = route("stroke", modality=["CT"], study_description=[r"\bstroke\b", "^CODE"])
    hit = study(series("1.1", "CT", "HEAD", 10, study_description="CT Head STROKE protocol"))
    code = study(series("1.1", "CT", "HEAD", 10, study_description="code brain"))
    miss = study(series("1.1", "CT", "HEAD", 10, study_description="CT HEAD ROUTINE"))
    assert select_route(hit, [stroke]) is not None
    assert select_route(code, [stroke]) is not None
    assert select_route(miss, [stroke]) is None


def test_series_description_regex_selects_series() -> None:
    thin = route("thin", modality=["CT"], series_description=["0[.,]6 ?mm"])
    decision = select_route(
        study(
            series("1.1", "CT", "HEAD", 40, series_description="Head 5mm"),
            series("1.2", "CT", "HEAD", 300, series_description="Head 0.6mm"),
            series("1.3", "CT", "HEAD", 300, series_description="Head 0,6 MM bone"),
        ),
        [thin],
    )
    assert decision is not None
    assert decision.series_instance_uids == ("1.2", "1.3")


# -- summarise_series -------------------------------------------------------------------------


def row(series_uid: str, **kwargs: object) -> dict[str, object]:
    base: dict[str, object] = {
        "series_instance_uid": series_uid,
        "modality": "ct",
        "body_part": "head",
        "series_number": 2,
        "image_type": "ORIGINAL\\PRIMARY\\AXIAL",
        "view_position": "",
        "study_description": "CT HEAD",
        "series_description": "HEAD WO",
        "orientation": AXIAL,
    }
    base.update(kwargs)
    return base


def test_summarise_series_groups_rows_by_series() -> None:
    rows = [
        row("1.1", series_number=1, image_type="ORIGINAL\\PRIMARY\\LOCALIZER",
            orientation=SAGITTAL, series_description="SCOUT"),
        *[row("1.2") for _ in range(5)],
        row("1.3", modality="dx", body_part="chest", view_position="PA", image_type=None,
            orientation=None, series_number=None),
        row("1.3", modality="dx", body_part="chest", view_position="LL", image_type=None,
            orientation=None, series_number=None),
    ]
    out = {s.series_instance_uid: s for s in summarise_series(rows)}
    assert list(out) == ["1.1", "1.2", "1.3"]

    scout, axial, xray = out["1.1"], out["1.2"], out["1.3"]
    assert scout.instance_count == 1
    assert scout.is_localizer
    assert not scout.is_axial
    assert scout.image_types == frozenset({"ORIGINAL", "PRIMARY", "LOCALIZER"})

    assert axial.instance_count == 5
    assert axial.modality == "CT"
    assert axial.body_part == "HEAD"
    assert axial.series_number == 2
    assert axial.is_axial
    assert not axial.is_localizer
    assert axial.study_description == "CT HEAD"

    assert xray.instance_count == 2
    assert xray.view_positions == frozenset({"PA", "LL"})
    assert not xray.is_frontal
    assert xray.image_types == frozenset()
    assert xray.orientation == ""
    assert xray.series_number is None


def test_summarised_rows_route_like_series() -> None:
    rows = [row("1.1", image_type="ORIGINAL\\PRIMARY\\LOCALIZER")] + [
        row("1.2") for _ in range(20)
    ] + [row("1.3", orientation=CORONAL) for _ in range(40)]
    decision = select_route(StudyInfo("1.2.3", tuple(summarise_series(rows))), ROUTES)
    assert decision is not None
    assert decision.route == "brain-ct"
    assert decision.series_instance_uids == ("1.2",)


def test_summarise_series_of_nothing() -> None:
    assert summarise_series([]) == []
    assert select_route(study(), ROUTES) is None
