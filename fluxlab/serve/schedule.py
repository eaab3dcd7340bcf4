"""Which pending job goes to which idle worker: a pure function of the queue and the workers, so it is tested
without processes.

The queue's order stands (priority, then arrival). Among idle workers a job prefers one that has its model loaded.
When none of the idle ones has it but a busy one does, the job waits for that one, up to the operator's bound
(`--affinity-wait`), and jobs behind it may take the idle workers meanwhile: a reload costs a FLUX model tens of
seconds, a short wait costs less. Past the bound the job loads its model on an idle worker, so a long queue of one
model still comes to use every worker (the second then has the model too).
A job that must go cold takes the idle worker whose loaded models the rest of the queue wants least (then the one
with the fewest loaded). Models are matched by the pool's key (the base model's name); LoRAs switch on a loaded
base in well under a second, so they are not part of the match.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class WorkerView:
    name: str
    idle: bool
    loaded: frozenset = frozenset()


def model_of(job: dict) -> str | None:
    """The model a job loads (None for kinds that release the pool: trainings, captions, batches)."""
    if job.get("kind") in ("training", "caption", "batch"):
        return None
    model = (job.get("plan") or {}).get("model")
    return model.get("name") if isinstance(model, dict) else None


def assign(pending: list[dict], workers: list[WorkerView], waited: dict[str, float], wait_s: float,
           affinity: bool = True) -> tuple[list[tuple[str, str]], list[str]]:
    """(job id, worker name) pairs to start now, and the ids of jobs held back waiting for a busy worker that has
    their model. `waited`: seconds each job has been held back so far."""
    free = [w for w in workers if w.idle]
    busy = {m for w in workers if not w.idle for m in w.loaded}  # models a busy worker has
    picks, held = [], []
    for i, job in enumerate(pending):
        if not free:
            break
        model = model_of(job)
        if not affinity:
            chosen = free[0]
        else:
            warm = [w for w in free if model is not None and model in w.loaded]
            if warm:
                chosen = warm[0]
            elif model is not None and model in busy and waited.get(job["id"], 0.0) < wait_s:
                held.append(job["id"])  # a busy worker has it: wait for one to free up, within the bound
                continue
            else:
                later = [model_of(j) for j in pending[i + 1:]]
                chosen = min(free, key=lambda w: (sum(m in w.loaded for m in later), len(w.loaded)))
        free.remove(chosen)
        picks.append((job["id"], chosen.name))
        if model is not None:
            busy.add(model)  # the chosen worker is busy with it now: the next job of this model may wait for it
    return picks, held
