"""The read model's store: an eventsourcing TrackingRecorder that owns the read-model tables.

A batch of events and the tracking record of the last one are written in one transaction, after
reading the tracked position under a write lock: an event at or below the position (a
redelivery, or a second projector racing this one) is skipped, so nothing ever counts twice,
and a projector that restarts resumes from exactly where its last commit left off.

Backends: SQLite (the embedded default, `.warden/projections.sqlite`) and PostgreSQL, both
through eventsourcing's own datastores and tracking tables, chosen by URL:

    sqlite:///relative/file.sqlite, sqlite:////absolute/file.sqlite   (or a bare path)
    postgresql://user:password@host:5432/dbname?schema=warden
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

from eventsourcing.persistence import InfrastructureFactory, Tracking, TrackingRecorder
from eventsourcing.postgres import PostgresDatastore, PostgresTrackingRecorder
from eventsourcing.sqlite import SQLiteTrackingRecorder
from eventsourcing.utils import Environment

from shared.events import AnyEvent
from shared.readmodel.db import Db
from shared.readmodel.fold import BatchFold
from shared.readmodel.tables import TABLES, TIMELINE

log = logging.getLogger("warden.projection")

# The application whose notifications the read model tracks (WardenApp.name).
APPLICATION = "warden"
# Names the eventsourcing environment (and so the PostgreSQL tracking table) of the read model.
PROJECTION_NAME = "warden_readmodel"
URL_ENV = "WARDEN_PROJECTIONS_URL"
DEFAULT_FILE = "projections.sqlite"
SQLITE_BUSY_TIMEOUT_S = 30
REBUILD_CACHE_KIB = 64 * 1024


class StoreURLError(ValueError):
    """Raised when a projections URL names no backend Warden supports."""


class ReadModelMissing(LookupError):
    """Raised when a reader asks for a SQLite read model that no projector has built."""


class ReadModel(TrackingRecorder):
    """What both backends share: the batch write protocol and read transactions."""

    url: str
    # False for a rebuild's scratch store: commits need not reach the disk, because a crash
    # means rebuilding again (SQLite's synchronous=OFF; a fifth of a rebuild's time, measured).
    durable: bool = True

    def reading(self) -> AbstractContextManager[Db]:
        raise NotImplementedError

    def writing(self) -> AbstractContextManager[tuple[Db, Any]]:
        """A write transaction holding the tracking lock: (portable cursor, backend cursor)."""
        raise NotImplementedError

    def _tracked(self, db: Db, *, lock: bool = True) -> int | None:
        """The tracked position, read inside the caller's transaction."""
        raise NotImplementedError

    def _track(self, raw: Any, tracking: Tracking) -> None:
        raise NotImplementedError

    def position(self) -> int:
        """The stream sequence of the last event folded in (0 before any)."""
        return self.max_tracking_id(APPLICATION) or 0

    def project(self, batch: Sequence[tuple[int, AnyEvent | None]]) -> int:
        """Fold events (stream sequence, event or None if undecodable) in one transaction.

        Returns the position afterwards. Events at or below the tracked position are skipped,
        so a batch holds all the events of a packed record (they share its sequence) or none.
        """
        if not batch:
            return self.position()
        with self.writing() as (db, raw):
            current = self._tracked(db) or 0
            fresh = [(seq, event) for seq, event in batch if seq > current]
            if not fresh:
                return current
            fold = BatchFold(db)
            fold.prefetch(fresh)
            # Events of one packed record share its sequence: their ordinals tell them apart.
            ordinal, previous = 0, None
            for seq, event in fresh:
                ordinal = ordinal + 1 if seq == previous else 0
                previous = seq
                if event is not None:
                    fold.apply(seq, event, ordinal)
            fold.flush()
            top = fresh[-1][0]
            # Raises IntegrityError (rolling everything back) unless `top` is past the position.
            self._track(raw, Tracking(APPLICATION, top))
            return top

    @contextmanager
    def loading(self) -> Iterator[None]:
        """A bulk load (a rebuild into this store): its secondary indexes dropped while it
        runs and built once at the end, which costs less than keeping them up to date row by
        row (a quarter of the writing, measured). Readers of the store meanwhile find the same
        rows, only slower; a load that dies leaves them to the next opening, whose table
        creation makes any index that is missing."""
        with self.writing() as (db, _):
            for table in TABLES:
                for name in table.index_names:
                    db.execute(f"DROP INDEX IF EXISTS {name}")
        yield
        with self.writing() as (db, _):
            for table in TABLES:
                for statement in table.index_ddl():
                    db.execute(statement)

    def close(self) -> None:
        self.datastore.close()  # type: ignore[attr-defined]


