"""The Python API: `fluxlab.load(...)` returns a `Pipeline` that keeps its model loaded between calls.

    pipe = fluxlab.load("flux2-klein-4b")
    for r in pipe.generate(prompt="a lighthouse at dusk", seed=7, num_images=2):
        pipe.save(r, f"lighthouse-{r.seed}.png")      # or r.image.save(...) without the settings

A thin shell over service.generate, like the CLI: the same request gives the same pixels and the same PNG bytes
whichever front end made it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from ..spec.request import GenerateRequest, ModelRef, Runtime, lora_ref, make_request, model_ref, runtime
from . import events as ev

log = logging.getLogger("fluxlab")


class Pipeline:
    """A loaded model with the reference and runtime it was loaded with; `generate()` takes a GenerateRequest or
    its fields as keywords (prompt=..., width=...)."""

    def __init__(self, model, ref: ModelRef, rt: Runtime, notify: Callable[[str], None]):
        self.model, self.ref, self.runtime, self.notify = model, ref, rt, notify

    # what people inspect
    spec = property(lambda self: self.model.spec)
    label = property(lambda self: self.model.label)
    components = property(lambda self: self.model.components)
    family = property(lambda self: self.model.family)
    device = property(lambda self: self.model.device)
    devices = property(lambda self: self.model.devices)  # several: one model split over them
    dtype = property(lambda self: self.model.dtype)
    plan = property(lambda self: self.model.plan)
    memory = property(lambda self: self.model.memory)

    @property
    def kv_cache(self) -> bool:
        return self.model.kv_cache

    @kv_cache.setter
    def kv_cache(self, on: bool) -> None:
        self.model.kv_cache = on

    def set_plan(self, plan) -> None:
        self.model.set_plan(plan)

    def generate(self, request: GenerateRequest | str | None = None, **fields) -> list:
        """The images of one request: a GenerateRequest, or its fields (a plain string is the prompt)."""
        return list(self.generate_iter(request, **fields))

    def generate_iter(self, request: GenerateRequest | str | None = None, *, batch_size: int | None = None,
                      events: Callable | None = None, cancel=None, loras=None, **fields) -> Iterator:
        """Like generate(), yielding each image as soon as its batch is decoded. `loras` (["file:scale", ...])
        switches LoRAs for this call on the loaded base."""
        from .generate import generate

        if isinstance(request, str):
            request, fields = None, {"prompt": request, **fields}
        req = request if request is not None else make_request(**fields)
        ref = self.ref if loras is None else self.ref.model_copy(update={"loras": tuple(lora_ref(x) for x in loras)})
        rt = self.runtime if batch_size is None else self.runtime.model_copy(update={"batch_size": batch_size})

        def relay(event):
            if isinstance(event, ev.Notice):
                self.notify(event.text)
            if events is not None:
                events(event)

        yield from generate(req, ref, rt, events=relay, cancel=cancel, loaded=self.model)

    def save(self, result, path: str | Path, reproducible: bool = False) -> Path:
        """Write a result as a PNG with its settings (what the CLI writes)."""
        from .outputs import save_png

        return save_png(result.image, Path(path), result.metadata, None if reproducible else result.timings)


def load(model: str | ModelRef, device: str = "auto", dtype: str = "auto", transformer: str | None = None,
         notify: Callable[[str], None] | None = None, lean: bool = True, memory: str = "auto",
         budget: str | None = None, quantize: str | None = None, compute: str = "auto", loras: list | None = None,
         fuse_lora: bool = False, threads: int | None = None, revision: str | None = None) -> Pipeline:
    """Load a model (catalog name, local diffusers directory, or hub repo id) and keep it in memory.

    memory (auto | speed | balanced | low) and budget ("6GB") steer the memory planner; quantize (int8 | fp8 |
    nf4) quantizes the transformer's and text encoders' weights; transformer= a single-file transformer
    (.safetensors or .gguf). compute="auto" runs bf16 weights' matmuls in fp32 on CPUs where that is faster;
    "native" keeps bf16 arithmetic. loras: ["path:scale", (path,
    scale), ...], stacked, switched on the loaded base per call (fuse_lora merges them into the weights).
    """
    from ..runtime.model import load as load_model
    from .generate import check_runtime, pin_files

    notify = notify or log.warning
    if isinstance(model, ModelRef):
        ref = model
    else:
        fields = {"dtype": dtype, "fuse_lora": fuse_lora, "loras": [lora_ref(x).model_dump() for x in loras or []]}
        if transformer is not None:
            fields["transformer"] = transformer
        if quantize is not None:
            fields["quantize"] = quantize
        if revision is not None:
            fields["revision"] = revision
        ref = model_ref(model, **fields)
    rt = runtime(device=device, memory=memory, budget=budget, compute=compute, lean=lean, threads=threads)
    check_runtime(rt, ref)
    from ..runtime.loading import fetch, locate

    source = fetch(locate(ref.name), ref.revision)
    ref, read = pin_files(ref, source)
    loaded = load_model(ref.base(), rt, notify, source=source)
    if read:
        loaded.adapters.activate(read, fuse=ref.fuse_lora)
    return Pipeline(loaded, ref, rt, notify)
