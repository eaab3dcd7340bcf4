"""What trains: a LoRA on the transformer, every transformer weight, or a LoRA on the text encoders too.

Each is a strategy with the same three answers: `add(model, cfg)` makes its parameters trainable and returns
them by name, `state(params, ema)` gives the tensors a checkpoint holds, and `write(...)` saves them in the
format people load (a LoRA in ai-toolkit's key names; a full fine-tune as a single-file transformer). The loop
(train.loop) knows none of their details. peft adds the LoRAs.
"""

from __future__ import annotations

import re

from ..errors import UserError


def _trainable(module, prefix: str = "") -> dict:
    """Make a peft-wrapped module's LoRA parameters trainable in fp32; return them by name."""
    module.requires_grad_(False)
    out = {}
    for n, param in module.named_parameters():
        if "lora_" in n:
            param.data = param.data.float()
            param.requires_grad_(True)
            out[prefix + n] = param
    return out


def select_layers(transformer, kwargs) -> list[str]:
    """Every Linear of the transformer (as ai-toolkit trains FLUX: embedders, modulation and output too), narrowed by
    network_kwargs' only_if_contains / ignore_if_contains."""
    import torch

    linears = sorted(n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear))
    targets = [n for n in linears if (not kwargs.only_if_contains or any(s in n for s in kwargs.only_if_contains))
               and not any(s in n for s in kwargs.ignore_if_contains)]
    if not targets:
        raise UserError(f"network.network_kwargs selects no layer of the transformer (only_if_contains "
                        f"{kwargs.only_if_contains}, ignore_if_contains {kwargs.ignore_if_contains}); its layers are "
                        f"named like {', '.join(repr(n) for n in linears[:: max(1, len(linears) // 4)][:4])}")
    return targets


class TransformerLora:
    """A LoRA on the transformer's Linear layers (rank `network.linear`, alpha `network.linear_alpha`)."""

    kind = "lora"

    def add(self, model, cfg) -> dict:
        import torch
        from peft import LoraConfig

        t = model.components.transformer
        targets = select_layers(t, cfg.network.network_kwargs)
        torch.manual_seed(cfg.train.seed)
        # A regex of the exact names: a list would also match any module whose name merely ends like one of them
        # (FLUX.1's top-level proj_out and its single blocks' proj_out).
        t.add_adapter(LoraConfig(r=cfg.network.linear, lora_alpha=cfg.network.linear_alpha,
                                 target_modules="|".join(re.escape(n) for n in targets), init_lora_weights=True))
        params = _trainable(t)
        t.train()
        return params

    @staticmethod
    def state(src: dict) -> dict:
        """peft names (<module>.lora_A.default.weight) -> transformer.<module>.lora_A.weight (text-encoder
        parameters keep their text_encoder.* prefix)."""
        out = {}
        for n, v in src.items():
            key = n.replace(".default.", ".")
            out[key if key.startswith("text_encoder") else "transformer." + key] = v.detach().float().cpu()
        return out

    @staticmethod
    def write(state: dict, family: str, target, meta: dict) -> None:
        from ..runtime import loras as L

        te = {k: v for k, v in state.items() if not k.startswith("transformer.")}
        lora = L.Lora("", "diffusers", family, {k: v for k, v in state.items() if k not in te}, te_state=te)
        L.write(lora, "ai-toolkit", target, meta)


class TextEncoderLora:
    """A LoRA on every Linear of the text encoder(s) too, beside the transformer's; its parameters are named
    text_encoder.* (and text_encoder_2.* for FLUX.1's T5). Captions are then encoded at every step."""

    def add(self, model, cfg) -> dict:
        import torch
        from peft import LoraConfig, inject_adapter_in_model

        params = {}
        for name in ("text_encoder", "text_encoder_2"):
            te = getattr(model.components, name)
            if te is None:
                continue
            targets = sorted({n for n, m in te.named_modules() if isinstance(m, torch.nn.Linear)})
            # peft directly rather than transformers' add_adapter, whose own peft version floor can run ahead of
            # the newest peft release (transformers 5.24 asks for peft >= 0.22 while 0.21.2 is the newest).
            inject_adapter_in_model(LoraConfig(r=cfg.network.linear, lora_alpha=cfg.network.linear_alpha,
                                               target_modules=targets, init_lora_weights=True), te)
            params.update(_trainable(te, f"{name}."))
            te.train()
        return params


class FullTransformer:
    """Every transformer weight trains (fp32 master weights); the text encoder stays frozen."""

    kind = "full"

    def add(self, model, cfg) -> dict:
        if cfg.train.train_text_encoder:
            raise UserError("network.type full trains the transformer only; set train.train_text_encoder: false")
        t = model.components.transformer
        t.float().requires_grad_(True)
        t.train()
        return dict(t.named_parameters())

    @staticmethod
    def state(src: dict) -> dict:
        return {n: v.detach().float().cpu().contiguous() for n, v in src.items()}

    @staticmethod
    def write(state: dict, family: str, target, meta: dict) -> None:
        """A single-file transformer in diffusers names (--transformer FILE takes it)."""
        from safetensors.torch import save_file

        from ..files import atomic_write

        atomic_write(target, lambda tmp: save_file(state, str(tmp), metadata=meta))


def strategies(cfg) -> list:
    """The strategies a config asks for: the transformer's (LoRA or full), then the text encoders' LoRA."""
    main = FullTransformer() if cfg.network.type == "full" else TransformerLora()
    return [main, TextEncoderLora()] if cfg.train.train_text_encoder else [main]
