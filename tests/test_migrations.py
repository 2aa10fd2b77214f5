"""The records database's schema is owned by the migrations (lineguard/migrations, lineguard/db.py).

- every service of the embedded line that opens the database (recorder, model registry, dialogue app, training)
  starts at once, 20 times on a fresh database each, after the stack's one migration step: every start works;
- without the migrations a service refuses with one line saying what to run, and creates nothing;
- a database made by today's main (its tables from `metadata.create_all`, no `alembic_version`; with and without
  the later `records.descriptor`) is adopted in place, with its records, labels and model versions;
- the same migrations on PostgreSQL; the migrated schema is the SQLAlchemy tables' (autogenerate finds nothing);
- two `lineguard db upgrade` at once both work; the state dir is 0700 and the database files 0600.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime
from multiprocessing import get_context
from pathlib import Path

import pytest
from sqlalchemy import MetaData, create_engine, text

from lineguard.db import SchemaBehind, current, head, upgrade

REVISIONS = ["0001_baseline", "0002_records_descriptor"]

# The SQLite DDL that today's main (before the migrations) ran: `metadata.create_all` of storage/schema.py and of
# inference/registry.py, frozen here as it was (compiled from that commit's Table objects).
TODAYS_DDL = [
    "CREATE TABLE conversation_turns (\n\tid INTEGER NOT NULL, \n\tframe_id VARCHAR(200) NOT NULL, \n\tturn INTEGER "
    "NOT NULL, \n\toperator VARCHAR(100) NOT NULL, \n\tquestion TEXT NOT NULL, \n\tanswer TEXT NOT NULL, \n\tintent "
    "VARCHAR(32) NOT NULL, \n\tsources TEXT NOT NULL, \n\tlatency_ms FLOAT NOT NULL, \n\tasked_at DATETIME NOT NULL, "
    "\n\tPRIMARY KEY (id), \n\tCONSTRAINT uq_conversation_turn UNIQUE (frame_id, turn)\n)",
    "CREATE INDEX ix_conversation_turns_frame_id ON conversation_turns (frame_id)",
    "CREATE TABLE count_progress (\n\ttopic VARCHAR(255) NOT NULL, \n\tkafka_partition INTEGER NOT NULL, "
    "\n\tcounted_through BIGINT NOT NULL, \n\tPRIMARY KEY (topic, kafka_partition)\n)",
    "CREATE TABLE counted_frames (\n\tframe_id VARCHAR(200) NOT NULL, \n\tday VARCHAR(10) NOT NULL, "
    "\n\tPRIMARY KEY (frame_id)\n)",
    "CREATE INDEX ix_counted_frames_day ON counted_frames (day)",
    "CREATE TABLE frame_counts (\n\tday VARCHAR(10) NOT NULL, \n\tline_id VARCHAR(100) NOT NULL, \n\tcamera_id "
    "VARCHAR(100) NOT NULL, \n\tproduct VARCHAR(100) NOT NULL, \n\tframes BIGINT NOT NULL, \n\tflagged BIGINT NOT "
    "NULL, \n\tsampled BIGINT NOT NULL, \n\tPRIMARY KEY (day, line_id, camera_id, product)\n)",
    "CREATE TABLE labels (\n\tid INTEGER NOT NULL, \n\tframe_id VARCHAR(200) NOT NULL, \n\toperator VARCHAR(100) NOT "
    "NULL, \n\tis_defect BOOLEAN NOT NULL, \n\tdefect_type VARCHAR(100), \n\tmask_uri TEXT, \n\tnote TEXT NOT NULL, "
    "\n\tlabeled_at DATETIME NOT NULL, \n\tstored_at DATETIME NOT NULL, \n\tPRIMARY KEY (id), \n\tCONSTRAINT "
    "uq_label_event UNIQUE (frame_id, operator, labeled_at)\n)",
    "CREATE INDEX ix_labels_frame_id ON labels (frame_id)",
    "CREATE INDEX ix_labels_labeled_at ON labels (labeled_at)",
    "CREATE TABLE records (\n\tframe_id VARCHAR(200) NOT NULL, \n\tline_id VARCHAR(100) NOT NULL, \n\tcamera_id "
    "VARCHAR(100) NOT NULL, \n\tproduct VARCHAR(100) NOT NULL, \n\tcaptured_at DATETIME NOT NULL, \n\tkind "
    "VARCHAR(16) NOT NULL, \n\tis_anomalous BOOLEAN NOT NULL, \n\tscore FLOAT NOT NULL, \n\tthreshold FLOAT NOT "
    "NULL, \n\tconfidence FLOAT NOT NULL, \n\tmodel_version VARCHAR(100) NOT NULL, \n\tanswer TEXT, \n\tpositions "
    "VARCHAR(200) NOT NULL, \n\tverdict_json TEXT NOT NULL, \n\timage_uri TEXT, \n\theatmap_uri TEXT, "
    "\n\toverlay_uri TEXT, \n\tmissing VARCHAR(100) NOT NULL, \n\tlabel_status VARCHAR(16) NOT NULL, \n\tstored_at "
    "DATETIME NOT NULL, \n\tdescriptor BLOB, \n\tPRIMARY KEY (frame_id)\n)",
    "CREATE INDEX ix_records_captured_at ON records (captured_at)",
    "CREATE INDEX ix_records_label_status ON records (label_status)",
    "CREATE INDEX ix_records_line_id ON records (line_id)",
    "CREATE INDEX ix_records_product ON records (product)",
    "CREATE TABLE model_versions (\n\tversion VARCHAR(160) NOT NULL, \n\tproduct VARCHAR(128) NOT NULL, \n\tnumber "
    "INTEGER NOT NULL, \n\tstatus VARCHAR(16) NOT NULL, \n\tparent VARCHAR(160), \n\tmodel_code VARCHAR(200) NOT "
    "NULL, \n\tbundle_uri TEXT NOT NULL, \n\tmetrics TEXT NOT NULL, \n\tlineage TEXT NOT NULL, \n\tnote TEXT NOT "
    "NULL, \n\tcreated_at DATETIME NOT NULL, \n\tpromoted_at DATETIME, \n\trolled_back_at DATETIME, \n\tPRIMARY KEY "
    "(version)\n)",
    "CREATE INDEX ix_model_versions_product ON model_versions (product)",
]


def todays_ddl(dialect: str, *, descriptor: bool) -> list[str]:
    """TODAYS_DDL as create_all ran it on `dialect` (PostgreSQL: SERIAL ids, TIMESTAMP, BYTEA), optionally from
    before `records.descriptor` existed."""
    statements = []
    for statement in TODAYS_DDL:
        if not descriptor:
            statement = statement.replace(" \n\tdescriptor BLOB,", "")
        if dialect == "postgresql":
            statement = (statement.replace("\tid INTEGER NOT NULL", "\tid SERIAL NOT NULL")
                         .replace("DATETIME", "TIMESTAMP WITHOUT TIME ZONE").replace("BLOB", "BYTEA"))
        statements.append(statement)
    return statements


def all_tables() -> MetaData:
    """The SQLAlchemy tables of the records database: storage/schema.py's and the model registry's."""
    from inference.registry import metadata as registry_metadata
    from storage.schema import metadata as storage_metadata

    combined = MetaData()
    for metadata in (storage_metadata, registry_metadata):
        for table in metadata.tables.values():
            table.to_metadata(combined)
    return combined


def schema_differences(url: str) -> list:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    def ours(obj, name, type_, reflected, compare_to) -> bool:   # the pgvector index's tables are its own
        return not (type_ == "table" and (name or "").startswith("descriptor_"))

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "include_object": ours})
            return compare_metadata(context, all_tables())
    finally:
        engine.dispose()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- the embedded line's start-up, all at once ------------------------------------------------------------------

SERVICES = ("recorder", "registry", "dialogue", "training")


def _warm() -> None:
    import dialogue.app  # noqa: F401
    import inference.registry  # noqa: F401
    import storage.records  # noqa: F401


def _start_up(service: str, state_dir: str, gate: str) -> str:
    """One service's start-up on the records database of `state_dir` (as its process does it), once `gate` exists,
    and one write or read of its own; returns the service's name."""
    from lineguard.events import Label
    from lineguard.settings import load_settings
    from storage.settings import load_storage_settings

    deadline = time.monotonic() + 60
    while not os.path.exists(gate):    # every service of the round starts at the same moment
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal")
        time.sleep(0.002)
    settings = load_settings(state_dir=Path(state_dir))
    storage_settings = load_storage_settings(store_db_url=None, store_artifacts=None)
    if service == "recorder":
        from storage.recorder import Recorder
        from storage.records import SaveBatch

        recorder = Recorder(settings, storage_settings)
        recorder.store.save(SaveBatch(labels=[Label(frame_id="f1", operator="ana", is_defect=True)]))
        recorder.store.close()
    elif service == "registry":          # `lineguard infer`
        from inference.registry import ModelRegistry

        registry = ModelRegistry.from_settings(settings)
        registry.register("disc", None, "test-code", parent=None, metrics={}, lineage={}, bundle=b"weights")
        registry.close()
    elif service == "dialogue":          # `lineguard dialogue`: the app, its record store and conversations
        from dialogue.app import create_app
        from dialogue.settings import load_dialogue_settings

        token_file = Path(state_dir) / "tokens.json"
        app = create_app(settings, load_dialogue_settings(tokens_file=token_file, answerer="template"),
                         storage_settings)
        app.state.service.conversations.add("f1", operator="ana", question="why?", answer="a scratch",
                                            intent="why", sources=[], latency_ms=1.0)
        app.state.service.store.close()
    else:                                # `lineguard train`: the store and the registry on one database
        from inference.registry import ModelRegistry
        from storage.records import RecordStore

        store = RecordStore.from_settings(settings, storage_settings)
        registry = ModelRegistry(storage_settings.db_url(settings), store.artifacts)
        store.query(limit=10)
        registry.versions()
        registry.close()
        store.close()
    return service


