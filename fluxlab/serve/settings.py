"""The server's settings: where its data lives, its limits, and the models it offers besides the catalog."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from .outbound import Policy, system_resolve

MB = 1024 * 1024


def default_data() -> Path:
    if os.environ.get("FLUXLAB_DATA"):
        return Path(os.environ["FLUXLAB_DATA"])
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "fluxlab"


@dataclass
class Settings:
    data: Path = field(default_factory=default_data)
    max_json_bytes: int = 1 * MB
    max_image_bytes: int = 25 * MB
    max_lora_bytes: int = 2048 * MB
    max_zip_bytes: int = 1024 * MB
    max_pending_per_token: int = 50
    max_pending: int = 200
    max_wait_s: float = 60.0
    # Models offered besides the catalog: name -> a local diffusers folder (set by whoever runs the server; a
    # client can only name them, never give a path).
    models: dict = field(default_factory=dict)
    runtime: dict = field(default_factory=dict)  # Runtime fields for every job (device, memory, budget, threads)
    max_models: int | None = None  # models the worker keeps loaded at once (None: as memory allows)
    webhook_retries: int = 4
    webhook_backoff_s: float = 0.5
    webhook_policy: Policy = field(default_factory=Policy)  # internal addresses webhooks may reach anyway
    resolve: Callable = system_resolve  # host, port -> addresses (webhook targets)
    allowed_hosts: tuple = ()  # Host headers accepted (empty: any)
    workers: Workers = field(default_factory=lambda: Workers())

    def worker(self) -> dict:
        """What a worker is given (plain data: it is pickled across the process boundary)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in ("webhook_policy", "resolve", "allowed_hosts", "workers")}
        return {**plain, "data": str(self.data), "models": dict(self.models)}


@dataclass
class Workers:
    """How many workers take jobs from the queue, and where they run (see serve.broker)."""

    engine: str = "local"  # local: processes on this machine; ray: actors on a Ray cluster
    count: int = 1  # started with the server (and the fewest kept)
    most: int = 1  # the most at once (more than `count`: workers are added while jobs wait, removed when idle)
    devices: tuple = ()  # local: one worker per device, in turn
    ray_address: str | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    shared_data: bool = False  # ray: the data folder is the same path on every node
    affinity: bool = True  # prefer a worker that has the job's model loaded
    affinity_wait_s: float = 5.0  # how long a job may wait for such a worker before another loads the model
    heartbeat_s: float = 30.0  # a worker silent this long (hung, or its node gone) is replaced
    idle_s: float = 120.0  # a worker beyond `count` idle this long is stopped
