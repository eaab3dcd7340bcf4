"""Webhooks the way Replicate and the Standard Webhooks spec send them: the job object as the body, signed with
HMAC-SHA256 under its owner's secret, retried with backoff, never blocking the worker, a cancel, or another owner.

Headers: `webhook-id` (unique per message; a receiver may see a message twice and should deduplicate on it),
`webhook-timestamp` (Unix seconds), `webhook-signature` = "v1," + base64(HMAC-SHA256(secret, "{id}.{timestamp}.
{body}")), the secret being the base64 part of the owner's "whsec_..." (one per token, so a tenant's receiver
trusts only deliveries made for that tenant).

Fairness: each owner's messages wait in their own line (in order, so a job's `start` comes before its
`completed`) and an owner has at most one delivery in flight; the sending threads take owners in turn. A retry
waits for its backoff without holding a thread, connections and reads time out in seconds, and every delivery
checks its address again (serve.outbound) and connects to the address it checked.
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
from dataclasses import dataclass

from ..errors import UserError
from . import outbound
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


@dataclass
class Message:
    owner: str
    url: str
    body: bytes
    id: str
    attempt: int = 0
    due: float = 0.0


class Webhooks:
    def __init__(self, secret_of, policy: outbound.Policy | None = None, retries: int = 4, backoff_s: float = 0.5,
                 connect_s: float = 2.0, read_s: float = 5.0, threads: int = 4, resolve=outbound.system_resolve):
        self.secret_of, self.policy = secret_of, policy or outbound.Policy()  # secret_of(owner) -> "whsec_..."
        self.retries, self.backoff_s, self.resolve = retries, backoff_s, resolve
        self.timeout = (connect_s, read_s)
        self.last_output: dict[str, float] = {}
        self.lines: dict[str, deque] = {}  # owner -> messages in order
        self.turns: deque = deque()  # owners with messages, in turn
        self.busy: set[str] = set()  # owners with a delivery in flight
        self.cv = threading.Condition()
        self.closed = False
        self.delivered = 0  # counters for health and tests
        self.refused = 0
        self.threads = [threading.Thread(target=self._run, name=f"webhook-{i}", daemon=True) for i in range(threads)]
        for t in self.threads:
            t.start()

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
        self.put(Message(job["owner"], job["webhook"], json.dumps(body).encode(), "msg_" + new_id()))

    def put(self, msg: Message) -> None:
        with self.cv:
            line = self.lines.setdefault(msg.owner, deque())
            line.append(msg)
            if msg.owner not in self.turns:
                self.turns.append(msg.owner)
            self.cv.notify()

    def _take(self) -> Message | None:
        """The next due message of the next owner in turn that has none in flight (waits for one)."""
        with self.cv:
            while not self.closed:
                now, wake = time.monotonic(), 1.0
                for _ in range(len(self.turns)):
                    owner = self.turns[0]
                    self.turns.rotate(-1)
                    line = self.lines.get(owner)
                    if not line:
                        self.turns.remove(owner)
                        self.lines.pop(owner, None)
                        continue
                    if owner in self.busy:
                        continue
                    if line[0].due <= now:
                        self.busy.add(owner)
                        return line.popleft()
                    wake = min(wake, line[0].due - now)
                self.cv.wait(max(0.01, wake))
            return None

    def _run(self) -> None:
        while (msg := self._take()) is not None:
            retry = False
            try:
                retry = not self._deliver(msg)
            except Exception:  # a bad message never stops the senders
                log.exception("webhook")
            with self.cv:
                self.busy.discard(msg.owner)
                msg.attempt += 1
                if retry and msg.attempt < self.retries:
                    msg.due = time.monotonic() + self.backoff_s * 2 ** (msg.attempt - 1)
                    self.lines.setdefault(msg.owner, deque()).appendleft(msg)  # its order in the line is kept
                    if msg.owner not in self.turns:
                        self.turns.append(msg.owner)
                self.cv.notify_all()

    def _deliver(self, msg: Message) -> bool:
        """One attempt: True when done (delivered, or refused for good)."""
        import httpx

        try:
            target = outbound.check(msg.url, self.policy, "webhook", self.resolve)
        except UserError as e:
            log.warning("webhook not sent: %s", e)
            self.refused += 1
            return True
        ts = int(time.time())
        headers = {"content-type": "application/json", "host": target.host, "webhook-id": msg.id,
                   "webhook-timestamp": str(ts), "webhook-signature": sign(self.secret_of(msg.owner), msg.id, ts,
                                                                          msg.body)}
        timeout = httpx.Timeout(self.timeout[1], connect=self.timeout[0])
        try:
            with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
                request = client.build_request("POST", target.url, content=msg.body, headers=headers,
                                               extensions={"sni_hostname": target.sni} if target.sni else {})
                r = client.send(request)
            if 200 <= r.status_code < 300:
                self.delivered += 1
                return True
        except httpx.HTTPError as e:
            log.info("webhook %s attempt %d: %s", msg.url, msg.attempt + 1, e)
        return False

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify_all()