def test_every_service_of_the_line_starts_at_once_on_a_fresh_database_twenty_times(tmp_path):
    from lineguard.settings import load_settings
    from lineguard.stack import migrate_records

    _warm()    # forked service processes start with the modules loaded (spawning four would import torch four times)
    with ProcessPoolExecutor(len(SERVICES), mp_context=get_context("fork")) as pool:
        for round_ in range(20):
            state = tmp_path / f"round-{round_}" / "state"
            settings = load_settings(state_dir=state)
            assert migrate_records(settings) == REVISIONS          # the stack's one migration step
            gate = tmp_path / f"round-{round_}.go"
            started = [pool.submit(_start_up, service, str(state), str(gate)) for service in SERVICES]
            gate.touch()
            assert sorted(f.result(timeout=120) for f in started) == sorted(SERVICES), f"round {round_}"
            engine = create_engine(settings.records_db_url())
            with engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM labels")).scalar_one() == 1
                assert conn.execute(text("SELECT count(*) FROM model_versions")).scalar_one() == 1
                assert conn.execute(text("SELECT count(*) FROM conversation_turns")).scalar_one() == 1
                assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [head()]
            engine.dispose()


def test_without_the_migrations_a_service_refuses_with_one_line_and_creates_nothing(tmp_path):
    from inference.registry import ModelRegistry
    from lineguard.artifacts import LocalArtifactStore
    from storage.records import RecordStore

    path = tmp_path / "db" / "records.sqlite"
    url = f"sqlite:///{path}"
    for open_service in (lambda: RecordStore(url, LocalArtifactStore(tmp_path / "a")),
                         lambda: ModelRegistry(url, LocalArtifactStore(tmp_path / "a"))):
        with pytest.raises(SchemaBehind) as refused:
            open_service()
        message = str(refused.value)
        assert "\n" not in message and "not initialised" in message and head() in message
        assert f"run `lineguard db upgrade --db-url '{url}'`" in message
    assert not path.exists() and not path.parent.exists()

    assert upgrade(url, "0001_baseline") == ["0001_baseline"]      # a database one revision behind
    with pytest.raises(SchemaBehind, match=f"is at revision 0001_baseline, this build needs {head()}: run "):
        RecordStore(url, LocalArtifactStore(tmp_path / "a"))
    assert upgrade(url) == ["0002_records_descriptor"] and upgrade(url) == []
    RecordStore(url, LocalArtifactStore(tmp_path / "a")).close()


