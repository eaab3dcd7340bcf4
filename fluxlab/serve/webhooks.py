"""Webhooks the way Replicate and the Standard Webhooks spec send them: the job object as the body, signed with
HMAC-SHA256 under a per-server secret, retried with backoff, never blocking the worker or a cancel.

Headers: `webhook-id` (unique per message; a receiver may see a message twice and should deduplicate on it),
`webhook-timestamp` (Unix seconds), `webhook-signature` = "v1," + base64(HMAC-SHA256(secret, "{id}.{timestamp}.
{body}")), the secret being the base64 part of "whsec_...".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from .store import new_id

EVENTS = ("start", "output", "logs", "completed")
log = logging.getLogger("fluxlab.serve")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def verify(secret: str, headers: dict, body: bytes, tolerance_s: int = 300) -> bool:
    """What a receiver checks (used by fluxlab.Client and the tests)."""
    try:
        ts = int(headers["webhook-timestamp"])
        expected = sign(secret, headers["webhook-id"], ts, body)
    except (KeyError, ValueError):
        return False
    if abs(time.time() - ts) > tolerance_s:
        return False
    return any(hmac.compare_digest(expected, s) for s in headers.get("webhook-signature", "").split())


class Webhooks:
    def __init__(self, secret: str, retries: int = 4, backoff_s: float = 0.5):
        self.secret, self.retries, self.backoff_s = secret, retries, backoff_s
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="webhook")
        self.last_output: dict[str, float] = {}
        # A job's messages go out in order (start before output before completed): one drain per job at a time.
        self.lock = threading.Lock()
        self.waiting: dict[str, deque] = {}

    def wanted(self, job: dict, event: str) -> bool:
        if not job.get("webhook"):
            return False
        filt = job.get("webhook_events")
        return event in (filt if filt is not None else EVENTS)

    def send(self, job: dict, event: str, body: dict) -> None:
        """Queue one delivery (output events at most every 500 ms per job, as Replicate throttles them)."""
        if not self.wanted(job, event):
            return
        if event == "output":
            now = time.monotonic()
            if now - self.last_output.get(job["id"], 0.0) < 0.5:
                return
            self.last_output[job["id"]] = now
        with self.lock:
            backlog = self.waiting.get(job["id"])
            if backlog is not None:
                backlog.append((job["webhook"], json.dumps(body).encode()))
                return
            self.waiting[job["id"]] = deque([(job["webhook"], json.dumps(body).encode())])
        self.pool.submit(self._drain, job["id"])

    def _drain(self, job_id: str) -> None:
        while True:
            with self.lock:
                backlog = self.waiting[job_id]
                if not backlog:
                    del self.waiting[job_id]
                    return
                url, body = backlog.popleft()
            self._deliver(url, body)

    def _deliver(self, url: str, body: bytes) -> None:
        import httpx

        msg_id = "msg_" + new_id()
        for attempt in range(self.retries):
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "webhook-signature": sign(self.secret, msg_id, ts, body)}
            try:
                r = httpx.post(url, content=body, headers=headers, timeout=5.0, follow_redirects=False)
                if 200 <= r.status_code < 300:
                    return
            except httpx.HTTPError as e:
                log.info("webhook %s attempt %d: %s", url, attempt + 1, e)
            time.sleep(self.backoff_s * 2**attempt)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
