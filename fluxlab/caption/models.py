"""Captioners by name or folder: `load(name)` gives an object whose `caption(images, detail)` returns one caption
per image (lines, where a captioner writes several) and whose `with_trigger(caption, word)` puts a trigger word in
a caption the way the trainer reads it (once).

Florence-2 and Qwen2.5-VL run through transformers' native classes; a repo or folder whose config asks for remote
code is refused (fluxlab never runs code from a model repo). The demo captioner is rules over the demo evaluator's
reading: what makes captioning provable offline.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import ClassVar

from ..errors import UserError
from .catalog import CAPTIONERS, MODEL_TYPES

DETAILS = ("short", "detailed")


class Captioner:
    name = ""

    def caption(self, images: list, detail: str = "short") -> list[str]:
        raise NotImplementedError

    def with_trigger(self, caption: str, trigger: str) -> str:
        """The trigger word first, as community trainers write it ('zxq, a photo of ...'), unless it is there."""
        if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption):
            return caption
        return "\n".join(f"{trigger}, {line}" for line in caption.splitlines())

    def close(self) -> None:
        """Free the weights (a training that captions first unloads its captioner before loading the model)."""


class DemoCaptioner(Captioner):
    """The demo's captions ('a small red circle in the top left on a white background', and shorter lines for
    `detailed`, as its training data has them) from the evaluator's reading of colour, shape and place, the
    border's colour for the background, and the shape's area against a render of it at each size in that place."""

    name = "demo"

    def __init__(self):
        self._areas: dict = {}

    def read(self, image):
        from ..demo.data import BACKGROUNDS, SIZES, Scene
        from ..demo.evaluate import foreground, read

        reading = read(image)
        if None in (reading.colour, reading.shape, reading.position):
            return None
        a, bg, mask = foreground(image)
        background = min(BACKGROUNDS, key=lambda n: sum((x - y) ** 2 for x, y in zip(BACKGROUNDS[n], bg, strict=True)))
        area = mask.mean()
        size = min(SIZES, key=lambda s: abs(self._area(reading.shape, s, reading.position, a.shape[1]) - area))
        return Scene(reading.colour, reading.shape, reading.position, size, background)

    def _area(self, shape: str, size: str, position: str, side: int) -> float:
        """The shape's area at this size and place (a large shape in a corner is cut by the border)."""
        from ..demo.data import Scene, render
        from ..demo.evaluate import foreground

        key = (shape, size, position, side)
        if key not in self._areas:
            self._areas[key] = foreground(render(Scene("red", shape, position, size, "white"), side=side))[2].mean()
        return self._areas[key]

    def caption(self, images: list, detail: str = "short") -> list[str]:
        out = []
        for image in images:
            scene = self.read(image)
            if scene is None:
                out.append("an image")
                continue
            lines = [scene.caption]
            if detail == "detailed":
                lines += [scene.short_caption(*d) for d in (("colour",), ("position",), ("background",),
                                                           ("colour", "background"))]
            out.append("\n".join(lines))
        return out

    def with_trigger(self, caption: str, trigger: str) -> str:
        """The shape the demo model does not know (a ring) is what a LoRA teaches: the trigger word names it, as
        in the demo's LoRA data ('a red zxq in the top left ...'); other captions get the trigger first."""
        from ..demo.data import NEW_SHAPE

        if re.search(rf"\b{NEW_SHAPE}\b", caption):
            return re.sub(rf"\b{NEW_SHAPE}\b", trigger, caption)
        return super().with_trigger(caption, trigger)


class Florence2(Captioner):
    TASKS: ClassVar = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>"}

    def __init__(self, source: str, name: str, device: str = "cpu"):
        import torch
        from transformers import AutoProcessor, Florence2ForConditionalGeneration

        self.name, self.device = name, device
        self.processor = AutoProcessor.from_pretrained(source)
        self.model = Florence2ForConditionalGeneration.from_pretrained(source, dtype=torch.float32).to(device).eval()

    def caption(self, images: list, detail: str = "short") -> list[str]:
        import torch

        task = self.TASKS[detail]
        rgb = [im.convert("RGB") for im in images]
        inputs = self.processor(text=[task] * len(rgb), images=rgb, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            ids = self.model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                      max_new_tokens=256 if detail == "detailed" else 64, num_beams=3,
                                      do_sample=False)
        texts = self.processor.batch_decode(ids, skip_special_tokens=False)
        return [str(self.processor.post_process_generation(t, task=task, image_size=im.size)[task]).strip()
                for t, im in zip(texts, rgb, strict=True)]

    def close(self) -> None:
        del self.model


