"""Build full-size random-weight FLUX.2 [klein] 4B components in diffusers format, once, with no download.

    python bench/build_klein4b.py [--out bench/cache/klein-4b]

Transformer: 128 latent channels, 5 double + 20 single blocks, 24 heads x 128, context 7680 (3 x 2560), no
guidance embedding. Text encoder: Qwen3-4B's shape (hidden 2560, 36 layers, 32 heads, 8 KV heads,
intermediate 9728) with a word-level tokenizer trained locally. VAE: the default FLUX.2 VAE. Weights are
random (timing and memory do not depend on their values), built one model at a time in bf16 so the build
itself stays under ~9 GB of RAM. Both fluxlab and diffusers load the same files.
"""

from __future__ import annotations

if __name__ == "__main__":  # in the project's .venv, whatever python started this
    import project_venv

    project_venv.use()

import argparse
import gc
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/cache/klein-4b")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t0 = time.time()

    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fluxlab.tiny import QWEN3_CHAT_TEMPLATE, SHIFTED_SCHEDULER, _word_tokenizer

    tok = _word_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], unk="<unk>",
                          pad_token="<|endoftext|>", eos_token="<|im_end|>")
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.save_pretrained(out / "tokenizer")
    FlowMatchEulerDiscreteScheduler(**SHIFTED_SCHEDULER).save_pretrained(out / "scheduler")

    torch.set_default_dtype(torch.bfloat16)
    if not (out / "transformer" / "config.json").exists():
        t = Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20,
                                    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
                                    timestep_guidance_channels=256, axes_dims_rope=(32, 32, 32, 32),
                                    guidance_embeds=False)
        t.save_pretrained(out / "transformer", safe_serialization=True, max_shard_size="20GB")
        print(f"transformer: {sum(p.numel() for p in t.parameters()) / 1e9:.2f} B params ({time.time() - t0:.0f} s)")
        del t
        gc.collect()
    if not (out / "text_encoder" / "config.json").exists():
        te = Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=2560, intermediate_size=9728,
                                          num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                                          head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True,
                                          rope_theta=1000000, rms_norm_eps=1e-6))
        te.save_pretrained(out / "text_encoder", safe_serialization=True, max_shard_size="20GB")
        print(f"text encoder: {sum(p.numel() for p in te.parameters()) / 1e9:.2f} B params ({time.time() - t0:.0f} s)")
        del te
        gc.collect()
    if not (out / "vae" / "config.json").exists():
        vae = AutoencoderKLFlux2()
        vae.save_pretrained(out / "vae", safe_serialization=True)
        del vae
    torch.set_default_dtype(torch.float32)
    index = {
        "_class_name": "Flux2KleinPipeline", "_diffusers_version": "0.42.1", "is_distilled": True,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3ForCausalLM"], "tokenizer": ["transformers", "TokenizersBackend"],
        "transformer": ["diffusers", "Flux2Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLFlux2"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    print(f"built {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
