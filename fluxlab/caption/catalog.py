"""The captioners fluxlab knows by name, beside the models' catalog: one declarative table.

Each is loaded through transformers' own classes (never a repo's remote code), from a hub id, the cache or a local
folder, like the image models; `demo` is the rules captioner bundled for the demo model (no weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["florence2", "qwen2_5_vl", "demo"]


@dataclass(frozen=True)
class CaptionerSpec:
    name: str
    repo: str
    kind: Kind
    description: str
    size_gb: float  # bf16 weights, approximate
    license: str


CAPTIONERS: dict[str, CaptionerSpec] = {
    c.name: c
    for c in [
        CaptionerSpec("florence-2-large", "florence-community/Florence-2-large", "florence2",
                      "Florence-2 large (0.77B): short or detailed captions", 1.6, "mit"),
        CaptionerSpec("florence-2-base", "florence-community/Florence-2-base", "florence2",
                      "Florence-2 base (0.23B): the smallest real captioner", 0.5, "mit"),
        CaptionerSpec("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", "qwen2_5_vl",
                      "Qwen2.5-VL 3B: follows an instruction, writes prose", 7.5, "qwen-research"),
        CaptionerSpec("demo", "", "demo",
                      "the demo model's captioner: reads colour, shape, place, size and background (rules, no "
                      "weights)", 0.0, "apache-2.0"),
    ]
}
DEFAULT = "florence-2-large"
# transformers model types each loader handles: a folder or hub repo of another type is not a captioner.
MODEL_TYPES = {"florence2": "florence2", "qwen2_5_vl": "qwen2_5_vl"}
