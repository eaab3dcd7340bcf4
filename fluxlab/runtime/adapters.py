"""LoRAs switched per job on a loaded model, through peft adapters: load once, activate, set scales.

Each LoRA file is loaded into the transformer (and, for text-encoder LoRAs, the encoders) once, as an adapter
named by its content hash. A job then activates the adapters it asks for with its scales and the rest stay
inactive, so two jobs that differ only in LoRAs or scales never reload the base weights, and a job without
LoRAs runs the plain model. A fresh load with a LoRA goes through the same calls, so both give the same numbers.

Activation is lazy: a component not loaded yet gets the job's LoRAs when it loads (components load on first use,
so a one-shot run still holds one big model at a time). Scales stay peft's per-adapter scaling, never baked
into the weights, so switching them is free.
"""

from __future__ import annotations

from ..errors import UserError

MAX_LOADED = 8  # adapters kept per model; the least recently used beyond this are deleted
ENCODERS = ("text_encoder", "text_encoder_2")


def adapter_name(lora) -> str:
    return "l" + lora.sha256[:20]


def merged(loras: list) -> list:
    """(Lora, scale) pairs with repeats of one file summed: two equal updates at a and b are one at a + b."""
    out: dict[str, list] = {}
    for lora, scale in loras:
        if lora.sha256 in out:
            out[lora.sha256][1] += scale
        else:
            out[lora.sha256] = [lora, float(scale)]
    return [(lo, s) for lo, s in out.values()]


def _encoder_part(lora, name: str) -> dict:
    return {k[len(name) + 1:]: v for k, v in lora.te_state.items() if k.split(".", 1)[0] == name}


