"""The server's durable state in one SQLite file: tokens, jobs, uploaded files, outputs and LoRAs.

The standard sqlite3 module in WAL mode with synchronous=NORMAL (a committed job survives a kill -9 of the
server; a power cut may lose the last transactions, never corrupt the file), a busy timeout, and a numbered
migration table so a newer fluxlab upgrades an older data folder in place. One connection per thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from base64 import b32encode
from pathlib import Path

MIGRATIONS = [
    # 1: the first layout.
    """
    CREATE TABLE tokens (name TEXT PRIMARY KEY, sha256 TEXT UNIQUE NOT NULL, created_at REAL NOT NULL,
                         revoked_at REAL);
    CREATE TABLE jobs (id TEXT PRIMARY KEY, kind TEXT NOT NULL, owner TEXT NOT NULL, model TEXT NOT NULL,
                       input TEXT NOT NULL, plan TEXT NOT NULL, status TEXT NOT NULL, error TEXT,
                       priority INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL, created_at REAL NOT NULL,
                       dispatched_at REAL, started_at REAL, completed_at REAL, metrics TEXT NOT NULL DEFAULT '{}',
                       output TEXT NOT NULL DEFAULT '[]', webhook TEXT, webhook_events TEXT,
                       resume INTEGER NOT NULL DEFAULT 0);
    CREATE INDEX jobs_queue ON jobs(status, priority DESC, seq);
    CREATE INDEX jobs_owner ON jobs(owner, seq DESC);
    CREATE TABLE files (id TEXT PRIMARY KEY, owner TEXT NOT NULL, name TEXT NOT NULL, bytes INTEGER NOT NULL,
                        sha256 TEXT NOT NULL, kind TEXT NOT NULL, path TEXT NOT NULL, created_at REAL NOT NULL);
    CREATE TABLE outputs (id TEXT PRIMARY KEY, job_id TEXT NOT NULL, owner TEXT NOT NULL, idx INTEGER NOT NULL,
                          kind TEXT NOT NULL, path TEXT NOT NULL, seed INTEGER, created_at REAL NOT NULL,
                          UNIQUE (job_id, kind, idx));
    CREATE TABLE loras (name TEXT PRIMARY KEY, owner TEXT NOT NULL, job_id TEXT, path TEXT NOT NULL,
                        sha256 TEXT NOT NULL, trigger TEXT, created_at REAL NOT NULL);
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
    # 2: browser sessions (the page's login): only the cookie's SHA-256 is stored.
    """
    CREATE TABLE sessions (sha256 TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL,
                           expires_at REAL NOT NULL);
    """,
    # 3: tenants apart: LoRA names are per owner, each token has a role and its own webhook signing secret (the
    # oldest token of an existing folder becomes its admin).
    """
    CREATE TABLE loras_v3 (name TEXT NOT NULL, owner TEXT NOT NULL, job_id TEXT, path TEXT NOT NULL,
                           sha256 TEXT NOT NULL, trigger TEXT, created_at REAL NOT NULL, PRIMARY KEY (owner, name));
    INSERT INTO loras_v3 SELECT name, owner, job_id, path, sha256, trigger, created_at FROM loras;
    DROP TABLE loras;
    ALTER TABLE loras_v3 RENAME TO loras;
    ALTER TABLE tokens ADD COLUMN role TEXT NOT NULL DEFAULT 'user';
    ALTER TABLE tokens ADD COLUMN webhook_secret TEXT;
    UPDATE tokens SET role = 'admin' WHERE name = (SELECT name FROM tokens ORDER BY created_at LIMIT 1);
    DELETE FROM settings WHERE key = 'webhook_secret'
    """,
    # 4: Replicate's shapes: each token's own models (training destinations; their versions are the trainings
    # that succeeded into them), and an upload's metadata as the client gave it.
    """
    CREATE TABLE models (owner TEXT NOT NULL, name TEXT NOT NULL, description TEXT, visibility TEXT NOT NULL,
                         created_at REAL NOT NULL, PRIMARY KEY (owner, name));
    ALTER TABLE files ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'
    """,
    # 5: several workers: a dispatched job holds a lease (which worker, a random lease id, its last heartbeat),
    # and counts its attempts (a job a dead worker held may be queued again once).
    """
    ALTER TABLE jobs ADD COLUMN worker TEXT;
    ALTER TABLE jobs ADD COLUMN lease TEXT;
    ALTER TABLE jobs ADD COLUMN heartbeat_at REAL;
    ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0
    """,
]
ROLES = ("admin", "user")
SESSION_DAYS = 14

TERMINAL = ("succeeded", "failed", "canceled")


