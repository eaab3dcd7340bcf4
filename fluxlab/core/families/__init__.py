"""One small adapter per model family: what differs between FLUX.1 and FLUX.2.

An adapter knows how its family encodes prompts, shifts its schedule, lays out latent noise and position ids,
prepares reference and mask inputs, calls the transformer, and decodes latents. The generation stages
(core.stages) are shared and never branch on family. The torch-free rules (the size an input image is used at)
come from spec.families, which the resolver reads before any weights exist.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...spec.families import FamilyRules


@dataclass
class Conditioning:
    """Encoded prompts for a batch: per-token embeddings, their position ids, and (FLUX.1) pooled vectors."""

    embeds: Any
    ids: Any
    pooled: Any = None

    def select(self, rows):
        """The conditioning for the given batch rows (a list of indices into the encoded prompts)."""
        return Conditioning(
            self.embeds[rows],
            self.ids[rows] if self.ids.ndim == 3 else self.ids,
            None if self.pooled is None else self.pooled[rows],
        )

    def repeat(self, n: int) -> Conditioning:
        """One prompt's conditioning for a batch of n images (the encoder ran once)."""
        ids = self.ids if self.ids.ndim == 2 else self.ids.expand(n, -1, -1)
        pooled = None if self.pooled is None else self.pooled.expand(n, -1)
        return Conditioning(self.embeds.expand(n, -1, -1), ids, pooled)


@dataclass
class References:
    """Reference-image tokens that follow (FLUX.2, Kontext) the image tokens, with their position ids.

    With `kv` (klein KV models) the references attend only to themselves at a fixed timestep, so their K/V are
    computed on the first call and reused (`cache`) unless `reuse` is off.
    """

    tokens: Any
    ids: Any
    kv: bool = False
    reuse: bool = True
    cache: Any = None


class Family(FamilyRules):
    """What both adapters share: the token grid and the per-image noise. Subclasses set `vae_scale` and
    `latent_channels` and define `noise_shape` (the VAE-latent noise of one image), `pack` (to tokens), `mu`
    (the schedule's shift), `reference_latents` and `inpaint_references`."""

    vae_scale: int
    latent_channels: int

    def latent_grid(self, width: int, height: int) -> tuple[int, int]:
        """Token rows and columns: one token per 2x2 patch of VAE latents (16 px with the 8x VAE)."""
        m = self.vae_scale * 2
        return height // m, width // m

    def noise(self, generators, width: int, height: int, dtype):
        """Per-image noise from CPU generators (the same image on every device), packed to tokens."""
        import torch

        shape = self.noise_shape(width, height)
        return self.pack(torch.cat([torch.randn((1, *shape), generator=g, dtype=dtype) for g in generators]))

    def inpaint_references(self, init, refs: list) -> list:
        """The reference images an inpainting run conditions on (FLUX.1: only those given)."""
        return refs


def get_family(name: str):
    from . import flux1, flux2

    return {"flux1": flux1.Flux1, "flux2": flux2.Flux2}[name]
