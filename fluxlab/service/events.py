"""What a running job tells its front end, as typed events, and how a front end stops it.

A front end passes `events` (any callable taking one event) and `cancel` (a `CancelToken`) to service.generate,
service.grid or service.train. The CLI's progress bar and previews consume events; so do the server's Server-Sent
Events. A cancel is checked at every sampler step and every training step, so work stops within one step.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


class Cancelled(Exception):
    """The job was cancelled by its CancelToken; nothing of the unfinished work was written."""


class CancelToken:
    """Set from any thread; the job checks it between steps."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled(self.reason)


@dataclass
class Started:
    """The job is resolved and its model is loaded: `images` images of `steps` steps each will follow."""

    images: int
    steps: int
    model: str
    load_seconds: float = 0.0


@dataclass
class Loading:
    """A model is being loaded (a switch of models shows as this)."""

    model: str


@dataclass
class Step:
    """Step i (1-based) of n finished for the batch of `seeds`; eta_s estimates the whole job's remaining time."""

    i: int
    n: int
    eta_s: float | None
    seeds: tuple = ()
    prompt_index: int = 0
    done_images: int = 0
    total_images: int = 0
    denoised: Any = field(default=None, repr=False)  # the clean estimate (tokens), for in-process consumers


@dataclass
class Preview:
    """The clean estimate at step i: one PIL image per seed of the batch (`kind`: "fast" projection or "vae")."""

    i: int
    n: int
    images: list
    seeds: tuple = ()
    kind: str = "fast"


@dataclass
class Image:
    """One finished image (with its record) and where it was written (None when not written)."""

    result: Any
    path: Any = None
    index: int = 0


@dataclass
class Notice:
    """Something the user should know: a value adjusted or ignored, a plan chosen."""

    text: str


@dataclass
class Finished:
    summary: dict = field(default_factory=dict)


def emit(events, event) -> None:
    if events is not None:
        events(event)


@dataclass
class TrainStep:
    """Training step `step` of `steps` finished with this loss."""

    step: int
    steps: int
    loss: float
    lr: float
    eta_s: float | None = None


@dataclass
class Saved:
    """A checkpoint was written (the LoRA, or in full mode the transformer, at `step`)."""

    step: int
    path: Any


@dataclass
class Samples:
    """Sample images drawn at `step`."""

    step: int
    paths: list