class LimitReached(Exception):
    """A queue limit is reached (the API answers 429)."""


def new_id() -> str:
    """26 lowercase base32 characters (128 random bits), the shape cog recommends for prediction ids."""
    return b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def exists(data: Path) -> bool:
    return (Path(data) / "fluxlab.db").exists()


class Store:
    def __init__(self, data: Path, check: bool = False):
        """Open (or create) the store in `data`. With `check`, a damaged file is found now (PRAGMA quick_check)
        instead of when a request first touches its bad page. Either way a damaged or unreadable database is one
        UserError naming the file."""
        self.data = Path(data)
        self.path = self.data / "fluxlab.db"
        self._local = threading.local()
        self._seq_lock = threading.Lock()
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            if self.path.exists() and not self.path.is_file():
                raise sqlite3.DatabaseError("it is not a file")
            self.migrate()
            for suffix in ("", "-wal", "-shm"):  # tokens, jobs and sessions: for the server's user alone
                with contextlib.suppress(OSError):
                    os.chmod(f"{self.path}{suffix}", 0o600)
            if check:
                result = self.db.execute("PRAGMA quick_check").fetchone()[0]
                if result != "ok":
                    raise sqlite3.DatabaseError(str(result).splitlines()[0])
        except sqlite3.DatabaseError as e:
            from ..errors import UserError

            raise UserError(f"{self.path}: the server's database cannot be used ({e}); move it away (a new one is "
                            f"made) or restore it from a backup") from None

    # -- connections ------------------------------------------------------------------------------
    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    def migrate(self) -> None:
        db = self.db
        db.execute("CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
        done = {r[0] for r in db.execute("SELECT version FROM migrations")}
        for version, sql in enumerate(MIGRATIONS, start=1):
            if version in done:
                continue
            db.execute("BEGIN IMMEDIATE")
            try:
                for statement in filter(str.strip, sql.split(";")):
                    db.execute(statement)
                db.execute("INSERT INTO migrations VALUES (?, ?)", (version, time.time()))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    # -- settings -----------------------------------------------------------------------------------
    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO settings VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    def secret(self, owner: str) -> str:
        """The owner's webhook signing secret (made on first use, kept across restarts, one per token)."""
        row = self.db.execute("SELECT webhook_secret FROM tokens WHERE name = ?", (owner,)).fetchone()
        if row is None:
            raise KeyError(owner)
        return row[0] or self.rotate_secret(owner, only_if_none=True)

    def rotate_secret(self, owner: str, only_if_none: bool = False) -> str:
        """A new signing secret for the owner's webhooks (the old one stops verifying at once)."""
        from base64 import b64encode

        value = "whsec_" + b64encode(secrets.token_bytes(24)).decode()
        self.db.execute("UPDATE tokens SET webhook_secret = ? WHERE name = ?"
                        + (" AND webhook_secret IS NULL" if only_if_none else ""), (value, owner))
        return self.db.execute("SELECT webhook_secret FROM tokens WHERE name = ?", (owner,)).fetchone()[0]

    # -- tokens -------------------------------------------------------------------------------------
    def create_token(self, name: str, token: str | None = None, admin: bool | None = None) -> str:
        """A new token (printed once; only its SHA-256 is kept). The first token of a store is its admin."""
        token = token or "flx_" + secrets.token_urlsafe(32)
        with self._seq_lock:
            if admin is None:
                admin = self.db.execute("SELECT COUNT(*) FROM tokens").fetchone()[0] == 0
            try:
                self.db.execute("INSERT INTO tokens (name, sha256, created_at, revoked_at, role) VALUES "
                                "(?, ?, ?, NULL, ?)", (name, token_hash(token), time.time(),
                                                       "admin" if admin else "user"))
            except sqlite3.IntegrityError:
                from ..errors import UserError

                raise UserError(f"a token named {name!r} exists already; revoke it first or choose another "
                                f"name") from None
        return token

    def ensure_token(self, name: str, token: str) -> None:
        """A token given by the environment (FLUXLAB_TOKEN): present once, under `name`."""
        h = token_hash(token)
        if not self.db.execute("SELECT 1 FROM tokens WHERE sha256 = ?", (h,)).fetchone():
            self.db.execute("DELETE FROM tokens WHERE name = ?", (name,))
            self.create_token(name, token)

    def role(self, name: str) -> str | None:
        row = self.db.execute("SELECT role FROM tokens WHERE name = ? AND revoked_at IS NULL", (name,)).fetchone()
        return row[0] if row else None

    def tokens(self) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT name, role, created_at, revoked_at FROM tokens "
                                                 "ORDER BY created_at")]

    def active_tokens(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM tokens WHERE revoked_at IS NULL").fetchone()[0]

    def revoke(self, name: str) -> bool:
        cur = self.db.execute("UPDATE tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                              (time.time(), name))
        return cur.rowcount > 0

    def owner_of(self, token: str) -> str | None:
        row = self.db.execute("SELECT name FROM tokens WHERE sha256 = ? AND revoked_at IS NULL",
                              (token_hash(token),)).fetchone()
        return row[0] if row else None

    # -- browser sessions -------------------------------------------------------------------------------
    def create_session(self, owner: str) -> str:
        cookie = secrets.token_urlsafe(32)
        now = time.time()
        self.db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (token_hash(cookie), owner, now,
                                                                     now + SESSION_DAYS * 86400))
        return cookie

    def session_owner(self, cookie: str) -> str | None:
        """The owner of a live session whose token is still active."""
        row = self.db.execute(
            "SELECT s.owner FROM sessions s JOIN tokens t ON t.name = s.owner AND t.revoked_at IS NULL "
            "WHERE s.sha256 = ? AND s.expires_at > ?", (token_hash(cookie), time.time())).fetchone()
        return row[0] if row else None

    def end_session(self, cookie: str) -> None:
        self.db.execute("DELETE FROM sessions WHERE sha256 = ?", (token_hash(cookie),))

    # -- jobs ---------------------------------------------------------------------------------------
    def add_job(self, job_id: str, kind: str, owner: str, model: str, input: dict, plan: dict,
                webhook: str | None, webhook_events: list | None, priority: int = 0,
                limits: tuple[int, int] | None = None) -> dict | None:
        """Insert a job (status starting). None if the id exists already (idempotent create). With `limits`
        (pending per owner, pending in all), the count and the insert are one step: LimitReached when full."""
        with self._seq_lock:
            if limits is not None:
                if self.pending_count(owner) >= limits[0]:
                    raise LimitReached(f"this token has {limits[0]} pending jobs, the most allowed; wait for some "
                                       f"to finish")
                if self.pending_count() >= limits[1]:
                    raise LimitReached(f"the queue holds {limits[1]} pending jobs, the most allowed")
            seq = (self.db.execute("SELECT COALESCE(MAX(seq), 0) FROM jobs").fetchone()[0] or 0) + 1
            try:
                self.db.execute(
                    "INSERT INTO jobs (id, kind, owner, model, input, plan, status, priority, seq, created_at, "
                    "webhook, webhook_events) VALUES (?, ?, ?, ?, ?, ?, 'starting', ?, ?, ?, ?, ?)",
                    (job_id, kind, owner, model, json.dumps(input), json.dumps(plan), priority, seq, time.time(),
                     webhook, json.dumps(webhook_events) if webhook_events is not None else None))
            except sqlite3.IntegrityError:
                return None
        return self.job(job_id)

    def job(self, job_id: str) -> dict | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def jobs(self, owner: str, kind: str, before_seq: int | None, limit: int) -> list[dict]:
        sql = "SELECT * FROM jobs WHERE owner = ? AND kind = ?"
        args: list = [owner, kind]
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        sql += " ORDER BY seq DESC LIMIT ?"
        args.append(limit)
        return [_job(r) for r in self.db.execute(sql, args)]

    def pending(self) -> list[dict]:
        return [_job(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE status = 'starting' AND dispatched_at IS NULL ORDER BY priority DESC, seq")]

    def pending_count(self, owner: str | None = None) -> int:
        sql = "SELECT COUNT(*) FROM jobs WHERE status = 'starting'"
        return self.db.execute(sql + (" AND owner = ?" if owner else ""), (owner,) if owner else ()).fetchone()[0]

    def update(self, job_id: str, **fields) -> None:
        for key in ("metrics", "output"):
            if key in fields and not isinstance(fields[key], str):
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*fields.values(), job_id))

    def finish(self, job_id: str, status: str, error: str | None = None, metrics: dict | None = None) -> bool:
        """Mark a job terminal (once: a job already terminal is left as it is)."""
        fields = {"status": status, "error": error, "completed_at": time.time()}
        if metrics is not None:
            fields["metrics"] = json.dumps(metrics)
        cols = ", ".join(f"{k} = ?" for k in fields)
        cur = self.db.execute(f"UPDATE jobs SET {cols} WHERE id = ? AND status NOT IN "
                              "('succeeded', 'failed', 'canceled')", (*fields.values(), job_id))
        return cur.rowcount > 0

    def take(self, job_id: str, worker: str) -> str | None:
        """Lease a pending job to a worker: one step, so a job is never held by two. The lease id, or None when the
        job is no longer pending (canceled, or taken)."""
        lease = secrets.token_hex(8)
        now = time.time()
        cur = self.db.execute("UPDATE jobs SET dispatched_at = ?, worker = ?, lease = ?, heartbeat_at = ?, "
                              "attempts = attempts + 1 WHERE id = ? AND status = 'starting' AND dispatched_at IS "
                              "NULL", (now, worker, lease, now, job_id))
        return lease if cur.rowcount == 1 else None

    def beat(self, job_id: str, lease: str) -> bool:
        """The lease's worker is alive; False when the job is no longer held by that lease."""
        cur = self.db.execute("UPDATE jobs SET heartbeat_at = ? WHERE id = ? AND lease = ? AND status NOT IN "
                              "('succeeded', 'failed', 'canceled')", (time.time(), job_id, lease))
        return cur.rowcount == 1

    def requeue(self, job_id: str, lease: str) -> bool:
        """Put a job its (lost) lease held back in the queue, at its old place."""
        cur = self.db.execute("UPDATE jobs SET status = 'starting', dispatched_at = NULL, started_at = NULL, "
                              "worker = NULL, lease = NULL, heartbeat_at = NULL WHERE id = ? AND lease = ? AND "
                              "status NOT IN ('succeeded', 'failed', 'canceled')", (job_id, lease))
        return cur.rowcount == 1

    def interrupt_running(self) -> list[str]:
        """At start-up: jobs left processing (or dispatched) by a server that died are failed, never re-run."""
        ids = [r[0] for r in self.db.execute(
            "SELECT id FROM jobs WHERE status = 'processing' OR (status = 'starting' AND dispatched_at IS NOT NULL)")]
        for job_id in ids:
            self.finish(job_id, "failed", "interrupted")
        return ids

    def position(self, job: dict) -> int | None:
        if job["status"] != "starting" or job.get("dispatched_at") is not None:
            return None
        return self.db.execute(
            "SELECT COUNT(*) FROM jobs WHERE status = 'starting' AND dispatched_at IS NULL AND "
            "(priority > ? OR (priority = ? AND seq < ?))", (job["priority"], job["priority"], job["seq"])
        ).fetchone()[0] + 1

    # -- files, outputs, loras ------------------------------------------------------------------------
    def add_file(self, owner: str, name: str, size: int, sha256: str, kind: str, path: str,
                 metadata: dict | None = None) -> dict:
        file_id = "file_" + new_id()
        self.db.execute("INSERT INTO files (id, owner, name, bytes, sha256, kind, path, created_at, metadata) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", (file_id, owner, name, size, sha256, kind, path,
                                                              time.time(), json.dumps(metadata or {})))
        return self.file(file_id, owner)

    def file(self, file_id: str, owner: str) -> dict | None:
        row = self.db.execute("SELECT * FROM files WHERE id = ? AND owner = ?", (file_id, owner)).fetchone()
        return _file(row) if row else None

    def files(self, owner: str) -> list[dict]:
        return [_file(r) for r in self.db.execute("SELECT * FROM files WHERE owner = ? ORDER BY created_at DESC",
                                                  (owner,))]

    def file_with(self, owner: str, sha256: str, kind: str) -> dict | None:
        """The owner's upload with these bytes, if any (an input URL fetched twice is kept once)."""
        row = self.db.execute("SELECT * FROM files WHERE owner = ? AND sha256 = ? AND kind = ? ORDER BY created_at "
                              "LIMIT 1", (owner, sha256, kind)).fetchone()
        return _file(row) if row else None

    def add_output(self, job_id: str, owner: str, idx: int, kind: str, path: str, seed: int | None) -> dict:
        row = self.db.execute("SELECT * FROM outputs WHERE job_id = ? AND kind = ? AND idx = ?",
                              (job_id, kind, idx)).fetchone()
        if row:  # the same output reported twice is one output
            return dict(row)
        out_id = "out_" + new_id()
        self.db.execute("INSERT INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (out_id, job_id, owner, idx, kind, path, seed, time.time()))
        return dict(self.db.execute("SELECT * FROM outputs WHERE id = ?", (out_id,)).fetchone())

    def outputs(self, job_id: str, kind: str | None = None) -> list[dict]:
        sql = "SELECT * FROM outputs WHERE job_id = ?" + (" AND kind = ?" if kind else "") + " ORDER BY idx"
        return [dict(r) for r in self.db.execute(sql, (job_id, kind) if kind else (job_id,))]

    def output(self, out_id: str, owner: str | None) -> dict | None:
        """The owner's output (owner None: any owner's, for a URL the server signed)."""
        row = self.db.execute("SELECT * FROM outputs WHERE id = ? AND (owner = ? OR ? IS NULL)",
                              (out_id, owner, owner)).fetchone()
        return dict(row) if row else None

    def recent_outputs(self, owner: str, before: float | None, limit: int, text: str | None = None,
                       model: str | None = None, lora_sha256: str | None = None) -> list[dict]:
        """The owner's images, newest first, each with its job's prompt and model; `text` keeps those whose prompt
        contains it (any case), `model` those of one model, `lora_sha256` those made with that LoRA file."""
        sql = ("SELECT o.*, j.model AS model, COALESCE(json_extract(j.plan, '$.request.prompt'), "
               "json_extract(j.input, '$.prompt')) AS prompt FROM outputs o LEFT JOIN jobs j ON j.id = o.job_id "
               "WHERE o.owner = ? AND o.kind = 'image'")
        args: list = [owner]
        if before is not None:
            sql += " AND o.created_at < ?"
            args.append(before)
        if text:
            sql += " AND prompt LIKE ? ESCAPE '\\'"
            args.append("%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%")
        if model:
            sql += " AND j.model = ?"
            args.append(model)
        if lora_sha256:
            sql += (" AND EXISTS (SELECT 1 FROM json_each(j.plan, '$.model.loras') l "
                    "WHERE json_extract(l.value, '$.sha256') = ?)")
            args.append(lora_sha256)
        return [dict(r) for r in self.db.execute(sql + " ORDER BY o.created_at DESC, o.idx DESC LIMIT ?",
                                                  (*args, limit))]

    def delete_output(self, out_id: str, owner: str) -> dict | None:
        row = self.output(out_id, owner)
        if row:
            self.db.execute("DELETE FROM outputs WHERE id = ?", (out_id,))
        return row

    def add_lora(self, name: str, owner: str, job_id: str | None, path: str, sha256: str, trigger: str | None):
        """Name a LoRA for its owner (names are per owner: another token's LoRA of the same name is untouched)."""
        self.db.execute("INSERT OR REPLACE INTO loras (name, owner, job_id, path, sha256, trigger, created_at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", (name, owner, job_id, path, sha256, trigger, time.time()))

    def lora(self, name: str, owner: str) -> dict | None:
        row = self.db.execute("SELECT * FROM loras WHERE (name = ? OR job_id = ?) AND owner = ?",
                              (name, name, owner)).fetchone()
        return dict(row) if row else None

    def loras(self, owner: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM loras WHERE owner = ? ORDER BY created_at",
                                                 (owner,))]

    # -- models (training destinations) ---------------------------------------------------------------
    def add_model(self, owner: str, name: str, description: str | None, visibility: str) -> bool:
        """A new model of the owner's; False when the owner has one of that name already."""
        try:
            self.db.execute("INSERT INTO models VALUES (?, ?, ?, ?, ?)",
                            (owner, name, description, visibility, time.time()))
        except sqlite3.IntegrityError:
            return False
        return True

    def model(self, owner: str, name: str) -> dict | None:
        row = self.db.execute("SELECT * FROM models WHERE owner = ? AND name = ?", (owner, name)).fetchone()
        return dict(row) if row else None

    def models(self, owner: str) -> list[dict]:
        return [dict(r) for r in self.db.execute("SELECT * FROM models WHERE owner = ? ORDER BY created_at",
                                                 (owner,))]

    def delete_model(self, owner: str, name: str) -> None:
        self.db.execute("DELETE FROM models WHERE owner = ? AND name = ?", (owner, name))

    def trained_into(self, owner: str, ref: str) -> list[dict]:
        """The owner's trainings that succeeded into the model `ref` (owner/name), newest first."""
        return [_job(r) for r in self.db.execute(
            "SELECT * FROM jobs WHERE owner = ? AND kind = 'training' AND status = 'succeeded' AND "
            "json_extract(plan, '$.destination') = ? ORDER BY seq DESC", (owner, ref))]

    def run_count(self, owner: str, model: str) -> int:
        return self.db.execute("SELECT COUNT(*) FROM jobs WHERE owner = ? AND kind = 'prediction' AND model = ?",
                               (owner, model)).fetchone()[0]


def _file(row) -> dict:
    f = dict(row)
    f["metadata"] = json.loads(f.get("metadata") or "{}")
    return f


def _job(row) -> dict:
    job = dict(row)
    for key in ("input", "plan", "metrics", "output"):
        job[key] = json.loads(job[key]) if job.get(key) else ({} if key != "output" else [])
    job["webhook_events"] = json.loads(job["webhook_events"]) if job.get("webhook_events") else None
    return job
