"""Output URLs that carry their own read permission, as Replicate's do: `/v1/outputs/ID?expires=T&sig=S`, where S
is an HMAC of the id and the expiry under a key that never leaves the server. Replicate's JavaScript client
fetches an output with no Authorization header, so a job's output URLs must work without one; anything else
about the output (its record, deleting it) still needs the owner's token. A URL is valid for one to two hours
(the expiry is rounded up to the hour, so one output keeps one URL for an hour) and any job GET gives a fresh
one."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

HOUR = 3600


def _key(store) -> bytes:
    key = getattr(store, "_url_key", None)
    if key is None:
        text = store.setting("url_key")
        if text is None:
            store.db.execute("INSERT OR IGNORE INTO settings VALUES ('url_key', ?)", (secrets.token_hex(32),))
            text = store.setting("url_key")
        key = store._url_key = bytes.fromhex(text)
    return key


def _sig(store, out_id: str, expires: int) -> str:
    return hmac.new(_key(store), f"{out_id}\n{expires}".encode(), hashlib.sha256).hexdigest()[:32]


def output_url(store, base: str, out_id: str, now: float | None = None) -> str:
    expires = (int(now or time.time()) // HOUR + 2) * HOUR
    return f"{base}/v1/outputs/{out_id}?expires={expires}&sig={_sig(store, out_id, expires)}"


def valid(store, out_id: str, expires: int | None, sig: str | None) -> bool:
    if expires is None or sig is None or expires < time.time() or not re.fullmatch(r"[0-9a-f]{32}", sig):
        return False
    return hmac.compare_digest(sig, _sig(store, out_id, expires))
