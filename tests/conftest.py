"""Shared fixtures: settings on a temp data dir, a local PACS, a running daemon (for waiting
in tests, see tests.waiting)."""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dicomai.config import Settings, load_settings
from dicomai.runtime.daemon import Daemon
from dicomai_tools.local_pacs import LocalPacs
from dicomai.models.reference import REFERENCE_MODELS, build_reference

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "config" / "dicomai.toml"


def tools_required() -> bool:
    """Whether a missing external tool fails the run instead of skipping its tests
    (``DICOMAI_REQUIRE_TOOLS=1``, set by ``.ci/run``: CI installs them all)."""
    return os.environ.get("DICOMAI_REQUIRE_TOOLS") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip the current test for a missing tool, or fail it where tools are required."""
    if tools_required():
        pytest.fail(f"{reason} (DICOMAI_REQUIRE_TOOLS=1)")
    pytest.skip(reason)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip marked tests whose external tool is missing (or stop the run, where tools are
    required); under pytest-xdist, hand out the long test files first."""
    needs = {
        "dcmtk": shutil.which("storescu") and shutil.which("echoscu"),
        "orthanc": shutil.which("Orthanc"),
        "validators": shutil.which("dciodvfy") and Path("/usr/share/java/pixelmed.jar").exists(),
    }
    missing = sorted(
        marker
        for marker, available in needs.items()
        if not available and any(marker in item.keywords for item in items)
    )
    if missing and tools_required():
        raise pytest.UsageError(
            f"tools not installed: {', '.join(missing)} (DICOMAI_REQUIRE_TOOLS=1)"
        )
    for item in items:
        for marker, available in needs.items():
            if marker in item.keywords and not available:
                item.add_marker(pytest.mark.skip(reason=f"{marker} tools not installed"))
    if _xdist_workers(config):
        # `make test` runs --dist loadfile: each file's tests run on one worker, in order (a
        # module-scoped fixture is set up once; tests/hostile's last test follows its attacks;
        # the viewer tests share one Orthanc, OHIF server and Chromium). Longest first: the
        # viewer file and the files with slow tests are handed out before the many short ones,
        # so that no worker is left with a long file while the other one is idle.
        rank: dict[str, int] = {}
        for item in items:
            module = item.nodeid.split("::")[0]
            rank[module] = min(rank.get(module, 2), 0 if "viewers" in item.keywords else 1
                               if "slow" in item.keywords or "validators" in item.keywords
                               else 2)
        items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist workers, share the cores among them: each worker (and each daemon it
    starts, which inherits the environment) gets cores / workers PyTorch (OpenMP) threads
    instead of all of them, so that two inferences at once do not oversubscribe the cores."""
    workers = _xdist_workers(config)
    if workers and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller, before spawning
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


def _xdist_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run has (0 without xdist)."""
    if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
        return int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    try:
        return int(config.getoption("numprocesses") or 0)
    except (ValueError, TypeError):
        return 0


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tcp_listen(port: int) -> bool | None:
    """Whether a socket listens on ``port``, read from /proc/net (no connection is made);
    None where there is no /proc/net/tcp."""
    found = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        found = True
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                return True
    return False if found else None


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``port`` (no DICOM).

    Read from /proc/net where there is one: a probing connect that sends no A-ASSOCIATE-RQ
    keeps one of the daemon's association threads waiting ``acse_timeout_seconds`` (30 s by
    default), and the daemon's stop waits for that thread. Elsewhere a plain connect.
    """
    state = tcp_listen(port)
    if state is not None:
        return state
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three reference models, built once per test run: pytest-xdist workers share the
    run's base folder (the first worker builds them, under a lock, the others wait)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # <basetemp>/popen-gwN for a worker: the run's own folder above
    out = root / "models"
    with open(root / "models.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / ".built").exists():
            out.mkdir(exist_ok=True)
            for name, ref in REFERENCE_MODELS.items():
                build_reference(name, out / ref.filename)
            (out / ".built").touch()
    return out


@pytest.fixture
def local_pacs(tmp_path: Path) -> Iterator[LocalPacs]:
    """A Storage SCP on loopback standing in for the PACS."""
    pacs = LocalPacs(ae_title="PACS").start()
    yield pacs
    pacs.stop()


#: ``DICOMAI_TEST_DATABASE=postgres`` runs the whole suite on a fresh PostgreSQL database per
#: test instead of SQLite (the `postgres` tests always use PostgreSQL).
TEST_DATABASE = os.environ.get("DICOMAI_TEST_DATABASE", "sqlite")


@pytest.fixture
def default_database_url(request: pytest.FixtureRequest) -> str:
    """Empty (SQLite under the data dir), or a fresh PostgreSQL database."""
    if TEST_DATABASE == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return ""


@pytest.fixture
def make_settings(tmp_path: Path, model_dir: Path,
                  default_database_url: str) -> Callable[..., Settings]:
    """Settings from the shipped config on ``tmp_path``, with section overrides."""

    def make(pacs_port: int | None = None, **sections: dict[str, Any]) -> Settings:
        overrides: dict[str, Any] = {
            "general": {"data_dir": str(tmp_path / "data")},
            "database": {"url": default_database_url},
            "receiver": {"port": 0, "min_free_disk_mb": 0},
            "scheduler": {"study_quiet_seconds": 1.0, "poll_seconds": 0.2},
            "worker": {"poll_seconds": 0.1, "heartbeat_seconds": 1.0},
            "sender": {"poll_seconds": 0.1, "retry_base_seconds": 0.5},
            "logging": {"level": "INFO", "format": "json"},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        settings = load_settings(DEFAULT_CONFIG, environ={}, overrides=overrides)
        models = {}
        for name, m in settings.models.items():
            pre = m.preprocessing
            if m.task == "head_ct_ich":  # smaller slices keep the CT tests fast on 2 cores
                pre = pre.model_copy(update={"input_size": 128, "batch_size": 32})
            models[name] = m.model_copy(update={
                "path": model_dir / REFERENCE_MODELS[name].filename, "preprocessing": pre,
                "device": "cpu"})
        dests = settings.destinations
        if pacs_port is not None:
            dests = [d.model_copy(update={"port": pacs_port}) for d in dests]
        return settings.model_copy(update={"models": models, "destinations": dests})

    return make


@contextmanager
def running_daemon(settings: Settings, **kwargs: Any) -> Iterator[Daemon]:
    """A daemon started in-process; stopped on exit."""
    daemon = Daemon(settings, **kwargs)
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop(10)


from tests.pg_fixtures import pg_url  # noqa: E402,F401  (fixture, shared by every folder)
