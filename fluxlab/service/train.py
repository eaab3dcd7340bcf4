"""service.train: one path from a training config to a LoRA, for every front end (CLI, server, page).

Runs train.loop.Trainer with typed events (TrainStep, Saved, Samples, Notice) and a cancel token: a cancel stops
the run after the current step, saving a checkpoint first, so `resume` continues from exactly there. Sample
images are drawn here (the trainer decides what and on which model) so they carry the same records as every
other image fluxlab writes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ..spec.request import Runtime
from ..spec.trainconfig import Job
from .events import CancelToken, Notice, Samples, Saved, TrainStep, emit


@dataclass
class TrainResult:
    run_dir: Path
    lora: Path | None  # the final file; None when the run was stopped before its last step
    stopped_at: int | None = None
    rank: int = 0


def one_line(images: str, trigger: str, steps: int, model: str, name: str, out: str, resolution: int | None = None,
             device: str | None = None) -> Job:
    """The one-line training config (spec.trainconfig.one_line) for the device it will run on."""
    from ..runtime.devices import resolve_device
    from ..spec.trainconfig import one_line as config

    return config(images, trigger, steps, model, name, out, resolution, device=resolve_device(device or "auto").type)


def render_samples(model, requests: list, step: int, events=None) -> list[Path]:
    import torch

    """Draw each (request, path) on `model` as it is (its LoRA live) and write the PNGs with their records."""
    from ..spec.resolve import resolve
    from .generate import Prepared, image_record
    from .outputs import save_png

    paths = []
    for request, path in requests:
        job = resolve(request, model.spec)
        prep = Prepared(job, model.ref, model.runtime, None, [])
        for res in model.run(job):
            meta = image_record(prep, model, res, torch.get_num_threads())
            meta["resolved"]["train_step"] = step
            paths.append(save_png(res.image, path, meta))
    emit(events, Samples(step, paths))
    return paths


def with_captions(config: Job, notify, device: str | None) -> Job:
    """The config with each `auto_caption` dataset captioned first (service.caption.caption_dataset) and pointed at
    the captioned copy in the run folder; the captioner is gone before the model loads. Under several processes
    the first captions and the others wait for its folder."""
    if not any(d.auto_caption for d in config.process.datasets):
        return config
    from ..files import inside
    from .caption import caption_dataset

    run_dir = inside(Path(config.process.training_folder), config.config.name, "config.name")
    config = config.model_copy(deep=True)
    first = int(os.environ.get("RANK", "0")) == 0
    for i, d in enumerate(config.process.datasets):
        if not d.auto_caption:
            continue
        folder = run_dir / "captions" / f"dataset-{i}"
        if first:
            from ..runtime.devices import resolve_device

            caption_dataset(d.folder_path, folder, d.auto_caption, config.process.trigger_word, d.caption_ext,
                            "detailed" if d.caption_per_line else "short",
                            str(resolve_device(device or config.process.device)), notify)
        else:
            deadline = time.time() + 3600
            while not folder.is_dir() and time.time() < deadline:
                time.sleep(1)
        d.folder_path, d.auto_caption = str(folder), None
    return config


def train(config: Job, *, events=None, cancel: CancelToken | None = None, device: str | None = None,
          resume: bool = False, threads: int | None = None) -> TrainResult:
    """Train as `config` says (resume: continue its run folder from the last checkpoint)."""
    from ..runtime.loading import quiet_libraries
    from ..runtime.threads import apply_threads, tell_busy
    from ..train.loop import Trainer

    def notify(text: str) -> None:
        emit(events, Notice(text))

    t0 = time.perf_counter()
    started = {}

    def on_step(step, steps, loss, lr):
        started.setdefault("step", step - 1)
        done = step - started["step"]
        eta = (time.perf_counter() - t0) / done * (steps - step) if done else None
        emit(events, TrainStep(step, steps, loss, lr, None if eta is None else round(eta, 1)))

    if resume:
        from ..files import inside
        from ..train.checkpoint import check_state

        check_state(inside(Path(config.process.training_folder), config.config.name, "config.name"))
    quiet_libraries()
    applied = apply_threads(threads)
    config = with_captions(config, notify, device)
    trainer = Trainer(config, notify=notify, device=device, on_step=on_step,
                      on_save=lambda step, path: emit(events, Saved(step, path)),
                      should_stop=(lambda: cancel.cancelled) if cancel is not None else None,
                      render_samples=lambda model, requests, step: render_samples(model, requests, step, events))
    try:
        trainer.setup()
        tell_busy(applied, notify)  # once the datasets and the model have passed their checks
        final = trainer.train(resume=resume)
    finally:
        trainer.close()
    stopped = trainer.stopped_at if trainer.stopped_at is not None and trainer.stopped_at < trainer.p.train.steps \
        else None
    return TrainResult(trainer.run_dir, None if stopped else final, stopped, trainer.rank)


__all__ = ["Runtime", "TrainResult", "render_samples", "train"]
