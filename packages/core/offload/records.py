"""The local record of submitted jobs (SQLite), so ``offload status`` lists them across restarts and any
process on this machine can reattach to a job by id. Secrets are never recorded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import platformdirs

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    site TEXT NOT NULL,
    job_id TEXT NOT NULL,
    name TEXT,
    jobdir TEXT NOT NULL,
    task_index INTEGER,
    command TEXT,
    image TEXT,
    submitted_at REAL NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    exit_code INTEGER,
    updated_at REAL NOT NULL,
    PRIMARY KEY (site, job_id)
);
CREATE INDEX IF NOT EXISTS jobs_by_time ON jobs (submitted_at);
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs (site, name);
CREATE TABLE IF NOT EXISTS placements (
    id TEXT PRIMARY KEY,
    name TEXT,
    state TEXT NOT NULL,
    attempts TEXT NOT NULL,
    claiming TEXT,
    plan TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS starts (
    site TEXT NOT NULL,
    planned REAL NOT NULL,
    waited REAL NOT NULL,
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS starts_by_site ON starts (site, at);
"""


@dataclass(frozen=True)
class JobRecord:
    site: str
    job_id: str
    name: str | None
    jobdir: str
    task_index: int | None
    command: list[str]
    image: str | None
    submitted_at: float
    state: str
    reason: str
    exit_code: int | None
    updated_at: float


def write_private(path: Path, text: str) -> None:
    """Create or replace ``path`` readable by this user only (0600, in a 0700 directory if it makes one)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def default_path() -> Path:
    base = os.environ.get("OFFLOAD_STATE_DIR") or platformdirs.user_state_dir("offload")
    return Path(base) / "jobs.sqlite"


class JobRecords:
    """A small SQLite table, safe to use from several threads and processes."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or default_path()
        # Every job's argv is in here: the directory is 0700 and the database 0600, made so before it exists.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        os.chmod(self.path, 0o600)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; one fsync per checkpoint, not per job
        self._db.executescript(_SCHEMA)

    def add(self, rows: list[tuple[str, str, str | None, str, int | None, list[str], str | None]]) -> None:
        now = time.time()
        with self._lock, self._db:  # one transaction for the whole batch
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'PENDING', '', NULL, ?)",
                [(s, j, n, d, i, json.dumps(c), img, now, now) for s, j, n, d, i, c, img in rows],
            )

    def update(self, site: str, job_id: str, state: str, reason: str, exit_code: int | None) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET state = ?, reason = ?, exit_code = ?, updated_at = ? WHERE site = ? AND job_id = ?",
                (state, reason, exit_code, time.time(), site, job_id),
            )

    def get(self, site: str, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE site = ? AND job_id = ?", (site, job_id)).fetchone()
        return _record(row) if row else None

    def sites_of(self, job_id: str) -> list[str]:
        """The sites on which this machine submitted a job with this id."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT site FROM jobs WHERE job_id = ?", (job_id,)).fetchall()
        return [r[0] for r in rows]

    def find(self, site: str | None = None, name: str | None = None, limit: int = 50) -> list[JobRecord]:
        query, args = "SELECT * FROM jobs WHERE 1=1", []
        if site:
            query += " AND site = ?"
            args.append(site)
        if name:
            query += " AND name = ?"
            args.append(name)
        query += " ORDER BY submitted_at DESC, job_id DESC LIMIT ?"
        args.append(limit)
        with self._lock:
            rows = self._db.execute(query, args).fetchall()
        return [_record(r) for r in rows]

    # -- starts (offload.estimates): how long a site's jobs waited, against what its scheduler planned ---------

    def learn_start(self, site: str, planned: float, waited: float) -> None:
        with self._lock:
            self._db.execute("INSERT INTO starts VALUES (?, ?, ?, ?)", (site, planned, waited, time.time()))

    def starts_learnt(self, site: str, limit: int) -> list[tuple[float, float]]:
        """The site's last ``limit`` starts, newest first, as (planned, waited) seconds."""
        with self._lock:
            rows = self._db.execute("SELECT planned, waited FROM starts WHERE site = ? ORDER BY at DESC LIMIT ?",
                                    (site, limit)).fetchall()  # fmt: skip
        return [(float(planned), float(waited)) for planned, waited in rows]

    # -- placements (offload.placement): written before any of their attempts is submitted ------------------

    def save_placement(self, placement: PlacementRecord) -> None:
        """Create or replace a placement's record, in one statement (a crash leaves the old one or the new)."""
        now = time.time()
        attempts = json.dumps([dataclasses.asdict(a) for a in placement.attempts])
        plan = json.dumps({"spec": placement.spec, "next_sites": placement.next_sites, "width": placement.width,
                           "wait": placement.wait, "patience": placement.patience})  # fmt: skip
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO placements VALUES (?, ?, ?, ?, ?, ?, "
                "COALESCE((SELECT created_at FROM placements WHERE id = ?), ?), ?)",
                (
                    placement.id,
                    placement.name,
                    placement.state,
                    attempts,
                    placement.claiming,
                    plan,
                    placement.id,
                    now,
                    now,
                ),
            )

    def placement(self, placement_id: str) -> PlacementRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM placements WHERE id = ?", (placement_id,)).fetchone()
        return _placement(row) if row else None

    def placements(self, limit: int = 50) -> list[PlacementRecord]:
        """The newest placements first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM placements ORDER BY created_at DESC LIMIT ?", (limit,)).fetchall()
        return [_placement(r) for r in rows]


@dataclass(frozen=True)
class Attempt:
    """One site's attempt of a placement: its directory there (chosen, and recorded, before it is submitted) and,
    once known, its job id; ``state`` is ``planned``, ``queued``, ``claimed``, ``released`` or ``refused``."""

    site: str
    jobdir: str
    job_id: str | None = None
    state: str = "planned"
    reason: str = ""
    submitted_at: float = 0.0
    planned: float | None = None  # seconds its scheduler planned it to wait (what its start teaches the site)
    due: float | None = None  # when it is overdue (a time.time()): the next site then gets an attempt too
    overdue: bool = False


@dataclass(frozen=True)
class PlacementRecord:
    """A job placed over several sites: its attempts, and the one being claimed (set before the claim is made,
    so a restarted client finishes that claim instead of making another). ``state``: ``placing``, ``placed``
    (an attempt was claimed) or ``failed``."""

    id: str
    name: str | None
    state: str
    attempts: tuple[Attempt, ...]
    claiming: str | None = None  # "site/job_id"
    # What a restarted client needs to go on: the spec as JSON (None if it has secrets: never written down), the
    # sites not tried yet, how many attempts at once, and how long an attempt waits for its claim.
    spec: str | None = None
    next_sites: tuple[str, ...] = ()
    width: int = 1
    wait: int = 600
    patience: float | None = None  # seconds an attempt may wait past its expected start (None: forever)
    created_at: float = 0.0
    updated_at: float = 0.0


def _placement(row: tuple) -> PlacementRecord:
    pid, name, state, attempts, claiming, plan, created, updated = row
    plan = json.loads(plan)
    return PlacementRecord(pid, name, state, tuple(Attempt(**a) for a in json.loads(attempts)), claiming,
                           plan["spec"], tuple(plan["next_sites"]), plan["width"], plan["wait"],
                           plan.get("patience"), created, updated)  # fmt: skip


def _record(row: tuple) -> JobRecord:
    values = list(row)
    values[5] = json.loads(values[5] or "[]")
    return JobRecord(*values)
