"""FLUX.2 (klein, dev): Qwen3 / Mistral3 prompt encoding, 128-channel tokens, 4-D ids, batch-norm VAE latents.

Faithful to diffusers' Flux2KleinPipeline / Flux2Pipeline (and BFL's flux2 sampling code):
* the prompt goes through the chat template, is padded to 512 tokens, and the hidden states of three encoder
  layers (L/4, L/2, 3L/4) are stacked per token: (B, 512, 3*hidden);
* noise is (B, 128, H/16, W/16), flattened row-major to tokens; ids are (t, h, w, l) = (0, row, col, 0) for
  image tokens and (0, 0, 0, index) for text tokens;
* decoding undoes the VAE batch-norm (mean/var with eps) and the 2x2 patchify before the VAE decoder.
"""

from __future__ import annotations

import torch

from ...spec.catalog import text_encoder_layers
from ...spec.families import Flux2Rules
from ..schedule import flux2_mu
from . import Conditioning, Family, References

# FLUX.2 [dev]'s system message for Mistral (BFL flux2 text_encoder.py, also in diffusers' system_messages).
# The line break after "object" is part of the reference text (and so of the tokens the model was trained on).
MISTRAL_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)


class Flux2(Flux2Rules, Family):
    family = "flux2"

    def __init__(self, c, max_sequence_length: int = 512, layers: tuple[int, ...] | None = None):
        self.c = c
        self.max_sequence_length = max_sequence_length
        # Shapes come from the config files (c.config), so nothing is loaded before it is used. The layers are
        # those of the encoder as published, whether or not it is loaded cut short (loading.load_lean_encoder).
        cfg = c.config("text_encoder")
        depth = getattr(cfg, "text_config", cfg).num_hidden_layers
        self.layers = tuple(layers or text_encoder_layers(depth))
        self.vae_scale = 2 ** (len(c.config("vae").block_out_channels) - 1)
        self.latent_channels = c.config("transformer").in_channels  # after the 2x2 patchify
        self.guidance_embeds = bool(c.config("transformer").guidance_embeds)
        # FLUX.2 [dev] pairs with Mistral (system + user turns, content lists); klein with Qwen3 (one user turn).
        self.mistral = getattr(cfg, "model_type", "") == "mistral3"

    # -- prompt -------------------------------------------------------------------------------------
    def _tokenize(self, prompts: list[str]):
        tok = self.c.tokenizer
        if self.mistral:
            messages = [
                [
                    {"role": "system", "content": [{"type": "text", "text": MISTRAL_SYSTEM_MESSAGE}]},
                    {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]},
                ]
                for p in prompts
            ]
            inputs = tok.apply_chat_template(
                messages, add_generation_prompt=False, tokenize=True, return_dict=True, return_tensors="pt",
                padding="max_length", truncation=True, max_length=self.max_sequence_length,
            )
            return inputs["input_ids"], inputs["attention_mask"]
        ids, masks = [], []
        for p in prompts:
            text = tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            t = tok(text, return_tensors="pt", padding="max_length", truncation=True,
                    max_length=self.max_sequence_length)
            ids.append(t["input_ids"])
            masks.append(t["attention_mask"])
        return torch.cat(ids), torch.cat(masks)

    def token_count(self, prompt: str) -> tuple[int, int]:
        """(tokens the encoder reads, tokens the prompt has) after the chat template, without padding."""
        tok = self.c.tokenizer
        if self.mistral:
            messages = [{"role": "system", "content": [{"type": "text", "text": MISTRAL_SYSTEM_MESSAGE}]},
                        {"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]}]
            ids = tok.apply_chat_template([messages], add_generation_prompt=False, tokenize=True, return_dict=True)
            total = len(ids["input_ids"][0])
        else:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
            total = len(tok(text)["input_ids"])
        return min(total, self.max_sequence_length), total

    def encode(self, prompts: list[str], device) -> Conditioning:
        input_ids, mask = self._tokenize(prompts)
        te = self.c.text_encoder
        out = te(input_ids=input_ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                 use_cache=False)
        h = torch.stack([out.hidden_states[k] for k in self.layers], dim=1).to(te.dtype)
        b, n, length, d = h.shape
        embeds = h.permute(0, 2, 1, 3).reshape(b, length, n * d)
        ids = torch.zeros(b, length, 4, dtype=torch.long)
        ids[..., 3] = torch.arange(length)
        return Conditioning(embeds, ids.to(device))

    def mu(self, image_tokens: int, steps: int, scheduler_config: dict) -> float:
        """FLUX.2's empirical shift, fitted on (tokens, steps)."""
        return flux2_mu(image_tokens, steps)

    # -- latents ------------------------------------------------------------------------------------
    def noise_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """Noise is drawn directly in the patchified 128-channel space, one value per token channel."""
        return (self.latent_channels, *self.latent_grid(width, height))

    def image_ids(self, batch: int, width: int, height: int, device):
        h, w = self.latent_grid(width, height)
        ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1))
        return ids.unsqueeze(0).expand(batch, -1, -1).to(device)

    # -- images --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, pixels, generator=None):
        """[-1, 1] pixels (1, 3, H, W) -> normalised, patchified latents (1, 128, H/16, W/16).

        The VAE posterior's mode (no sampling), as BFL and diffusers' klein pipelines do.
        """
        vae = self.c.vae
        z = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        b, c, h, w = z.shape
        z = z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        return ((z - mean) / std).to(pixels.device)  # the VAE may sit on another device (a split plan)

    def pack(self, z):
        """(B, C, h, w) latents -> (B, h*w, C) tokens, row-major."""
        return z.flatten(2).transpose(1, 2)

    def reference_tokens(self, latents: list):
        """Reference latents -> one token sequence with ids (t = 10, 20, 30, ...; h; w; 0), after the image."""
        tokens, ids = [], []
        for i, z in enumerate(latents):
            _, _, h, w = z.shape
            tokens.append(self.pack(z))
            t = torch.tensor([10 + 10 * i])
            ids.append(torch.cartesian_prod(t, torch.arange(h), torch.arange(w), torch.arange(1)))
        return torch.cat(tokens, dim=1), torch.cat(ids).unsqueeze(0)

    def reference_latents(self, images: list, dtype) -> list:
        """Reference images -> latents: area-capped (1024^2 for several, 2024^2 for one), cropped to multiples of
        16 and VAE-encoded one by one, as Flux2KleinPipeline prepares them."""
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        m = self.vae_scale * 2
        proc = Flux2ImageProcessor(vae_scale_factor=m, vae_latent_channels=self.c.config("vae").latent_channels)
        cap = 1024 * 1024 if len(images) > 1 else 2024 * 2024
        latents = []
        for img in images:
            if img.width * img.height > cap:
                img = proc._resize_to_target_area(img, cap)
            w, h = img.width // m * m, img.height // m * m
            pixels = proc.preprocess(img, height=h, width=w, resize_mode="crop")
            latents.append(self.encode_image(pixels.to(dtype)))
        return latents

    def inpaint_references(self, init, refs: list) -> list:
        """klein inpainting sees the init image as its first reference (Flux2KleinInpaintPipeline)."""
        return [init, *refs]

    def mask_tokens(self, mask, width: int, height: int):
        """A (1, 1, H, W) 0/1 mask -> per-token weights (1, h*w, 1), averaged over each token's 16x16 pixels."""
        h, w = self.latent_grid(width, height)
        m = torch.nn.functional.interpolate(mask, size=(h, w), mode="bilinear")
        return self.pack(m)

    # -- model ---------------------------------------------------------------------------------------
    def velocity(self, x, timestep, cond: Conditioning, img_ids, guidance: float | None, refs=None, extra=None):
        """One transformer call. `timestep` is sigma*1000 in the latents' dtype, as the reference passes it.

        Reference tokens (refs = (tokens, ids)) follow the image tokens; the prediction is sliced back to them.
        """
        g = None
        if self.guidance_embeds:
            g = torch.full([x.shape[0]], guidance, device=x.device, dtype=torch.float32)
        t = self.c.transformer
        common = dict(timestep=timestep / 1000, guidance=g, encoder_hidden_states=cond.embeds, txt_ids=cond.ids,
                      return_dict=False)
        if refs is not None and refs.kv:
            return self._velocity_kv(x, img_ids, refs, common)
        n = x.shape[1]
        if refs is not None:
            b = x.shape[0]
            x = torch.cat([x, refs.tokens.expand(b, -1, -1).to(x.dtype)], dim=1)
            img_ids = torch.cat([img_ids, refs.ids.expand(b, -1, -1)], dim=1)
        out = t(hidden_states=x.to(t.dtype), img_ids=img_ids, **common)[0]
        return out[:, :n]

    @staticmethod
    def use_kv_processors(transformer) -> None:
        """Install diffusers' KV-aware attention processors (klein KV models), as Flux2KleinKVPipeline does."""
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2KVAttnProcessor,
            Flux2KVParallelSelfAttnProcessor,
        )

        for block in transformer.transformer_blocks:
            block.attn.set_processor(Flux2KVAttnProcessor())
        for block in transformer.single_transformer_blocks:
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())

    def _velocity_kv(self, x, img_ids, refs: References, common: dict):
        """klein KV: references first, extracted once (they see only themselves), then served from the cache."""
        t = self.c.transformer
        if refs.cache is not None:
            return t(hidden_states=x.to(t.dtype), img_ids=img_ids, kv_cache=refs.cache, kv_cache_mode="cached",
                     **common)[0]
        b = x.shape[0]
        hidden = torch.cat([refs.tokens.expand(b, -1, -1), x], dim=1).to(t.dtype)
        ids = torch.cat([refs.ids.expand(b, -1, -1), img_ids], dim=1)
        out, cache = t(hidden_states=hidden, img_ids=ids, kv_cache_mode="extract",
                       num_ref_tokens=refs.tokens.shape[1], **common)
        if refs.reuse:
            refs.cache = cache
        return out

    # -- decode -------------------------------------------------------------------------------------
    def unpack(self, x, width: int, height: int):
        """Tokens -> denormalised VAE latents (B, C/4, 2h, 2w), the tensor the VAE decoder takes."""
        h, w = self.latent_grid(width, height)
        b, _, c = x.shape
        z = x.transpose(1, 2).reshape(b, c, h, w)
        bn = self.c.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.c.vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = z * std + mean
        # 2x2 un-patchify: (c pi pj) h w -> c (h pi) (w pj)
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return z

    @torch.no_grad()
    def decode(self, z):
        vae = self.c.vae
        return vae.decode(z.to(vae.device, vae.dtype), return_dict=False)[0]
