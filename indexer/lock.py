"""One writer per bundle: the exclusive lock an indexing run holds from start to end.

Two `xmodal index` runs on one bundle would race on everything they share (schema
creation, row ids, the index files one publishes and the other deletes). A writing run
therefore holds

* an ``fcntl.flock`` on ``index.lock`` in the bundle (released by the kernel when the
  process ends, however it ends, so a killed run never leaves a stale lock); the file
  holds the holder's pid, for the message the next writer gets;
* when the catalog lives in PostgreSQL, also a session advisory lock in that database
  (the catalog is what runs from other machines or other bundle folders share; flock
  does not reach them). Its key is derived from the catalog's schema, as advisory locks
  are already scoped to one database.

A second writer does not wait: it is refused at once with the holder's pid. Readers
(search, serve, verify) never take the lock. The lock file is never deleted: removing
it while another process waits on it would let two writers in.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from pathlib import Path

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from xmodal.crossmodal.errors import XmodalError

from .catalog import open_engine

LOCK_FILE = "index.lock"
# First key of the two-int advisory lock: names xmodal's writer lock in pg_locks.
PG_LOCK_CLASS = 0x786D6F64  # "xmod"
_APP_NAME_PREFIX = "xmodal index pid "


class LockHeld(XmodalError):
    """Another process holds the writer lock; ``pid`` is its process id when known."""

    def __init__(self, where: str, pid: int | None) -> None:
        self.where = where
        self.pid = pid
        super().__init__(f"{where} is being indexed by pid {pid if pid else 'unknown'}")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode("ascii").strip() or 0) or None
    return None


class BundleLock:
    """The writer lock of a bundle (and of its PostgreSQL catalog, when it has one)."""

    def __init__(self, bundle: Path, url: str | None = None) -> None:
        self.bundle = Path(bundle)
        self.url = url
        self._fd: int | None = None
        self._engine: Engine | None = None
        self._conn: Connection | None = None

    def acquire(self) -> BundleLock:
        """Take the lock or raise LockHeld naming the holder; the bundle folder must exist."""
        fd = os.open(self.bundle / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _read_pid(fd)
            os.close(fd)
            raise LockHeld(f"bundle {self.bundle}", pid) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd
        try:
            if self.url and _is_postgres(self.url):
                self._lock_postgres(self.url)
        except BaseException:
            self.release()
            raise
        return self

    def _lock_postgres(self, url: str) -> None:
        self._engine = open_engine(url)
        conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        self._conn = conn
        schema = conn.execute(text("SELECT current_schema()")).scalar() or ""
        key = _schema_key(schema)
        # The holder's pid, for the refusal message of the next writer (pg_stat_activity).
        conn.execute(text("SELECT set_config('application_name', :n, false)"), {"n": _app_name()})
        got = conn.execute(
            text("SELECT pg_try_advisory_lock(:c, :k)"), {"c": PG_LOCK_CLASS, "k": key}
        ).scalar()
        if not got:
            holder = conn.execute(
                text(
                    "SELECT a.application_name FROM pg_locks l "
                    "JOIN pg_stat_activity a ON a.pid = l.pid "
                    "WHERE l.locktype = 'advisory' AND l.granted "
                    "AND l.classid = :c AND l.objid = :k AND l.objsubid = 2"
                ),
                {"c": PG_LOCK_CLASS, "k": key},
            ).scalar()
            pid = None
            if holder and holder.startswith(_APP_NAME_PREFIX):
                with contextlib.suppress(ValueError):
                    pid = int(holder[len(_APP_NAME_PREFIX) :])
            where = make_url(url).render_as_string(hide_password=True)
            raise LockHeld(f"catalog {where}", pid)

    def release(self) -> None:
        """Let the next writer in (also done by the kernel and the server on exit)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a lost connection has released it too
                self._conn.execute(text("SELECT pg_advisory_unlock_all()"))
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)  # no pid: nobody holds it
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> BundleLock:
        return self if self._fd is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def writer_pid(bundle: Path) -> int | None:
    """The pid of a run holding the bundle's writer lock now, else None.

    It lets a command refuse early, before loading a model; the run itself still takes
    the lock. Only a file naming a pid (a run holds it, or one was killed) is probed,
    with a shared lock dropped at once, so a writer starting meanwhile is rarely crossed.
    """
    try:
        fd = os.open(Path(bundle) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None  # no lock file: never indexed, or not readable; the run decides
    try:
        pid = _read_pid(fd)
        if pid is None:
            return None
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return pid
    finally:
        os.close(fd)  # also drops the probe's own shared lock
    return None


def _is_postgres(url: str) -> bool:
    """Whether ``url`` names a PostgreSQL database (a malformed URL is left to the catalog)."""
    try:
        return make_url(url).get_backend_name() == "postgresql"
    except ArgumentError:
        return False


def _schema_key(schema: str) -> int:
    """Second advisory key: a positive int4 from the catalog's schema name."""
    return int.from_bytes(hashlib.sha256(schema.encode("utf-8")).digest()[:4], "big") & 0x7FFFFFFF


def _app_name() -> str:
    return f"{_APP_NAME_PREFIX}{os.getpid()}"


__all__ = ["LOCK_FILE", "BundleLock", "LockHeld", "writer_pid"]
