"""The workers the broker hands jobs to: worker processes on this machine, or Ray actors anywhere on a cluster.

Both run the same serve.worker.Worker (one job at a time, its own model pool) and speak the same small protocol:
commands in (run, cancel, stop), events out. A handle starts its worker, sends it commands without waiting, and
pumps its events into the broker's one inbox tagged with the slot's name and the handle's generation, so events of
a worker that was replaced are recognised and dropped. The broker never blocks on a worker.

A Ray worker on a node that does not share the API node's data folder (no `--shared-data`) gets the files a job
reads with the job, and sends back the files it writes with its events (serve.ship); the API node keeps every file,
as with local workers.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

POLL_S = 0.5


class LocalWorker:
    """A worker process on this machine (multiprocessing spawn: torch lives only there)."""

    engine = "local"

    def __init__(self, name: str, settings: dict, inbox: queue.Queue, gen: int):
        self.name, self.settings, self.inbox, self.gen = name, settings, inbox, gen
        self.closed = False
        self.process = None

    def start(self) -> None:
        import multiprocessing

        from . import worker

        ctx = multiprocessing.get_context("spawn")
        self.commands, self.events = ctx.Queue(), ctx.Queue()
        self.process = ctx.Process(target=worker.main, args=(self.commands, self.events, self.settings),
                                   name=f"fluxlab-worker-{self.name}", daemon=True)
        self.process.start()
        threading.Thread(target=self._pump, name=f"fluxlab-pump-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        while not self.closed:
            try:
                event = self.events.get(timeout=POLL_S)
            except queue.Empty:
                continue
            except (EOFError, OSError, ValueError):
                return
            self.inbox.put((self.name, self.gen, event))

    def send(self, command: dict) -> None:
        with contextlib.suppress(Exception):
            self.commands.put(command)

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def death(self) -> str:
        return f"the worker process died (exit code {self.process.exitcode})"

    def kill(self) -> None:
        self.closed = True
        if self.process is not None and self.process.is_alive():
            self.process.kill()

    def stop(self, timeout: float = 5) -> None:
        self.send({"op": "stop"})
        if self.process is not None:
            self.process.join(timeout=timeout)
        self.kill()


class Actor:
    """The Ray actor around a Worker. Threaded (max_concurrency): `loop` runs the worker for the actor's life while
    `command` and `poll` answer beside it."""

    def __init__(self, settings: dict, api_root: str, shared: bool):
        import os
        import tempfile

        from .worker import Worker

        self.api_root, self.shared = api_root, shared
        self.root = api_root if shared else scratch(os.path.join(tempfile.gettempdir(), "fluxlab-workers"))
        settings = {**settings, "data": self.root}
        self.commands: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        self.settings = settings
        self.worker = Worker(self.commands, self.events, settings)

    def loop(self) -> None:
        import shutil

        from .worker import log_to

        log_to(self.settings)
        self.worker.loop()
        if not self.shared:  # stopped: its copies go (a killed actor's go when the next one starts on the node)
            shutil.rmtree(self.root, ignore_errors=True)

    def command(self, command: dict) -> None:
        if command["op"] == "run" and not self.shared:
            from .ship import unpack

            command = {**command, "job": unpack(command["job"], self.api_root, self.root)}
        self.commands.put(command)

    def poll(self, timeout: float) -> list[dict]:
        try:
            events = [self.events.get(timeout=timeout)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while len(events) < 256:
                events.append(self.events.get_nowait())
        if not self.shared:
            from .ship import send_back

            events = [send_back(e, self.root, self.api_root) for e in events]
        return events


def scratch(base: str) -> str:
    """This process's own folder under `base` for a job's copied files, after removing those of processes that are
    gone (an actor killed with its node's work in it)."""
    import os
    import shutil

    os.makedirs(base, mode=0o700, exist_ok=True)
    for name in os.listdir(base):
        if name.isdigit() and not os.path.exists(f"/proc/{name}"):
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    mine = os.path.join(base, str(os.getpid()))
    os.makedirs(mine, mode=0o700, exist_ok=True)
    return mine


class RayWorker:
    """A worker as a Ray actor, placed by its resources (CPUs, GPUs) on any node of the cluster."""

    engine = "ray"

    def __init__(self, name: str, settings: dict, inbox: queue.Queue, gen: int):
        self.name, self.settings, self.inbox, self.gen = name, settings, inbox, gen
        self.closed = False
        self.actor = self.loop_ref = None
        self.error = None

    def start(self) -> None:
        import ray

        s = self.settings
        self.actor = ray.remote(Actor).options(
            num_cpus=s["cpus_per_worker"], num_gpus=s["gpus_per_worker"] or None, max_concurrency=4, max_restarts=0,
            name=None).remote(s, s["api_root"], s["shared_data"])
        self.loop_ref = self.actor.loop.remote()
        threading.Thread(target=self._pump, name=f"fluxlab-pump-{self.name}", daemon=True).start()

    def _pump(self) -> None:
        import ray

        while not self.closed:
            try:
                events = ray.get(self.actor.poll.remote(POLL_S))
            except Exception as e:  # the actor died (RayActorError) or the cluster went away
                self.error = f"{type(e).__name__}"
                return
            for event in events:
                self.inbox.put((self.name, self.gen, event))

    def send(self, command: dict) -> None:
        with contextlib.suppress(Exception):
            self.actor.command.remote(command)

    def alive(self) -> bool:
        import ray

        if self.loop_ref is None:
            return False
        done, _ = ray.wait([self.loop_ref], timeout=0)
        return not done and self.error is None

    def death(self) -> str:
        return f"the worker's Ray actor died ({self.error or 'ended'})"

    def kill(self) -> None:
        import ray

        self.closed = True
        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)

    def stop(self, timeout: float = 5) -> None:
        self.send({"op": "stop"})
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive():
            time.sleep(0.1)
        self.kill()