class Adapters:
    """The LoRAs wanted by the current job, and those loaded into each component."""

    def __init__(self, model):
        self.model = model
        self.wanted: list = []  # [(Lora, scale)] of the current job
        self.fuse = False
        self.fused = False
        self.files: dict = {}  # adapter name -> Lora
        self.order: list[str] = []  # least recently used first
        self.placed: dict[str, set] = {}  # component -> adapter names loaded into it
        components = model.components
        components.after_load.setdefault("transformer", []).append(lambda t: self._apply("transformer", t))
        for name in ENCODERS:
            components.after_load.setdefault(name, []).append(lambda m, name=name: self._apply(name, m))

    def signature(self, component: str) -> tuple:
        """What the wanted LoRAs change in `component` (prompt caches key on the text encoders' signature)."""
        if component == "transformer":
            return tuple((adapter_name(lo), s) for lo, s in self.wanted)
        return tuple((adapter_name(lo), s) for lo, s in self.wanted if _encoder_part(lo, component))

    def activate(self, loras: list, fuse: bool = False) -> None:
        """Make exactly these (Lora, scale) pairs active: now in the loaded components, and in the others when
        they load."""
        loras = merged(loras)
        if self.fused:
            if [(lo.sha256, s) for lo, s in loras] == [(lo.sha256, s) for lo, s in self.wanted]:
                return
            raise UserError("this model has LoRAs fused into its weights; load it again to change them")
        for lora, _ in loras:
            if lora.family != self.model.spec.family:
                raise UserError(f"{lora.path} is a {lora.family} LoRA; {self.model.label} is a "
                                f"{self.model.spec.family} model")
            name = adapter_name(lora)
            self.files[name] = lora
            if name in self.order:
                self.order.remove(name)
            self.order.append(name)
        self.wanted, self.fuse = loras, fuse
        components = self.model.components
        for name in ("transformer", *ENCODERS):
            if components.is_loaded(name) and getattr(components, name) is not None:
                self._apply(name, getattr(components, name))

    # -- internals ------------------------------------------------------------------------------------
    def _apply(self, component: str, module) -> None:
        if component == "transformer":
            self._apply_transformer(module)
        else:
            self._apply_encoder(component, module)

    def _apply_transformer(self, transformer) -> None:
        model = self.model
        placed = self.placed.setdefault("transformer", set())
        names = []
        for lora, _ in self.wanted:
            name = adapter_name(lora)
            if name not in placed:
                state = {k.removeprefix("transformer."): v.to(model.dtype) for k, v in lora.state.items()}
                check_shapes(transformer, state, lora.path, model.label)
                try:
                    transformer.load_lora_adapter(state, adapter_name=name, prefix=None)
                except (ValueError, RuntimeError, KeyError) as e:
                    raise UserError(f"{lora.path} does not fit {model.label}'s transformer "
                                    f"({str(e).splitlines()[0]})") from None
                placed.add(name)
            names.append(name)
        self._evict(transformer, placed, keep=set(names))
        if self.model.upcast:  # new LoRA layers compute like the rest (devices.upcast_linears)
            from .devices import upcast_linears

            upcast_linears(transformer)
        if names:
            transformer.enable_lora()
            transformer.set_adapters(names, weights=[s for _, s in self.wanted])
            if self.fuse:
                transformer.fuse_lora(adapter_names=names)
                transformer.unload_lora()
                placed.clear()
                self.fused = True
        elif placed:  # only our own adapters are switched off (a model in training keeps its live one)
            transformer.disable_lora()

    def _apply_encoder(self, component: str, encoder) -> None:
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
        from peft.tuners.lora import LoraLayer

        placed = self.placed.setdefault(component, set())
        active = []
        for lora, scale in self.wanted:
            part = _encoder_part(lora, component)
            if not part:
                continue
            name = adapter_name(lora)
            if name not in placed:
                modules = sorted({k.rsplit(".lora_", 1)[0] for k in part})
                rank = max(v.shape[0] for k, v in part.items() if ".lora_A." in k)
                inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=modules), encoder,
                                        adapter_name=name)
                set_peft_model_state_dict(encoder, {k: v.to(encoder.dtype) for k, v in part.items()},
                                          adapter_name=name)
                placed.add(name)
            active.append((name, scale))
        if self.model.upcast:
            from .devices import upcast_linears

            upcast_linears(encoder)
        for m in encoder.modules():
            if not isinstance(m, LoraLayer):
                continue
            here = [(n, s) for n, s in active if n in m.lora_A]
            m.enable_adapters(bool(here))
            if here:
                m.set_adapter([n for n, _ in here])
                for n, s in here:
                    m.set_scale(n, s)

    def _evict(self, transformer, placed: set, keep: set) -> None:
        """Delete the least recently used adapters beyond MAX_LOADED (never one the job wants)."""
        while len(placed) > MAX_LOADED:
            victim = next((n for n in self.order if n in placed and n not in keep), None)
            if victim is None:
                return
            transformer.delete_adapters(victim)
            placed.discard(victim)
            self.order.remove(victim)
            self.files.pop(victim, None)


def check_shapes(transformer, state: dict, path: str, label: str) -> None:
    """Name the first LoRA matrix that does not fit its module, with both sizes (peft's own message is several
    lines and leaves the differing size out)."""
    import torch

    modules = dict(transformer.named_modules())
    for key, v in state.items():
        module_name, _, rest = key.partition(".lora_")
        m = modules.get(module_name)
        if m is None:
            raise UserError(f"{path}: LoRA module {module_name} does not exist in {label}'s transformer")
        base = getattr(m, "base_layer", m)
        if not isinstance(base, torch.nn.Linear):
            continue
        if rest.startswith("A") and v.shape[1] != base.in_features:
            raise UserError(f"{path}: {module_name} takes {v.shape[1]} inputs in this LoRA, but {label}'s layer has "
                            f"{base.in_features}; the LoRA was made for another model size")
        if rest.startswith("B") and v.shape[0] != base.out_features:
            raise UserError(f"{path}: {module_name} gives {v.shape[0]} outputs in this LoRA, but {label}'s layer has "
                            f"{base.out_features}; the LoRA was made for another model size")