def test_upgrades_at_once_on_a_fresh_sqlite_database_take_turns(tmp_path):
    for round_ in range(5):
        url = f"sqlite:///{tmp_path / f'round-{round_}' / 'records.sqlite'}"
        applied: list[list[str]] = []
        threads = [threading.Thread(target=lambda url=url, applied=applied: applied.append(upgrade(url)))
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert sorted(applied) == [[], [], [], REVISIONS], f"round {round_}"   # one applies, three find it done
        assert current(url) == head()


def test_the_db_commands_upgrade_twice_at_once_and_a_service_says_what_to_run(tmp_path):
    env = dict(os.environ) | {"LINEGUARD_STATE_DIR": str(tmp_path / "state"), "LINEGUARD_LOG_JSON": "1"}
    env.pop("LINEGUARD_STORE_DB_URL", None)

    def lineguard(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "deploy", *args], env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    refused = lineguard("records").communicate(timeout=120)
    lines = [line for line in refused[1].splitlines() if line.strip()]
    assert lines == [f"error: records database sqlite:///{(tmp_path / 'state' / 'records.sqlite').resolve()} is not "
                     f"initialised (no schema revision), this build needs {head()}: run `lineguard db upgrade`"]
    assert lineguard("db", "current").communicate(timeout=120)[0].strip() == f"none (this build needs {head()})"
    both = [lineguard("db", "upgrade"), lineguard("db", "upgrade")]
    results = [(process.communicate(timeout=120), process.returncode) for process in both]
    assert [code for _, code in results] == [0, 0], results
    assert sorted("applied" in out for (out, _), _ in results) == [False, True], results   # one applied, one found it
    assert lineguard("db", "current").communicate(timeout=120)[0].strip() == f"{head()} (head)"
    listed = lineguard("records")
    assert listed.communicate(timeout=120)[0] == "" and listed.returncode == 0


# --- a database of today's main ---------------------------------------------------------------------------------

@pytest.mark.parametrize("descriptor", [True, False], ids=["with-descriptor", "before-descriptor"])
def test_a_database_made_by_todays_main_is_upgraded_in_place_with_nothing_lost(tmp_path, records_url, descriptor):
    from inference.registry import ModelRegistry
    from lineguard.artifacts import LocalArtifactStore
    from storage.labels import training_examples
    from storage.records import RecordStore

    url = records_url
    dialect = "postgresql" if url.startswith("postgresql") else "sqlite"
    at = datetime(2026, 12, 1, 10, 0, 0)
    engine = create_engine(url)
    with engine.begin() as conn:                         # what today's main made and wrote
        for statement in todays_ddl(dialect, descriptor=descriptor):
            conn.execute(text(statement))
        conn.execute(text(
            "INSERT INTO records (frame_id, line_id, camera_id, product, captured_at, kind, is_anomalous, score, "
            "threshold, confidence, model_version, answer, positions, verdict_json, missing, label_status, "
            "stored_at) VALUES ('old-1', 'line-1', 'cam-0', 'disc', :at, 'flagged', :yes, 2.0, 1.0, 0.9, 'm1', "
            "'a scratch', '[\"center\"]', '{}', '', 'defect', :at)"), {"at": at, "yes": True})
        conn.execute(text("INSERT INTO labels (frame_id, operator, is_defect, defect_type, note, labeled_at, "
                          "stored_at) VALUES ('old-1', 'ana', :yes, 'scratch', 'deep', :at, :at)"),
                     {"at": at, "yes": True})
        conn.execute(text("INSERT INTO model_versions (version, product, number, status, model_code, bundle_uri, "
                          "metrics, lineage, note, created_at, promoted_at) VALUES ('disc.v0001', 'disc', 1, 'live', "
                          "'code', 'file:///b.pt', '{\"auroc\": 0.9}', '{}', '', :at, :at)"), {"at": at})
        conn.execute(text("INSERT INTO conversation_turns (frame_id, turn, operator, question, answer, intent, "
                          "sources, latency_ms, asked_at) VALUES ('old-1', 1, 'ana', 'why?', 'a scratch', 'why', "
                          "'[]', 1.0, :at)"), {"at": at})
    engine.dispose()
    assert current(url) is None

    assert upgrade(url) == REVISIONS
    assert current(url) == head() and upgrade(url) == []
    store = RecordStore(url, LocalArtifactStore(tmp_path / "artifacts"))
    registry = ModelRegistry(url, LocalArtifactStore(tmp_path / "artifacts"))
    try:
        record = store.get("old-1")
        assert record.answer == "a scratch" and record.label_status == "defect" and record.positions == ["center"]
        examples = training_examples(store, product="disc")
        assert [(e.frame_id, e.defect_type) for e in examples] == [("old-1", "scratch")]
        assert registry.live("disc").version == "disc.v0001" and registry.get("disc.v0001").metrics == {"auroc": 0.9}
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM conversation_turns")).scalar_one() == 1
            assert conn.execute(text("SELECT descriptor FROM records")).scalar_one() is None   # the column is there
    finally:
        registry.close()
        store.close()
    if dialect == "sqlite":
        assert schema_differences(url) == []


# --- PostgreSQL and the tables' definitions ---------------------------------------------------------------------

def test_the_migrations_build_the_tables_the_code_defines(tmp_path):
    url = f"sqlite:///{tmp_path / 'records.sqlite'}"
    assert upgrade(url) == REVISIONS
    assert schema_differences(url) == []


def test_the_same_migrations_on_postgresql_twice_at_once(postgres_url, tmp_path):
    from inference.registry import ModelRegistry
    from lineguard.artifacts import LocalArtifactStore
    from storage.records import RecordStore

    applied: list[list[str]] = []
    threads = [threading.Thread(target=lambda: applied.append(upgrade(postgres_url))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(applied) == [[], [], REVISIONS]         # the advisory lock: one applies, the others find it done
    assert current(postgres_url) == head()
    assert schema_differences(postgres_url) == []
    engine = create_engine(postgres_url)
    with engine.connect() as conn:
        tables = set(conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    engine.dispose()
    assert {"descriptor_sync", "descriptor_dims", "records", "model_versions"} <= tables
    store = RecordStore(postgres_url, LocalArtifactStore(tmp_path / "a"))
    registry = ModelRegistry(postgres_url, LocalArtifactStore(tmp_path / "a"))
    try:
        assert store.count_records() == 0 and registry.versions() == []
    finally:
        registry.close()
        store.close()


# --- private files ----------------------------------------------------------------------------------------------

def test_the_state_dir_is_0700_and_the_database_files_0600(tmp_path):
    from lineguard.artifacts import LocalArtifactStore
    from lineguard.settings import load_settings
    from lineguard.stack import EmbeddedStack
    from storage.records import RecordStore
    from storage.vectors import DescriptorIndex, available

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)              # as today's main left it
    settings = load_settings(state_dir=state, embedded_kafka_port=0)
    with EmbeddedStack(settings, with_influx=False):
        assert mode(state) == 0o700
        database = state / "records.sqlite"
        assert mode(database) == 0o600 and current(settings.records_db_url()) == head()   # migrated at start
        store = RecordStore(settings.records_db_url(), LocalArtifactStore(state / "artifacts"))
        try:
            with store.engine.connect() as conn:      # WAL: -wal and -shm exist while a connection is open
                conn.execute(text("SELECT count(*) FROM records"))
                files = {p.name: mode(p) for p in state.iterdir() if p.name.startswith("records.sqlite")}
            assert files == {"records.sqlite": 0o600, "records.sqlite-wal": 0o600, "records.sqlite-shm": 0o600}
        finally:
            store.close()

    previous = os.umask(0)                 # the modes do not come from the umask
    try:
        fresh = tmp_path / "fresh" / "state"
        upgrade(f"sqlite:///{fresh / 'records.sqlite'}")
        assert mode(fresh) == 0o700 and mode(fresh / "records.sqlite") == 0o600
        if available():
            index = DescriptorIndex.beside(fresh / "records.sqlite")
            index.close()
            assert mode(fresh / "records.vectors.sqlite") == 0o600
    finally:
        os.umask(previous)