class SQLiteReadModel(ReadModel, SQLiteTrackingRecorder):
    def create_table(self) -> None:
        """Create or migrate the tables, one process at a time.

        eventsourcing decides whether to record its tracking migration before it creates the
        table, outside any lock: a projector and an API starting together on a fresh file both
        decided to, and the second died (`Failed to record tracking for __migration__ 1`). An
        exclusive lock on a file beside the database serialises the whole step, and the one
        that waited then finds the table made.
        """
        pool = self.datastore.pool
        db_name = str(pool.db_name)
        if pool.is_sqlite_memory_mode or db_name.startswith("file:"):
            super().create_table()
            return
        with open(f"{db_name}.create-lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._drop_if_unkeyed_by_ordinal()
                super().create_table()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _drop_if_unkeyed_by_ordinal(self) -> None:
        """A read model made before packed records keys its event tables by seq alone, which a
        packed record's events share: it is dropped (tables and position) and rebuilt from the
        stream, as any read model can be."""
        with self.datastore.transaction(commit=True) as cursor:
            db = Db(cursor.sqlite_cursor, "qmark")
            columns = {row[1] for row in db.all(f"PRAGMA table_info({TIMELINE.name})")}
            if not columns or "ordinal" in columns:
                return
            log.warning("read model %s predates packed records: rebuilding it from the stream", self)
            for table in TABLES:
                db.execute(f"DROP TABLE IF EXISTS {table.name}")
            db.execute("DELETE FROM tracking WHERE application_name = ?", (APPLICATION,))

    def construct_create_table_statements(self) -> list[str]:
        statements = super().construct_create_table_statements()
        for table in TABLES:
            statements.extend(table.ddl())
        return statements

    @contextmanager
    def reading(self) -> Iterator[Db]:
        with self.datastore.transaction(commit=False) as cursor:
            yield Db(cursor.sqlite_cursor, "qmark")

    @contextmanager
    def writing(self) -> Iterator[tuple[Db, Any]]:
        with self.datastore.get_connection(commit=True) as conn:
            cursor = conn.cursor()
            if not self.durable:
                cursor.execute("PRAGMA synchronous=OFF")
                # A rebuild's B-trees outgrow the default 2 MiB page cache within 100k events.
                cursor.execute(f"PRAGMA cache_size=-{REBUILD_CACHE_KIB}")
            # IMMEDIATE takes the write lock before the position is read, so two writers of one
            # file serialise instead of both folding the same events.
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield Db(cursor.sqlite_cursor, "qmark"), cursor
            except BaseException:
                conn.rollback()
                raise
            else:
                conn.commit()
            finally:
                cursor.sqlite_cursor.close()

    def _tracked(self, db: Db, *, lock: bool = True) -> int | None:
        # In SQLite the write transaction itself is the lock.
        value = db.scalar("SELECT notification_id FROM tracking WHERE application_name = ?", (APPLICATION,))
        return None if value is None else int(value)

    def _track(self, raw: Any, tracking: Tracking) -> None:
        self._insert_tracking(raw, tracking)


class PostgresReadModel(ReadModel, PostgresTrackingRecorder):
    def __init__(self, datastore: PostgresDatastore, **kwargs: Any) -> None:
        super().__init__(datastore, **kwargs)
        schema = self.datastore.schema
        # The schema may be new (one per deployment, or per test).
        self.sql_create_statements[:0] = [_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')]
        # All statements run in one transaction: the read-model tables go in the schema too.
        self.sql_create_statements.append(_sql(f'SET LOCAL search_path TO "{schema}"'))
        # A read model made before packed records keys its event tables by seq alone (which a
        # packed record's events share): dropped with its position, and rebuilt from the stream.
        drops = "; ".join(f"DROP TABLE IF EXISTS {t.name}" for t in TABLES)
        self.sql_create_statements.append(
            _sql(
                "DO $$ BEGIN IF EXISTS (SELECT 1 FROM information_schema.tables WHERE table_schema = "
                f"current_schema() AND table_name = '{TIMELINE.name}') AND NOT EXISTS (SELECT 1 FROM "
                "information_schema.columns WHERE table_schema = current_schema() AND table_name = "
                f"'{TIMELINE.name}' AND column_name = 'ordinal') THEN {drops}; DELETE FROM "
                f"\"{self.tracking_table_name}\" WHERE application_name = '{APPLICATION}'; END IF; END $$"
            )
        )
        for table in TABLES:
            self.sql_create_statements.extend(_sql(s) for s in table.ddl())

    @contextmanager
    def _transaction(self, *, commit: bool) -> Iterator[Any]:
        with self.datastore.transaction(commit=commit) as cursor:
            cursor.execute(_sql(f'SET LOCAL search_path TO "{self.datastore.schema}"'))
            yield cursor

    @contextmanager
    def reading(self) -> Iterator[Db]:
        with self._transaction(commit=False) as cursor:
            yield Db(cursor, "format")

    @contextmanager
    def writing(self) -> Iterator[tuple[Db, Any]]:
        with self._transaction(commit=True) as cursor:
            yield Db(cursor, "format"), cursor

    def _tracked(self, db: Db, *, lock: bool = True) -> int | None:
        # FOR UPDATE: a second projector waits here, then sees the first one's position.
        value = db.scalar(
            f'SELECT notification_id FROM "{self.tracking_table_name}" WHERE application_name = ?'
            + (" FOR UPDATE" if lock else ""),
            (APPLICATION,),
        )
        return None if value is None else int(value)

    def _track(self, raw: Any, tracking: Tracking) -> None:
        self._insert_tracking(raw, tracking)


def _sql(text: str) -> Any:
    from psycopg.sql import SQL

    return SQL(text)


def redacted(url: str) -> str:
    """A store URL fit for logs and API answers: no password."""
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    return url.replace(f":{parsed.password}@", "@", 1)


def default_url(data_dir: Path | str | None = None) -> str:
    """SQLite inside the data folder, as an absolute path: the URL means the same file whatever
    the working directory of the process that reads it (the API, `warden replay`, a test)."""
    folder = Path(data_dir or os.environ.get("WARDEN_DATA_DIR") or ".warden")
    return f"sqlite:///{folder.resolve() / DEFAULT_FILE}"


def configured_url(url: str | None = None, data_dir: Path | str | None = None) -> str:
    """The projections URL: given, or WARDEN_PROJECTIONS_URL, or SQLite under the data folder."""
    return url or os.environ.get(URL_ENV) or default_url(data_dir)


def sqlite_path(url: str) -> str | None:
    """The file a SQLite URL names (None for another backend).

    SQLAlchemy's convention: what follows `sqlite:///` is the path as written, so `sqlite:///d/x`
    is relative (./d/x) and `sqlite:////d/x` is absolute (/d/x)."""
    scheme = urlparse(url).scheme
    if scheme not in ("sqlite", ""):
        return None
    path = url
    if scheme:
        path = url.split("?", 1)[0].removeprefix("sqlite:").removeprefix("///").removeprefix("//")
    if not path:
        raise StoreURLError(f"{url!r} names no SQLite file")
    return path


def store_env(url: str) -> dict[str, str]:
    """The eventsourcing environment that selects the backend a URL names."""
    parsed = urlparse(url)
    if parsed.scheme in ("postgresql", "postgres"):
        query = parse_qs(parsed.query)
        env = {
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": unquote(parsed.path.lstrip("/")) or "postgres",
            "POSTGRES_HOST": parsed.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parsed.port or 5432),
            "POSTGRES_USER": unquote(parsed.username or "postgres"),
            "POSTGRES_PASSWORD": unquote(parsed.password or ""),
            "POSTGRES_SCHEMA": query.get("schema", ["public"])[0],
            # The API reads from worker threads while the projector writes.
            "POSTGRES_POOL_SIZE": "2",
            "POSTGRES_MAX_OVERFLOW": "6",
            "POSTGRES_CONNECT_TIMEOUT": "5",
        }
        return env
    path = sqlite_path(url)
    if path is not None:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A projector writing and an API reading the same file wait for each other's locks
        # (switching to WAL included) instead of failing with `database is locked`.
        return {
            "PERSISTENCE_MODULE": "eventsourcing.sqlite",
            "SQLITE_DBNAME": path,
            "SQLITE_LOCK_TIMEOUT": str(SQLITE_BUSY_TIMEOUT_S),
        }
    raise StoreURLError(f"projections URL {url!r}: use sqlite:///PATH or postgresql://USER@HOST:PORT/DB")


def open_read_model(url: str, *, durable: bool = True) -> ReadModel:
    """Open (creating tables if needed) the read model a URL names. Blocking: call from a thread.

    `durable=False` is for a store being rebuilt from the stream (see `ReadModel.durable`)."""
    env = Environment(PROJECTION_NAME, store_env(url))
    factory: InfrastructureFactory[Any] = InfrastructureFactory.construct(env)
    cls: type[ReadModel] = (
        PostgresReadModel if env["PERSISTENCE_MODULE"] == "eventsourcing.postgres" else SQLiteReadModel
    )
    store = factory.tracking_recorder(cls)
    assert isinstance(store, ReadModel)
    store.url = url
    store.durable = durable
    return store
