"""The same daemon on PostgreSQL: migrations, the pipeline, leadership."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import inspect, select, text

from dicomai_tools import synthetic
from dicomai.db import Instance, Job, Study, make_engine, make_session_factory
from dicomai.runtime.leadership import PostgresLeadership
from dicomai.migrations import head_revision, upgrade
from dicomai.ops.scu import send_files
from dicomai.ops.status import collect
from tests.conftest import running_daemon
from tests.waiting import wait_until

pytestmark = pytest.mark.postgres


def _old_schema_with_data(url: str) -> None:
    engine = make_engine(url)
    upgrade(engine, "0001")
    now = datetime.now(UTC)
    with make_session_factory(engine).begin() as s:
        study = Study(study_instance_uid="1.2.3", first_received_at=now, last_received_at=now,
                      calling_ae_title="PACS")
        s.add(study)
        s.flush()
        # Core inserts naming only the columns of revision 0001 (the ORM maps later ones).
        s.execute(Job.__table__.insert().values(
            study_id=study.id, generation=1, state="queued", route="chest-xray",
            model="chest-xray", series_uids=["1.2.3.4"], destinations=["pacs"], priority=0,
            attempts=0, send_attempts=0, created_at=now, updated_at=now, last_instance_at=now,
            instance_count=1))
        job_id = s.scalar(text("SELECT id FROM jobs"))
        s.execute(Instance.__table__.insert().values(
            sop_instance_uid="1.2.3.4.5", study_id=study.id, job_id=job_id,
            series_instance_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
            transfer_syntax_uid="1.2.840.10008.1.2.1", modality="CR", body_part="CHEST",
            image_type="", view_position="PA", study_description="", series_description="",
            orientation="", path="/x.dcm", size_bytes=1, calling_ae_title="PACS",
            received_at=now))
    assert not inspect(engine).has_table("quarantine")
    engine.dispose()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_upgrade_old_schema_keeps_data(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'old.db'}" if backend == "sqlite" \
        else request.getfixturevalue("pg_url")
    _old_schema_with_data(url)
    engine = make_engine(url)
    before, after = upgrade(engine)
    assert (before, after) == ("0001", head_revision())
    assert inspect(engine).has_table("quarantine")
    assert inspect(engine).has_table("instance_copies")
    assert "released_at" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    with make_session_factory(engine)() as s:
        job = s.scalar(select(Job))
        assert (job.state, job.route, job.series_uids) == ("queued", "chest-xray", ["1.2.3.4"])
        assert s.scalar(select(Instance.sop_instance_uid)) == "1.2.3.4.5"
    assert upgrade(engine) == (head_revision(), head_revision())  # idempotent
    engine.dispose()


def test_pipeline_on_postgres(make_settings, local_pacs, pg_url, tmp_path):
    settings = make_settings(local_pacs.port, database={"url": pg_url})
    chest = synthetic.make_xray("chest", rows=256, cols=256, seed=71)
    ct = synthetic.make_head_ct(12, rows=128, cols=128, seed=72)
    with running_daemon(settings) as daemon:
        port = daemon.receiver.port
        assert send_files(synthetic.write_study([chest], tmp_path / "cx"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok
        assert send_files(synthetic.write_study(ct, tmp_path / "ct"), "127.0.0.1", port,
                          called_ae="DICOMAI").ok

        def states():
            data = collect(settings, engine=daemon.engine)
            return {s["study_instance_uid"]: s["state"] for s in data["studies"]}

        wait_until(lambda: states() == {chest.StudyInstanceUID: "done",
                                        ct[0].StudyInstanceUID: "done"},
                   timeout=120, what="both done")
        data = collect(settings, engine=daemon.engine)
        assert data["daemon"]["up"]
        assert {c.get("scheduler") for c in data["daemon"]["components"]} == {"active"}
    for uid in (chest.StudyInstanceUID, ct[0].StudyInstanceUID):
        assert sorted({o.modality for o in local_pacs.objects(uid)}) == ["OT", "SR"]
    # collect() also works without the daemon, straight from PostgreSQL.
    assert collect(settings)["counts"]["done"] == 2


def test_advisory_lock_has_one_holder_and_is_freed_with_its_connection(pg_url):
    engines = [make_engine(pg_url) for _ in range(3)]
    upgrade(engines[2])
    a, b = PostgresLeadership(engines[0]), PostgresLeadership(engines[1])
    assert a.acquire() is True
    assert a.acquire() is True  # idempotent while held
    assert b.acquire() is False
    a._conn.invalidate()  # the holder's session dies (as with kill -9)
    a._conn = None
    assert b.acquire() is True
    assert a.acquire() is False
    b.release()
    assert a.acquire() is True
    a.release()
    with engines[2].connect() as conn:
        # This test's database only: pg_locks is cluster-wide, and tests running beside this
        # one (another pytest-xdist worker, its own database) may hold advisory locks.
        assert conn.execute(text(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())")).scalar() == 0
    for engine in engines:
        engine.dispose()


def test_db_upgrade_command(tmp_path, pg_url, capsys):
    from dicomai.ops import cli

    _old_schema_with_data(pg_url)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(f'[general]\ndata_dir = "{tmp_path}"\n[database]\nurl = "{pg_url}"\n')
    assert cli.main(["--config", str(cfg), "db", "current"]) == 1
    assert cli.main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert f"upgraded 0001 -> {head_revision()}" in capsys.readouterr().out
    assert cli.main(["--config", str(cfg), "db", "current"]) == 0
    assert cli.main(["--config", str(cfg), "db", "upgrade"]) == 0
    assert "already at" in capsys.readouterr().out
