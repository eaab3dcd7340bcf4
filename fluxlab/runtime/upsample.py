"""Prompt upsampling: a short prompt rewritten into a detailed one by the model's own text encoder.

BFL's FLUX.2 code (and diffusers' `Flux2Pipeline.upsample_prompt`) has FLUX.2 [dev]'s Mistral encoder, a chat
model, rewrite the prompt under BFL's system messages: one for text-to-image, one for editing that also shows it
the reference images. klein's encoder is a Qwen3 causal language model, so the same works there (text only: it
reads no images). The messages are taken from diffusers, the generation is transformers' `generate`.

fluxlab loads FLUX.2 encoders only up to the deepest layer the image model reads, without the LM head
(loading.load_lean_encoder), so writing needs the whole language model: it is loaded from the same files only
when asked, kept beside the model for the next rewrite, and never used for the image's own encoding. Written by
hand because no library runs this over a lean encoder; the steps mirror diffusers' upsample_prompt (the same
chat template call, padding and decoding), which the tests check token for token on a tiny Mistral.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError

WRITERS = ("Qwen3ForCausalLM", "Mistral3ForConditionalGeneration")  # text encoders that are language models
MISTRAL_MAX_LENGTH = 2048  # diffusers pads and truncates the chat to this many tokens
MAX_IMAGE_PIXELS = 768**2  # reference images are shrunk to this area before Mistral sees them, as diffusers does


def why_not(spec, encoder_class: str) -> str | None:
    """Why a model cannot upsample prompts (None when it can)."""
    from ..spec.resolve import upsample_refusal

    if encoder_class not in WRITERS:
        return f"{spec.name} cannot upsample prompts: its text encoder ({encoder_class}) is not a language model"
    return upsample_refusal(spec)


def writer(model, notify):
    """The whole language model behind `model`'s text encoder, loaded from its files on first use and kept."""
    found = getattr(model, "_writer", None)
    if found is not None:
        return found
    import json

    import transformers

    from .memory import human

    index = json.loads((Path(model.path) / "model_index.json").read_text())
    cls = index["text_encoder"][1]
    reason = why_not(model.spec, cls)
    if reason:
        raise UserError(reason)
    folder = Path(model.path) / "text_encoder"
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    notify(f"prompt upsampling: loading the whole {cls} ({human(size)} on disk) beside the lean encoder the image "
           f"uses; it stays loaded for the next rewrite")
    lm = getattr(transformers, cls).from_pretrained(folder, dtype=model.dtype, use_safetensors=True).eval()
    lm.to(model.device)
    model._writer = lm
    return lm


def upsample(model, prompts: list[str], *, images=(), temperature: float = 0.15, max_tokens: int = 512,
             seed: int = 0, notify=lambda text: None) -> list[str]:
    """Each prompt rewritten by the model's text encoder. Seeded: the same inputs give the same rewrite
    (temperature 0: greedy, no sampling at all)."""
    import torch

    lm = writer(model, notify)
    inputs = chat_inputs(model, lm, prompts, images, notify)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []), torch.no_grad():
        torch.manual_seed(seed)
        out = lm.generate(**inputs, max_new_tokens=max_tokens, use_cache=True, **sampling)
    tok = model.components.tokenizer
    decoder = getattr(tok, "tokenizer", tok)  # a processor's own tokenizer
    texts = decoder.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=True)
    return [_cleaned(t, p) for t, p in zip(texts, prompts, strict=True)]


def chat_inputs(model, lm, prompts: list[str], images=(), notify=lambda text: None) -> dict:
    """The tokens the writer reads: BFL's system message (editing when there are images), the images for Mistral,
    the prompt, and the assistant's turn opened."""
    from diffusers.pipelines.flux2 import system_messages as bfl

    tok = model.components.tokenizer
    if getattr(lm.config, "model_type", "") == "mistral3":
        shown = [_shrunk(im) for im in images] if images else None
        system = bfl.SYSTEM_MESSAGE_UPSAMPLING_I2I if shown else bfl.SYSTEM_MESSAGE_UPSAMPLING_T2I
        inputs = tok.apply_chat_template(
            [chat(p, system, shown) for p in prompts], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", padding="max_length", truncation=True, max_length=MISTRAL_MAX_LENGTH)
    else:
        if images:
            notify("klein's text encoder reads no images: the rewrite sees only the prompt")
        texts = [tok.apply_chat_template([{"role": "system", "content": bfl.SYSTEM_MESSAGE_UPSAMPLING_T2I},
                                          {"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False) for p in prompts]
        inputs = tok(texts, return_tensors="pt", padding=True, padding_side="left")
    return {k: (v.to(model.device, lm.dtype) if k == "pixel_values" else v.to(model.device))
            for k, v in inputs.items() if k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}


def chat(prompt: str, system: str, images=None) -> list[dict]:
    """One conversation as BFL's format_input builds it: the system turn, the images (if any) as their own user
    turn, then the prompt."""
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}]
    if images:
        turns.append({"role": "user", "content": [{"type": "image", "image": im} for im in images]})
    turns.append({"role": "user", "content": [{"type": "text", "text": prompt.replace("[IMG]", "")}]})
    return turns


def _shrunk(image):
    w, h = image.size
    if w * h <= MAX_IMAGE_PIXELS:
        return image
    k = (MAX_IMAGE_PIXELS / (w * h)) ** 0.5
    return image.resize((max(1, int(w * k)), max(1, int(h * k))))


def _cleaned(text: str, original: str) -> str:
    """The rewrite without a reasoning block (Qwen3 may still open one) and outer whitespace; the original
    prompt when nothing usable came out."""
    text = re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.S).strip()
    return text or original