class QwenVL(Captioner):
    """Qwen2.5-VL with an instruction. Its image processor and tokenizer are used directly (the chat template, then
    one image-pad token per merged patch), as its processor does for images: the processor also builds a video
    processor, which needs torchvision, and a captioner has no video."""

    PROMPTS: ClassVar = {"short": "Describe this image in one sentence, for training an image model.",
                         "detailed": "Describe this image in one detailed paragraph (subject, colours, setting, style, "
                                     "composition), for training an image model."}

    def __init__(self, source: str, name: str, device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        self.name, self.device = name, device
        self.images = AutoImageProcessor.from_pretrained(source)
        self.tokenizer = AutoTokenizer.from_pretrained(source)
        self.model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source, dtype=torch.float32).to(device).eval()

    def caption(self, images: list, detail: str = "short") -> list[str]:
        import torch

        pad = "<|image_pad|>"
        out = []
        for im in images:  # one at a time: images of different sizes give different token counts
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": self.PROMPTS[detail]}]}]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            pixels = self.images(images=[im.convert("RGB")], return_tensors="pt")
            count = int(pixels["image_grid_thw"][0].prod()) // self.images.merge_size ** 2
            ids = self.tokenizer([text.replace(pad, pad * count, 1)], return_tensors="pt")
            with torch.inference_mode():
                gen = self.model.generate(input_ids=ids["input_ids"].to(self.device),
                                          attention_mask=ids["attention_mask"].to(self.device),
                                          pixel_values=pixels["pixel_values"].to(self.device),
                                          image_grid_thw=pixels["image_grid_thw"].to(self.device),
                                          max_new_tokens=200 if detail == "detailed" else 60, do_sample=False)
            out.append(self.tokenizer.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
        return out

    def close(self) -> None:
        del self.model


def _kind_of(config: dict, where: str) -> str:
    if "auto_map" in config:
        raise UserError(f"{where} asks for remote code (auto_map in its config.json); fluxlab runs transformers' own "
                        f"classes only: use a native-format repo such as florence-community/Florence-2-large")
    kinds = {v: k for k, v in MODEL_TYPES.items()}
    kind = kinds.get(config.get("model_type"))
    if kind is None:
        raise UserError(f"{where} is not a captioner (model_type {config.get('model_type')!r}); captioners: "
                        f"{', '.join(CAPTIONERS)}, or a Florence-2 or Qwen2.5-VL folder")
    return kind


def resolve(name: str) -> tuple[str, str, str]:
    """(kind, source, label) of a captioner name, local folder or hub repo; a one-line UserError otherwise."""
    from ..spec.catalog import CATALOG

    if name in CAPTIONERS:
        spec = CAPTIONERS[name]
        return spec.kind, spec.repo, name
    if name in CATALOG:
        raise UserError(f"{name} is an image model, not a captioner; captioners: {', '.join(CAPTIONERS)}")
    p = Path(name).expanduser()
    if p.is_dir():
        f = p / "config.json"
        try:
            config = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{name} has no readable config.json ({type(e).__name__}); give a captioner folder "
                            f"(Florence-2, Qwen2.5-VL) or one of: {', '.join(CAPTIONERS)}") from None
        return _kind_of(config, name), str(p.resolve()), p.name
    if re.match(r"^[\w.-]+/[\w.-]+$", name):
        return _kind_of(_hub_config(name), name), name, name
    raise UserError(f"unknown captioner {name!r}; captioners: {', '.join(CAPTIONERS)} (or a local folder, or a hub "
                    f"repo id)")


def _hub_config(repo: str) -> dict:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
    except GatedRepoError:
        raise UserError(f"{repo} is gated: accept its licence on its hub page, then log in (hf auth login)") from None
    except RepositoryNotFoundError:
        raise UserError(f"no hub repo {repo!r} (or it is private)") from None
    except LocalEntryNotFoundError:
        raise UserError(f"captioner {repo} is not in the local cache and the hub cannot be reached; download it on "
                        f"a connected machine (hf download {repo}) or give a local folder") from None


def load(name: str, device: str = "cpu") -> Captioner:
    kind, source, label = resolve(name)
    if kind == "demo":
        return DemoCaptioner()
    if not Path(source).is_dir():  # a hub repo: its config first, for a one-line answer offline or on remote code
        _kind_of(_hub_config(source), source)
    if kind == "florence2":
        return Florence2(source, label, device)
    return QwenVL(source, label, device)
