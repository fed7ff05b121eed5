"""dicomai.ingest.pynetdicom_seam: one pinned pynetdicom, every assumption checked.

These tests fail when pynetdicom is upgraded (or its internals change) without the seam
being adapted: the receiver refuses to start then, rather than running on changed internals.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pynetdicom
import pytest
from pynetdicom.dul import DULServiceProvider

from dicomai.ingest import pynetdicom_seam as seam

ROOT = Path(__file__).resolve().parents[2]


def test_installed_pynetdicom_is_the_pinned_one_and_every_assumption_holds():
    assert pynetdicom.__version__ == seam.PINNED_VERSION
    seam.check()  # raises SeamError otherwise


def test_pyproject_pins_exactly_the_seams_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] if re.match(r"pynetdicom\b", d)]
    assert pins == [f"pynetdicom=={seam.PINNED_VERSION}"]


def test_another_version_is_refused(monkeypatch):
    monkeypatch.setattr(pynetdicom, "__version__", "3.0.5")
    with pytest.raises(seam.SeamError, match=r"3\.0\.5 installed, 3\.0\.4 expected"):
        seam.check()


def test_a_changed_reactor_is_refused(monkeypatch):
    """The DUL reactor no longer reading through _is_transport_event: refused, not ignored."""

    def run_reactor(self):  # a reactor that reads some other way
        while not self._kill_thread:
            self._read_somehow()

    monkeypatch.setattr(DULServiceProvider, "run_reactor", run_reactor)
    with pytest.raises(seam.SeamError, match="_is_transport_event"):
        seam.check()


def test_a_missing_private_attribute_is_refused(monkeypatch):
    from pynetdicom.association import Association

    original = Association.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        del self._accepted_cx

    monkeypatch.setattr(Association, "__init__", init)
    with pytest.raises(seam.SeamError, match="_accepted_cx"):
        seam.check()


def _private_pynetdicom_uses(path: Path) -> list[str]:
    """Attribute names starting with one underscore used on anything in ``path``, and
    imports of pynetdicom's private modules."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "pynetdicom"):
            if any(part.startswith("_") for part in node.module.split(".")) or any(
                    a.name.startswith("_") for a in node.names):
                found.append(f"import {node.module}:{[a.name for a in node.names]}")
    return found


def test_no_module_but_the_seam_imports_pynetdicoms_private_names():
    offenders = {}
    for path in (ROOT / "dicomai").rglob("*.py"):
        if path.name == "pynetdicom_seam.py":
            continue
        uses = _private_pynetdicom_uses(path)
        if uses:
            offenders[str(path.relative_to(ROOT))] = uses
    assert offenders == {}


def test_the_seams_private_attributes_are_used_nowhere_else():
    """Private attribute names the seam wraps appear in no other module of the package."""
    names = {"_is_transport_event", "_run_loop_delay", "_decode_pdu", "_recv_pdu",
             "_kill_thread", "_serve_request", "_accepted_cx", "_sent_release",
             "_create_association", "_servers", "_transfer_syntax", "VALIDATORS"}
    offenders = {}
    for path in (ROOT / "dicomai").rglob("*.py"):
        if path.name == "pynetdicom_seam.py":
            continue
        used = {n.attr for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Attribute) and n.attr in names}
        if used:
            offenders[str(path.relative_to(ROOT))] = sorted(used)
    assert offenders == {}
