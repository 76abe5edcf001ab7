"""The feedback store: SQLAlchemy over SQLite (one file, the default) or PostgreSQL (a URL, so
several replicas share one store). The schema is Alembic's (migrations/), brought to head the
first time a store is used.

    store = FeedbackStore("feedback.sqlite3", max_items=10_000)
    store.add(NewFeedback(label="cat", image=png, ...))   # committed when it returns

Durability: `add` returns only after COMMIT. SQLite runs in WAL mode with synchronous=FULL, so a
committed row survives the process being killed (and a power cut); PostgreSQL commits durably by
default. Every failure to reach or write the database is raised as StoreUnavailable, and a full
store (max_items rows) as StoreFull; either way the transaction is rolled back whole.
"""

from __future__ import annotations

import hashlib
import importlib.util
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import (
    DateTime,
    Engine,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
)
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

BUSY_TIMEOUT_S = 5.0  # seconds a SQLite writer waits for another's lock before giving up
CONNECT_TIMEOUT_S = 3  # seconds to reach a PostgreSQL server
ADD_LOCK = 0x636E6E61  # PostgreSQL advisory lock key: one writer at a time keeps the cap exact
MIGRATIONS = "convnet.feedback:migrations"
# What a database that is down, locked, full or slow raises; anything else is a bug and stays one.
DATABASE_ERRORS = (DBAPIError, PoolTimeout)
# Alembic's `context` is one per process: two stores migrating in one process must take turns.
# Processes (workers, replicas) take turns through the database's own lock (migrations/env.py).
_MIGRATING = threading.Lock()


class StoreUnavailable(Exception):
    """The database cannot be reached or written now (locked, down, disk full); retry later."""


class StoreFull(Exception):
    """The store holds max_items rows already."""


class Base(DeclarativeBase):
    pass


class Feedback(Base):
    """One image a person labelled. Mirrors migrations/versions/0001_feedback_table.py."""

    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    label: Mapped[str] = mapped_column(String(200))  # the class the person says it is
    predicted: Mapped[str | None] = mapped_column(String(200))  # what the model said, if known
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(10))  # "page" or "api"
    note: Mapped[str | None] = mapped_column(Text)
    media_type: Mapped[str] = mapped_column(String(40))  # e.g. image/png, sniffed from the bytes
    sha256: Mapped[str] = mapped_column(String(64))
    image: Mapped[bytes] = mapped_column(LargeBinary)  # the encoded image as received


class Kept(Base):
    """An image `predict?keep=1` kept for KEEP_SECONDS, so feedback can name it by its id.
    Mirrors migrations/versions/0002_kept_images.py."""

    __tablename__ = "kept_images"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # random: the prediction_id
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    predicted: Mapped[str] = mapped_column(String(200))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[int] = mapped_column(Integer)
    media_type: Mapped[str] = mapped_column(String(40))
    image: Mapped[bytes] = mapped_column(LargeBinary)


class UnknownPrediction(Exception):
    """No kept image has this prediction_id: never kept, expired, or already answered."""


@dataclass
class NewFeedback:
    label: str
    image: bytes  # encoded, already validated by the same decoder as predictions
    media_type: str
    model_name: str
    model_version: int
    source: str = "api"
    predicted: str | None = None
    note: str | None = None


def database_url(setting: str) -> str:
    """A FEEDBACK_DB setting -> a SQLAlchemy URL: URLs pass (postgresql:// gets the psycopg 3
    driver), anything else is a SQLite file path."""
    if "://" in setting:
        scheme, rest = setting.split("://", 1)
        if scheme in ("postgres", "postgresql"):
            return f"postgresql+psycopg://{rest}"
        return setting
    return f"sqlite:///{Path(setting).expanduser().resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # we say BEGIN ourselves (see _begin_immediate)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
    cursor.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
    cursor.close()


def _begin_immediate(connection) -> None:
    # Take the write lock at BEGIN: a reader that later writes cannot deadlock with another
    # (SQLite would fail one at once), and the count-then-insert in `add` is exact.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _begin_immediate)
        return engine
    return create_engine(url, pool_pre_ping=True,
                         connect_args={"connect_timeout": CONNECT_TIMEOUT_S})


