"""The model catalog: one declarative table of the models fluxlab knows by name.

CLI, Python API, docs and the memory planner read it; nothing writes to it at run time. Hyperparameters that
a downloaded model describes itself (layer counts, scheduler config) are read from its files at load time;
the catalog holds what the files do not say: which repo, which defaults, which licence, how big.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Family = Literal["flux1", "flux2"]
# How guidance enters the model: "none" (distilled: ignored), "embedded" (guidance-distilled dev models feed
# g through an embedding), "cfg" (real classifier-free guidance: a second pass with the negative prompt).
GuidanceMode = Literal["none", "embedded", "cfg"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # The model's owner/name as Replicate's API and clients write it (black-forest-labs/flux-schnell): the name a
    # Replicate-shaped request may use for it on `fluxlab serve`.
    ref: str
    repo: str
    family: Family
    description: str
    steps: int
    guidance: float
    guidance_mode: GuidanceMode
    max_sequence_length: int
    text_encoder: str  # the encoder checkpoint this model must be paired with
    license: str
    gated: bool
    sizes_gb: dict[str, float] = field(default_factory=dict)  # sizes in the model's own dtype (bf16; demo fp32)
    schedule: str = ""  # the reference schedule, in words (the numbers come from scheduler_config.json)
    min_side: int = 64
    max_side: int = 2048
    default_size: tuple[int, int] = (1024, 1024)  # width, height
    # Reference images for in-context editing: klein is documented for up to 4, FLUX.2 [dev] for 10,
    # FLUX.1 Kontext takes one; plain FLUX.1 none.
    max_references: int = 4
    # klein 9B-KV: reference tokens attend only to themselves at a fixed timestep, so their K/V are
    # computed once and reused across steps.
    kv_references: bool = False
    # FLUX.1 Fill: inpainting by conditioning (masked image and mask as extra input channels) instead of by
    # re-imposing the known region; needs --init and --mask.
    fill: bool = False
    # A model shipped inside the package (a path relative to fluxlab/), needing no download.
    bundled: str = ""
    # What `--dtype auto` means for this model: "auto" is bf16 on GPUs and AMX CPUs, fp32 elsewhere. The demo
    # says fp32: at 11.8 MB bf16 saves nothing, and fp32 gives its image (and diffusers parity) on every CPU.
    dtype: str = "auto"

    @property
    def distilled(self) -> bool:
        return self.guidance_mode == "none"


_KLEIN_SCHEDULE = "FLUX.2 empirical mu (depends on tokens and steps), exponential shift"

CATALOG: dict[str, ModelSpec] = {
    m.name: m
    for m in [
        ModelSpec(
            name="flux2-klein-4b",
            ref="black-forest-labs/flux-2-klein-4b",
            repo="black-forest-labs/FLUX.2-klein-4B",
            family="flux2",
            description="FLUX.2 [klein] 4B, step-distilled: 4 steps, no guidance",
            steps=4, guidance=1.0, guidance_mode="none", max_sequence_length=512,
            text_encoder="Qwen/Qwen3-4B", license="apache-2.0", gated=False,
            sizes_gb={"transformer": 7.75, "text_encoder": 8.05, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_side=1792,
        ),
        ModelSpec(
            name="flux2-klein-9b",
            ref="black-forest-labs/flux-2-klein-9b",
            repo="black-forest-labs/FLUX.2-klein-9B",
            family="flux2",
            description="FLUX.2 [klein] 9B, step-distilled: 4 steps, no guidance",
            steps=4, guidance=1.0, guidance_mode="none", max_sequence_length=512,
            text_encoder="Qwen/Qwen3-8B", license="flux-non-commercial", gated=True,
            sizes_gb={"transformer": 18.2, "text_encoder": 16.4, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_side=1792,
        ),
        ModelSpec(
            name="flux2-klein-base-4b",
            ref="black-forest-labs/flux-2-klein-base-4b",
            repo="black-forest-labs/FLUX.2-klein-base-4B",
            family="flux2",
            description="FLUX.2 [klein] base 4B: 50 steps, real CFG 4.0 with a negative prompt; for fine-tuning",
            steps=50, guidance=4.0, guidance_mode="cfg", max_sequence_length=512,
            text_encoder="Qwen/Qwen3-4B", license="apache-2.0", gated=False,
            sizes_gb={"transformer": 7.75, "text_encoder": 8.05, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_side=1792,
        ),
        ModelSpec(
            name="flux2-klein-base-9b",
            ref="black-forest-labs/flux-2-klein-base-9b",
            repo="black-forest-labs/FLUX.2-klein-base-9B",
            family="flux2",
            description="FLUX.2 [klein] base 9B: 50 steps, real CFG 4.0 with a negative prompt; for fine-tuning",
            steps=50, guidance=4.0, guidance_mode="cfg", max_sequence_length=512,
            text_encoder="Qwen/Qwen3-8B", license="flux-non-commercial", gated=True,
            sizes_gb={"transformer": 18.2, "text_encoder": 16.4, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_side=1792,
        ),
        ModelSpec(
            name="flux2-klein-9b-kv",
            ref="black-forest-labs/flux-2-klein-9b-kv",
            repo="black-forest-labs/FLUX.2-klein-9b-kv",
            family="flux2",
            description="FLUX.2 [klein] 9B with cached reference K/V: faster multi-reference editing, 4 steps",
            steps=4, guidance=1.0, guidance_mode="none", max_sequence_length=512,
            text_encoder="Qwen/Qwen3-8B", license="flux-non-commercial", gated=True,
            sizes_gb={"transformer": 18.2, "text_encoder": 16.4, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_side=1792, kv_references=True,
        ),
        ModelSpec(
            name="flux2-dev",
            ref="black-forest-labs/flux-2-dev",
            repo="black-forest-labs/FLUX.2-dev",
            family="flux2",
            description="FLUX.2 [dev] 32B: 50 steps, embedded guidance 4.0, Mistral Small 3.2 encoder",
            steps=50, guidance=4.0, guidance_mode="embedded", max_sequence_length=512,
            text_encoder="mistralai/Mistral-Small-3.2-24B-Instruct-2506", license="flux-dev-non-commercial",
            gated=True, sizes_gb={"transformer": 64.4, "text_encoder": 48.0, "vae": 0.17},
            schedule=_KLEIN_SCHEDULE, max_references=10,
        ),
        ModelSpec(
            name="flux1-schnell",
            ref="black-forest-labs/flux-schnell",
            repo="black-forest-labs/FLUX.1-schnell",
            family="flux1",
            description="FLUX.1 [schnell] 12B, timestep-distilled: 4 steps, no guidance",
            steps=4, guidance=0.0, guidance_mode="none", max_sequence_length=256,
            text_encoder="google/t5-v1_1-xxl + openai/clip-vit-large-patch14", license="apache-2.0",
            gated=False, sizes_gb={"transformer": 23.8, "text_encoder": 9.77, "vae": 0.17},
            schedule="linear (unshifted)", max_references=0,
        ),
        ModelSpec(
            name="flux1-dev",
            ref="black-forest-labs/flux-dev",
            repo="black-forest-labs/FLUX.1-dev",
            family="flux1",
            # 28 steps: the diffusers FluxPipeline default and the common practice for dev; BFL's CLI uses 50,
            # which costs 1.8x the time for differences that are hard to see at 1024x1024.
            description="FLUX.1 [dev] 12B, guidance-distilled: 28 steps, embedded guidance 3.5",
            steps=28, guidance=3.5, guidance_mode="embedded", max_sequence_length=512,
            text_encoder="google/t5-v1_1-xxl + openai/clip-vit-large-patch14",
            license="flux-dev-non-commercial", gated=True,
            sizes_gb={"transformer": 23.8, "text_encoder": 9.77, "vae": 0.17},
            schedule="FLUX.1 linear mu (256 tokens -> 0.5, 4096 -> 1.15), exponential shift", max_references=0,
        ),
        ModelSpec(
            name="flux1-fill-dev",
            ref="black-forest-labs/flux-fill-dev",
            repo="black-forest-labs/FLUX.1-Fill-dev",
            family="flux1",
            description="FLUX.1 Fill [dev]: inpainting and outpainting (--init, --mask), 50 steps, guidance 30",
            steps=50, guidance=30.0, guidance_mode="embedded", max_sequence_length=512,
            text_encoder="google/t5-v1_1-xxl + openai/clip-vit-large-patch14",
            license="flux-dev-non-commercial", gated=True,
            sizes_gb={"transformer": 23.8, "text_encoder": 9.77, "vae": 0.17},
            schedule="FLUX.1 linear mu, exponential shift", max_references=0, fill=True,
        ),
        ModelSpec(
            name="demo",
            ref="fluxlab/demo",
            repo="",
            family="flux2",
            description="bundled 64x64 shapes model (klein architecture, trained by fluxlab): offline, CPU, < 1 s",
            steps=20, guidance=4.0, guidance_mode="cfg", max_sequence_length=24,
            text_encoder="bundled Qwen3-architecture toy encoder", license="apache-2.0", gated=False,
            sizes_gb={"transformer": 0.008, "text_encoder": 0.0007, "vae": 0.003},
            schedule=_KLEIN_SCHEDULE, min_side=64, max_side=256, default_size=(64, 64), max_references=4,
            bundled="demo/model", dtype="fp32",
        ),
        ModelSpec(
            name="flux1-kontext-dev",
            ref="black-forest-labs/flux-kontext-dev",
            repo="black-forest-labs/FLUX.1-Kontext-dev",
            family="flux1",
            # BFL's Kontext CLI defaults: 30 steps were tuned for it; 28 is diffusers' default and indistinguishable.
            description="FLUX.1 Kontext [dev]: instruction editing of one input image (--image), guidance 2.5",
            steps=28, guidance=2.5, guidance_mode="embedded", max_sequence_length=512,
            text_encoder="google/t5-v1_1-xxl + openai/clip-vit-large-patch14",
            license="flux-dev-non-commercial", gated=True,
            sizes_gb={"transformer": 23.8, "text_encoder": 9.77, "vae": 0.17},
            schedule="FLUX.1 linear mu, exponential shift", max_references=1,
        ),
    ]
}


# Defaults a pipeline directory may state for itself in fluxlab.json (the files say nothing of them).
OVERRIDABLE = ("description", "steps", "guidance", "max_sequence_length", "min_side", "max_side", "default_size",
               "dtype")


def text_encoder_layers(num_layers: int) -> tuple[int, int, int]:
    """The hidden-state indices FLUX.2 stacks: L/4, L/2, 3L/4 of an L-layer encoder.

    Gives (9, 18, 27) for Qwen3-4B/8B (36 layers) and (10, 20, 30) for Mistral Small (40 layers), the
    values the reference code hard-codes, and a consistent choice for any other encoder depth.
    """
    return (num_layers // 4, num_layers // 2, 3 * num_layers // 4)


def bundled_path(spec: ModelSpec):
    """Where a model shipped inside the package lives (`spec.bundled` is relative to the fluxlab package)."""
    from pathlib import Path

    return Path(__file__).resolve().parent.parent / spec.bundled