def connect_ray(address: str | None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one; a cluster that cannot be reached is
    one line."""
    import os

    from ..errors import UserError

    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'fluxlab[ray]'") from None
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    if target and target != "auto" and "://" not in target:
        reachable(target)  # ray.init would retry a dead address for minutes
    from ..batch.engines import quiet_ray

    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        auth = ("" if os.environ.get("RAY_AUTH_MODE") else "; a cluster with token authentication also needs "
                "RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or ~/.ray/auth_token) here")
        raise UserError(f"--ray-address {address}: no Ray cluster answers there ({str(e).splitlines()[0]}); start "
                        f"one with `ray start --head` or leave --ray-address out for a local one{auth}") from None
    quiet_ray()


def reachable(address: str, timeout: float = 5.0) -> None:
    """HOST:PORT accepts connections, or one line."""
    import socket

    from ..errors import UserError

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return
    except ValueError:
        raise UserError(f"--ray-address {address!r}: give HOST:PORT of the cluster's head (e.g. 10.0.0.5:6379), or "
                        f"auto") from None
    except OSError as e:
        raise UserError(f"--ray-address {address}: nothing answers there ({e.strerror or e}); start the head with "
                        f"`ray start --head`, or leave --ray-address out for a local cluster") from None


def ray_room(count: int, cpus: float, gpus: float) -> str | None:
    """A note when the cluster has less room now than the workers ask for (they wait for nodes to join)."""
    import ray

    have = ray.cluster_resources()
    cpu, gpu = have.get("CPU", 0.0), have.get("GPU", 0.0)
    if cpu >= count * cpus and gpu >= count * gpus:
        return None
    return (f"the Ray cluster has {cpu:g} CPUs and {gpu:g} GPUs now; {count} workers ask for {count * cpus:g} and "
            f"{count * gpus:g}: those that do not fit start when nodes join")


HANDLES = {"local": LocalWorker, "ray": RayWorker}