def upgrade(engine: Engine) -> None:
    """Bring the schema to Alembic's head (a no-op when it is there already)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", MIGRATIONS)
    with _MIGRATING, engine.connect() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class FeedbackStore:
    """Rows of feedback in one database. Opened lazily: the first call connects and migrates,
    so a server starts (and predicts) while its database is down."""

    def __init__(self, setting: str, max_items: int):
        self.url = database_url(setting)
        self.max_items = max_items
        if self.dialect not in ("sqlite", "postgresql"):
            raise ValueError("FEEDBACK_DB must be a SQLite file path or a postgresql:// URL, "
                             f"not a {self.dialect} URL")
        if self.dialect == "postgresql" and importlib.util.find_spec("psycopg") is None:
            raise ValueError("FEEDBACK_DB is a PostgreSQL URL but its driver is missing: "
                             "pip install 'convnet[postgres]' (psycopg 3)")
        self._engine: Engine | None = None
        self._lock = threading.Lock()

    @property
    def dialect(self) -> str:
        return self.url.split(":", 1)[0].split("+", 1)[0]

    def engine(self) -> Engine:
        with self._lock:
            if self._engine is None:
                engine = make_engine(self.url)
                try:
                    upgrade(engine)
                except DATABASE_ERRORS as exc:
                    engine.dispose()
                    raise StoreUnavailable(_reason(exc)) from exc
                self._engine = engine
            return self._engine

    def _writing(self) -> Session:
        """A session for one write transaction, taken in turn with every other writer."""
        session = Session(self.engine())
        session.begin()
        if self.dialect == "postgresql":
            session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADD_LOCK})
        return session

    def _insert(self, session: Session, item: NewFeedback) -> int:
        if (session.scalar(select(func.count(Feedback.id))) or 0) >= self.max_items:
            raise StoreFull(f"the feedback store is full ({self.max_items} items)")
        row = Feedback(
            created_at=datetime.now(UTC), label=item.label, predicted=item.predicted,
            model_name=item.model_name, model_version=item.model_version, source=item.source,
            note=item.note, media_type=item.media_type,
            sha256=hashlib.sha256(item.image).hexdigest(), image=item.image,
        )
        session.add(row)
        session.flush()
        return row.id

    def add(self, item: NewFeedback) -> int:
        """Store one item and commit; its id. StoreFull at max_items rows."""
        try:
            with self._writing() as session:
                item_id = self._insert(session, item)
                session.commit()
                return item_id
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(_reason(exc)) from exc

    def keep(self, images: list[Kept], max_kept: int, keep_seconds: float) -> list[str]:
        """Keep predicted images (without ids) for `keep_seconds`; their new prediction_ids.
        Expired ones go first; StoreFull if more than `max_kept` would be waiting."""
        now = datetime.now(UTC)
        try:
            with self._writing() as session:
                session.execute(delete(Kept).where(
                    Kept.created_at < now - timedelta(seconds=keep_seconds)))
                waiting = session.scalar(select(func.count(Kept.id))) or 0
                if waiting + len(images) > max_kept:
                    raise StoreFull(f"{waiting} predictions are kept already, the limit is "
                                    f"{max_kept}")
                for kept in images:
                    kept.id, kept.created_at = secrets.token_hex(16), now
                    session.add(kept)
                session.commit()
                return [kept.id for kept in images]
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(_reason(exc)) from exc

    def add_kept(self, prediction_id: str, label: str, note: str | None,
                 keep_seconds: float) -> tuple[int, NewFeedback]:
        """Feedback on a kept image: stored as an item, the kept image let go; (item id, the
        item). UnknownPrediction if there is none by that id (any more)."""
        oldest = datetime.now(UTC) - timedelta(seconds=keep_seconds)
        try:
            with self._writing() as session:
                kept = session.get(Kept, prediction_id)
                if kept is None or _aware(kept.created_at) < oldest:
                    raise UnknownPrediction(prediction_id)
                item = NewFeedback(
                    label=label, image=kept.image, media_type=kept.media_type,
                    model_name=kept.model_name, model_version=kept.model_version,
                    predicted=kept.predicted, note=note)
                item_id = self._insert(session, item)
                session.delete(kept)
                session.commit()
                return item_id, item
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(_reason(exc)) from exc

    def count(self) -> int:
        try:
            with Session(self.engine()) as session:
                return session.scalar(select(func.count(Feedback.id))) or 0
        except DATABASE_ERRORS as exc:
            raise StoreUnavailable(_reason(exc)) from exc

    def items(self, batch: int = 100) -> Iterator[Feedback]:
        """Every row, oldest first, `batch` rows (and their images) in memory at a time."""
        last = 0
        with Session(self.engine()) as session:
            while True:
                rows = session.scalars(select(Feedback).where(Feedback.id > last)
                                       .order_by(Feedback.id).limit(batch)).all()
                session.expunge_all()
                session.commit()  # end the transaction: on SQLite it holds the write lock
                if not rows:
                    return
                yield from rows
                last = rows[-1].id

    def close(self) -> None:
        with self._lock:
            if self._engine is not None:
                self._engine.dispose()
                self._engine = None


def _aware(moment: datetime) -> datetime:
    """SQLite gives back naive datetimes; every one stored here is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _reason(exc: Exception) -> str:
    """A short, path- and password-free reason for a client: the driver's first line only."""
    original = getattr(exc, "orig", None) or exc
    first = str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__
    return first[:200]
