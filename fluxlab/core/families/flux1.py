"""FLUX.1 (schnell, dev, and local FLUX.1-architecture models): CLIP + T5 prompts, 2x2-packed tokens, 3-D ids.

Faithful to diffusers' FluxPipeline (and BFL's flux sampling code):
* CLIP's pooled output (77 tokens) and T5's last hidden state (256 tokens for schnell, 512 for dev), no mask;
* noise is (B, 16, 2*(H/16), 2*(W/16)), packed 2x2 into (B, H/16*W/16, 64) tokens; ids (0, row, col),
  text ids all zero;
* decoding: unpack, then z / scaling_factor + shift_factor (0.3611, 0.1159 for the real VAE).
"""

from __future__ import annotations

import torch

from ...spec.families import Flux1Rules, kontext_size
from ..schedule import flux1_mu
from . import Conditioning, Family


class Flux1(Flux1Rules, Family):
    family = "flux1"

    def __init__(self, c, max_sequence_length: int = 512, layers=None):
        self.c = c
        self.max_sequence_length = max_sequence_length
        self.vae_scale = 2 ** (len(c.config("vae").block_out_channels) - 1)
        self.latent_channels = c.config("vae").latent_channels  # before the 2x2 packing
        self.guidance_embeds = bool(c.config("transformer").guidance_embeds)

    def token_count(self, prompt: str) -> tuple[int, int]:
        """(T5 tokens read, T5 tokens the prompt has); CLIP always reads its first 77, only its pooled vector."""
        total = len(self.c.tokenizer_2(prompt)["input_ids"])
        return min(total, self.max_sequence_length), total

    def encode(self, prompts: list[str], device) -> Conditioning:
        clip, t5 = self.c.text_encoder, self.c.text_encoder_2
        ids = self.c.tokenizer(prompts, padding="max_length", max_length=self.c.tokenizer.model_max_length,
                               truncation=True, return_tensors="pt").input_ids
        pooled = clip(ids.to(device), output_hidden_states=False).pooler_output.to(clip.dtype)
        ids = self.c.tokenizer_2(prompts, padding="max_length", max_length=self.max_sequence_length,
                                 truncation=True, return_tensors="pt").input_ids
        embeds = t5(ids.to(device), output_hidden_states=False)[0].to(t5.dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=device, dtype=clip.dtype)
        return Conditioning(embeds, txt_ids, pooled)

    def mu(self, image_tokens: int, steps: int, scheduler_config: dict) -> float:
        """FLUX.1's shift: linear in image tokens (the scheduler config's base/max shift)."""
        return flux1_mu(image_tokens, scheduler_config)

    def reference_latents(self, images: list, dtype) -> list:
        """Kontext: the input image resized to the closest Kontext training resolution, VAE-encoded (its mode)."""
        from diffusers.image_processor import VaeImageProcessor

        proc = VaeImageProcessor(vae_scale_factor=self.vae_scale * 2)
        latents = []
        for img in images:
            w, h = kontext_size(img.width, img.height)
            pixels = proc.preprocess(proc.resize(img, h, w), h, w)
            latents.append(self.encode_image(pixels.to(dtype)))
        return latents

    def noise_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """Noise is drawn in VAE-latent space (16 channels at H/8 x W/8), then packed 2x2."""
        h, w = self.latent_grid(width, height)
        return (self.latent_channels, 2 * h, 2 * w)

    def pack(self, x):
        """b c (h ph) (w pw) -> b (h w) (c ph pw)."""
        b, c, hh, ww = x.shape
        h, w = hh // 2, ww // 2
        return x.view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)

    @torch.no_grad()
    def encode_image(self, pixels, generator=None):
        """[-1, 1] pixels -> scaled VAE latents (1, 16, H/8, W/8).

        With a generator (img2img, inpainting): a *sample* of the posterior, as diffusers' FluxImg2ImgPipeline
        draws it (BFL takes the mean), before the image's noise and from the same per-image generator. Without
        (Kontext references): the posterior's mode.
        """
        vae = self.c.vae
        dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        z = dist.sample(generator) if generator is not None else dist.mode()
        return ((z - vae.config.shift_factor) * vae.config.scaling_factor).to(pixels.device)

    def reference_tokens(self, latents: list):
        """Kontext: the input image's packed tokens, with ids (1, row, col) after the image's (0, row, col)."""
        (z,) = latents
        _, _, hh, ww = z.shape
        ids = self.image_ids(1, ww * self.vae_scale, hh * self.vae_scale, z.device).clone()
        ids[..., 0] = 1
        return self.pack(z), ids

    def mask_tokens(self, mask, width: int, height: int):
        """A (1, 1, H, W) 0/1 mask -> (1, tokens, 64) weights: nearest-downsampled to the latent grid, packed."""
        h, w = self.latent_grid(width, height)
        m = torch.nn.functional.interpolate(mask, size=(2 * h, 2 * w))
        return self.pack(m.repeat(1, self.latent_channels, 1, 1))

    def image_ids(self, batch: int, width: int, height: int, device, dtype=None):
        h, w = self.latent_grid(width, height)
        ids = torch.zeros(h, w, 3)
        ids[..., 1] += torch.arange(h)[:, None]
        ids[..., 2] += torch.arange(w)[None, :]
        return ids.reshape(h * w, 3).to(device=device, dtype=dtype or self.c.dtype)

    def fill_condition(self, pixels, mask, generators, width: int, height: int):
        """FLUX.1 Fill's extra input channels: the masked image's latents (a posterior sample per image, drawn
        after its noise, as diffusers does) and the mask folded 8x8 into channels, both packed."""
        vae_scale = self.vae_scale
        masked = pixels * (1 - mask)
        z = torch.cat([self.encode_image(masked, g) for g in generators]).to(pixels.dtype)
        b = z.shape[0]
        h, w = z.shape[-2:]
        m = mask[:, 0].reshape(1, h, vae_scale, w, vae_scale).permute(0, 2, 4, 1, 3)
        m = m.reshape(1, vae_scale * vae_scale, h, w).expand(b, -1, -1, -1)
        return torch.cat([self.pack(z), self.pack(m.contiguous())], dim=-1)

    def velocity(self, x, timestep, cond: Conditioning, img_ids, guidance: float | None, refs=None, extra=None):
        g = None
        if self.guidance_embeds:
            g = torch.full([1], guidance, device=x.device, dtype=torch.float32).expand(x.shape[0])
        n = x.shape[1]
        if extra is not None:  # Fill: conditioning channels next to each token's latents
            x = torch.cat([x, extra], dim=2)
        if refs is not None:  # Kontext: the input image's tokens follow the image's
            x = torch.cat([x, refs.tokens.expand(x.shape[0], -1, -1).to(x.dtype)], dim=1)
            img_ids = torch.cat([img_ids, refs.ids], dim=0)
        out = self.c.transformer(hidden_states=x, timestep=timestep / 1000, guidance=g,
                                 pooled_projections=cond.pooled, encoder_hidden_states=cond.embeds,
                                 txt_ids=cond.ids, img_ids=img_ids, return_dict=False)[0]
        return out[:, :n]

    def unpack(self, x, width: int, height: int):
        h, w = self.latent_grid(width, height)
        b, _, c = x.shape
        z = x.view(b, h, w, c // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c // 4, h * 2, w * 2)
        cfg = self.c.vae.config
        return z / cfg.scaling_factor + cfg.shift_factor

    @torch.no_grad()
    def decode(self, z):
        vae = self.c.vae
        return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]
