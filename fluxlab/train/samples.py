"""What a training run shows while it learns: sample images at checkpoints and the loss curve.

Sample images are made with the LoRA as it is at that step: on the training model itself (its adapter is live),
or, for klein, on the distilled model with the current LoRA loaded as an adapter (LoRAs train on the base model,
samples look like what users will run). Rendering them into files with their records is the service's
(service.train passes the function that does it); this module decides what to sample and on which model.
"""

from __future__ import annotations

import csv
from pathlib import Path

from ..spec.request import GenerateRequest


def sample_requests(p, step: int, folder: Path, spec, trigger) -> list[tuple[GenerateRequest, Path]]:
    """The sample prompts of a `process` config as requests, each with the file it goes to."""
    s = p.sample
    out = []
    for k, prompt in enumerate(s.prompts):
        fields = dict(prompt=trigger(prompt), width=s.width, height=s.height, steps=s.sample_steps,
                      seed=s.seed + k if s.walk_seed else s.seed)
        if spec.guidance_mode != "none":
            fields["guidance"] = s.guidance_scale
        if spec.guidance_mode == "cfg":
            fields["negative"] = s.neg
        if spec.distilled:
            fields["steps"] = spec.steps
        out.append((GenerateRequest(**fields), folder / f"step{step:06d}-{k}.png"))
    return out


class SamplingModel:
    """The model samples are drawn with: the training model, or a second (distilled) model holding the LoRA."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.other = None

    def get(self):
        t = self.trainer
        if t.sample_model is None:
            return t.model
        from ..runtime.model import load
        from ..spec.request import ModelRef, Runtime

        if self.other is None:
            self.other = load(ModelRef(name=t.sample_model), Runtime(device=t.device_name), t.notify)
        transformer = self.other.components.transformer
        if "train" in getattr(transformer, "peft_config", {}):
            transformer.delete_adapters("train")
        state = {k.removeprefix("transformer."): v.to(self.other.dtype) for k, v in t.lora_state().items()
                 if k.startswith("transformer.")}
        transformer.load_lora_adapter(state, adapter_name="train", prefix=None)
        return self.other


def plot_loss(csv_path: Path, png_path: Path) -> None:
    """A small loss-curve PNG (the loss per step, and its moving average when there are enough steps), with PIL."""
    from PIL import Image, ImageDraw, ImageFont

    from ..files import atomic_write

    try:
        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f))
        ys = [float(r["loss"]) for r in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not ys:
        return
    w, h, pad = 640, 360, 40
    im = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=12)
    lo, hi = min(ys), max(ys)
    span = hi - lo or 1.0

    def xy(i, y):
        return pad + (w - 2 * pad) * (i / max(1, len(ys) - 1)), h - pad - (h - 2 * pad) * ((y - lo) / span)

    d.line([xy(i, y) for i, y in enumerate(ys)], fill=(170, 190, 230), width=1)
    k = len(ys) // 20
    title = f"loss over {len(ys)} steps"
    if k >= 2:
        avg = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        d.line([xy(i, y) for i, y in enumerate(avg)], fill=(20, 60, 160), width=2)
        title += f" (dark: moving average of {k} steps)"
    d.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    d.text((pad, 10), title, fill="black", font=font)
    d.text((5, pad - 6), f"{hi:.4f}", fill="black", font=font)
    d.text((5, h - pad - 6), f"{lo:.4f}", fill="black", font=font)
    atomic_write(png_path, lambda tmp: im.save(tmp, format="PNG"))
