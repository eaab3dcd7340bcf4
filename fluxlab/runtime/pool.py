"""A pool of loaded models, keyed by the weights they hold, released least-recently-used when room is needed.

Keyed by `ModelRef.base()` (LoRAs are switched per job on the loaded base, runtime.adapters) and the runtime
settings that change what is loaded (device, compute mode, lean encoders). Before a new model loads, models are
released, oldest use first, until the new one's estimated size fits the budget beside those that stay (and at
most `max_models` stay). Releasing really frees memory (LoadedModel.release).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from ..spec.request import ModelRef, Runtime

GB = 1024**3


def pool_key(ref: ModelRef, runtime: Runtime) -> tuple:
    # --memory low on a CPU is a way of loading (blocks left in the files), so such a model is kept apart.
    return (ref.base(), runtime.device, runtime.compute, runtime.lean, runtime.memory == "low")


def estimate_bytes(source, dtype_name: str, quantize: str | None) -> int:
    """What a model will take once loaded: the catalog's bf16 sizes, or its safetensors files, in the dtype."""
    if source.spec is not None and source.spec.sizes_gb and source.path is None:
        bf16 = sum(source.spec.sizes_gb.values()) * 1e9
    elif source.path is not None:
        bf16 = sum(f.stat().st_size for f in Path(source.path).rglob("*.safetensors"))
    else:
        bf16 = 0
    scale = {"fp32": 2.0, "bf16": 1.0, "fp16": 1.0}.get(dtype_name, 1.0)
    if quantize in ("int8", "fp8"):
        scale = min(scale, 0.55)
    elif quantize == "nf4":
        scale = min(scale, 0.3)
    return int(bf16 * scale)


class ModelPool:
    """Loaded models by key. `get` returns a loaded model (loading it if needed) and marks it most recent."""

    def __init__(self, budget: int | None = None, max_models: int | None = None,
                 loader: Callable | None = None):
        from .model import load

        self.budget = budget  # bytes the pool's models may take (None: the device's free memory when loading)
        self.max_models = max_models
        self.models: OrderedDict[tuple, object] = OrderedDict()
        self.loads = 0  # how many times a model was loaded (tests and metrics read it)
        self.last_load_seconds = 0.0
        self._loader = loader or load
        self._lock = threading.RLock()

    def get(self, ref: ModelRef, runtime: Runtime | None = None, notify: Callable[[str], None] | None = None,
            source=None):
        runtime = runtime or Runtime()
        key = pool_key(ref, runtime)
        with self._lock:
            if key in self.models:
                self.models.move_to_end(key)
                self.last_load_seconds = 0.0
                return self.models[key]
            self._make_room(ref, runtime, source)
            t0 = time.perf_counter()
            model = self._loader(ref.base(), runtime, notify, source=source)
            self.last_load_seconds = time.perf_counter() - t0
            self.loads += 1
            self.models[key] = model
            return model

    def _make_room(self, ref: ModelRef, runtime: Runtime, source) -> None:
        if self.max_models is not None:
            while len(self.models) >= self.max_models:
                self._release_oldest()
        if not self.models:
            return
        from .devices import resolve_device
        from .executor import device_budget
        from .loading import locate

        src = source or locate(ref.name)
        need = estimate_bytes(src, ref.dtype if ref.dtype != "auto" else "bf16", ref.quantize)
        while self.models:
            held = sum(m.resident_bytes() for m in self.models.values())
            budget = self.budget if self.budget is not None else device_budget(resolve_device(runtime.device)) + held
            if held + need <= budget * 0.9:
                return
            self._release_oldest()

    def _release_oldest(self) -> None:
        _, model = self.models.popitem(last=False)
        model.release()

    def release(self, ref: ModelRef | None = None, runtime: Runtime | None = None) -> None:
        """Release one model (or all)."""
        with self._lock:
            if ref is None:
                while self.models:
                    self._release_oldest()
                return
            model = self.models.pop(pool_key(ref, runtime or Runtime()), None)
            if model is not None:
                model.release()

    def loaded(self) -> list:
        return list(self.models.values())
