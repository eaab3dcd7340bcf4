"""How many threads torch may use: the CPUs this process may really use, shared fairly, never oversubscribed.

torch's default is one intra-op thread per core of the machine. That is wrong in three common cases, and costly:
a container limited by a cgroup quota or a CPU affinity mask (torch still counts every core), several fluxlab
processes started together (server worker, batch workers, `accelerate launch`, tests: each takes every core),
and a machine another job is already computing on. OpenMP threads busy-wait at their barriers, so two processes
of 2 threads on 2 cores slowed one generation 27x (1.06 s -> 29 s of denoising) where 1 thread each cost ~2x.

The rule (a pure function, `decide`): --threads or FLUXLAB_THREADS if given (then OMP_NUM_THREADS); otherwise the
usable CPUs (affinity and quota) divided by the processes started together (FLUXLAB_SHARE, set by fluxlab for the
processes it starts, or LOCAL_WORLD_SIZE, set by `accelerate launch` and torchrun), minus the threads other
processes are running right now (/proc/loadavg's runnable count), at least 1.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Threads:
    count: int
    reason: str  # why this many, for the notice and the record


def affinity_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 cpu.max, or v1 cfs quota/period), None when unlimited."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def usable_cpus(affinity: int | None = None, quota: float | None = None) -> int:
    """CPUs this process may use: its affinity mask, capped by its cgroup quota (rounded up)."""
    cpus = affinity if affinity is not None else affinity_cpus()
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def own_running() -> int:
    """Threads of this process runnable right now (torch's own workers may still be spinning after an op)."""
    n = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "R":
                n += 1
        except (OSError, IndexError):
            continue
    return max(1, n)


def others_running(loadavg: str | None = None, own: int | None = None, samples: int = 5) -> int:
    """Threads of other processes runnable now: /proc/loadavg's 'running/total' less this process's own, the
    least of a few samples 5 ms apart (a passing process or our own workers winding down is not a busy machine;
    a neighbour that computes stays runnable in every sample)."""
    import time

    if loadavg is not None:
        samples = 1
    seen = []
    for k in range(samples):
        try:
            text = loadavg if loadavg is not None else Path("/proc/loadavg").read_text()
            running = int(text.split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0
        seen.append(max(0, running - (own_running() if own is None else own)))
        if k + 1 < samples:
            time.sleep(0.005)
    return min(seen)


def _positive_int(value: str | None, name: str) -> int | None:
    if value is None or not value.strip():
        return None
    from ..errors import UserError

    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"{name}={value!r} is not a thread count; give a whole number of 1 or more")
    return n


def decide(requested: int | None = None, env: dict | None = None, cpus: int | None = None,
           busy: int | None = None) -> Threads:
    """The thread count for this process (pure: every input can be given, for tests)."""
    env = os.environ if env is None else env
    if requested is not None:
        return Threads(requested, "--threads")
    for name in ("FLUXLAB_THREADS", "OMP_NUM_THREADS"):
        n = _positive_int(env.get(name), name)
        if n is not None:
            return Threads(n, name)
    cpus = usable_cpus() if cpus is None else cpus
    share = (_positive_int(env.get("FLUXLAB_SHARE"), "FLUXLAB_SHARE")
             or _positive_int(env.get("LOCAL_WORLD_SIZE"), "LOCAL_WORLD_SIZE") or 1)
    n = max(1, cpus // share)
    busy = others_running() if busy is None else busy
    if busy > 0 and n > 1:
        free = max(1, cpus - busy)
        if free < n:
            return Threads(free, f"busy machine: {busy} other thread(s) running on {cpus} CPU(s)")
    reason = f"{cpus} usable CPU(s)" + (f" shared by {share} processes" if share > 1 else "")
    return Threads(n, reason)


_applied: Threads | None = None
_told: Threads | None = None


def apply_threads(requested: int | None = None) -> Threads:
    """Set torch's intra-op threads by `decide` (once per distinct decision)."""
    global _applied
    t = decide(requested)
    if t != _applied:
        import torch

        torch.set_num_threads(t.count)
        _applied = t
    return t


def tell_busy(t: Threads, notify) -> None:
    """Say once per process that a busy machine got fewer threads. Callers say it once the input has been checked
    and the model loaded, so that a refusal stays one line. Where a front end defers notes (`defer_notes`: the CLI,
    whose failures are one line), the note is kept for `take_note` instead, said after the work succeeds."""
    global _told, _kept
    if t.reason.startswith("busy") and _told is None and notify is not None:
        text = f"{t.reason}: using {t.count} torch thread(s) (set --threads or FLUXLAB_THREADS to choose)"
        if _defer:
            _kept = text
        else:
            notify(text)
        _told = t


_defer = False
_kept: str | None = None


def defer_notes() -> None:
    global _defer
    _defer = True


def take_note(succeeded: bool = True) -> str | None:
    """The busy-machine note kept for the end of a successful command, or None. After a failure nothing is said,
    and the next command that succeeds in this process says it."""
    global _kept, _told
    text, _kept = _kept, None
    if not succeeded:
        _told = None if text else _told
        return None
    return text


def child_env(processes: int, env: dict | None = None) -> dict:
    """The environment for `processes` fluxlab processes started together on this machine: each takes its share
    of the CPUs (FLUXLAB_SHARE), unless the user fixed a thread count."""
    env = dict(os.environ if env is None else env)
    if "FLUXLAB_THREADS" not in env:
        env["FLUXLAB_SHARE"] = str(max(1, processes))
        per = max(1, usable_cpus() // max(1, processes))
        env.setdefault("OMP_NUM_THREADS", str(per))
    return env
