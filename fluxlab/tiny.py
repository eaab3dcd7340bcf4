"""Tiny random FLUX pipelines, built locally with no download, saved in diffusers format.

Tests, quick benchmarks and examples need real pipelines that both fluxlab and diffusers can load. Real
weights live behind a hub; these builders make the same architectures at toy size (1 block of each kind,
2 heads, word-level tokenizers trained on a handful of sentences), deterministically from a seed.

    from fluxlab.tiny import build_tiny
    path = build_tiny("flux2-klein", "/tmp/tiny-klein")
"""

from __future__ import annotations

import json
from pathlib import Path

# A Qwen3-style chat template (the real one, reduced to the branch FLUX.2 klein uses: one user turn,
# generation prompt, thinking disabled, which emits an empty <think></think> block).
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)

CORPUS = [
    "a red circle in the top left on a white background",
    "a blue square in the center on a black background",
    "a green triangle at the bottom right on a yellow background",
    "a photo of a cat holding a sign that says hello world",
    "portrait of a renaissance nobleman, oil painting style",
    "a watercolor landscape with mountains and a lake at sunset",
]

KINDS = ("flux2-klein", "flux2-klein-base", "flux2-dev", "flux2-klein-kv", "flux1-schnell", "flux1-dev",
         "flux1-kontext", "flux1-fill")

# A Mistral-style chat template for the tiny FLUX.2 [dev] encoder: system and user turns whose content is a
# list of typed parts, as diffusers' Flux2Pipeline formats them.
MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}[/SYSTEM_PROMPT]{% else %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}[IMG]{% endif %}{% endfor %}"
    "[/INST]{% endif %}{% endfor %}"
)

# Scheduler configs as published with the real models (FLUX.1-dev's is reused by FLUX.2).
SHIFTED_SCHEDULER = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
SCHNELL_SCHEDULER = {**SHIFTED_SCHEDULER, "shift": 1.0, "use_dynamic_shifting": False}


def _word_tokenizer(specials: list[str], unk: str, **kwargs):
    """A word-level fast tokenizer trained on CORPUS (plus the chat-template words)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=[unk, *specials])
    tok.train_from_iterator([*CORPUS, "user assistant system think"], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, **kwargs)


def _with_eos(tokenizer, eos: str):
    """Append EOS to every encoded sequence, as T5 and CLIP tokenizers do."""
    from tokenizers import processors

    eos_id = tokenizer.convert_tokens_to_ids(eos)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", special_tokens=[(eos, eos_id)]
    )
    return tokenizer


def tiny_flux2_components(distilled: bool = True, seed: int = 0, text_layers: int = 4):
    import torch
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = _word_tokenizer(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        unk="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    hidden = 16
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=32,
            num_hidden_layers=text_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            max_position_embeddings=1024,
            tie_word_embeddings=False,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * hidden,
        timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False,
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLFlux2(
        block_out_channels=(4, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
    )
    # Random batch-norm statistics, so the latent (de)normalisation is exercised, not the identity.
    g = torch.Generator().manual_seed(seed + 3)
    vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.1)
    vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) + 0.5)
    scheduler = FlowMatchEulerDiscreteScheduler(**SHIFTED_SCHEDULER)
    return dict(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer.eval(),
        is_distilled=distilled,
    )


def tiny_flux2_dev_components(seed: int = 0, text_layers: int = 4):
    """FLUX.2 [dev] at toy size: a Mistral3 encoder and a guidance-embedding transformer.

    The real model pairs Mistral with a PixtralProcessor, which needs torchvision; the pipeline only calls its
    chat template, so a plain tokenizer with a Mistral-style template stands in for it here.
    """
    import torch
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    parts = tiny_flux2_components(distilled=False, seed=seed, text_layers=text_layers)
    tokenizer = _word_tokenizer(
        ["<pad>", "<s>", "</s>", "[IMG]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"],
        unk="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>",
    )
    tokenizer.chat_template = MISTRAL_CHAT_TEMPLATE
    hidden = parts["text_encoder"].config.hidden_size
    torch.manual_seed(seed)
    text_encoder = Mistral3ForConditionalGeneration(
        Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=len(tokenizer), hidden_size=hidden,
                             intermediate_size=32, num_hidden_layers=text_layers, num_attention_heads=2,
                             num_key_value_heads=1, head_dim=8, max_position_embeddings=1024),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=4, head_dim=8),
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=1,
        )
    ).eval()
    t = parts["transformer"]
    torch.manual_seed(seed + 1)
    transformer = type(t)(**{**t.config, "guidance_embeds": True}).eval()
    del parts["is_distilled"]
    return {**parts, "text_encoder": text_encoder, "tokenizer": tokenizer, "transformer": transformer}


def tiny_flux1_components(guidance_embeds: bool, seed: int = 0, fill: bool = False):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok = _with_eos(
        _word_tokenizer(["<|endoftext|>", "<|startoftext|>"], unk="<unk>", pad_token="<|endoftext|>",
                        eos_token="<|endoftext|>", model_max_length=77),
        "<|endoftext|>",
    )
    t5_tok = _with_eos(
        _word_tokenizer(["<pad>", "</s>"], unk="<unk>", pad_token="<pad>", eos_token="</s>",
                        model_max_length=512),
        "</s>",
    )
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            eos_token_id=clip_tok.eos_token_id,
            pad_token_id=clip_tok.pad_token_id,
            bos_token_id=clip_tok.convert_tokens_to_ids("<|startoftext|>"),
        )
    ).eval()
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tok),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=t5_tok.pad_token_id,
            eos_token_id=t5_tok.eos_token_id,
            decoder_start_token_id=t5_tok.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    # Fill takes packed latents (16), the masked image's packed latents (16) and the 8x8-folded mask (256).
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 + 16 + 256 if fill else 16,
        out_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 8, 8, 8),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=32,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(**(SHIFTED_SCHEDULER if guidance_embeds else SCHNELL_SCHEDULER))
    return dict(
        scheduler=scheduler,
        vae=vae.eval(),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer.eval(),
    )


def build_pipeline(kind: str, seed: int = 0):
    """The diffusers pipeline object for a tiny model of `kind` (one of KINDS)."""
    import diffusers

    builders = {
        "flux2-klein": ("Flux2KleinPipeline", lambda: tiny_flux2_components(distilled=True, seed=seed)),
        "flux2-klein-base": ("Flux2KleinPipeline", lambda: tiny_flux2_components(distilled=False, seed=seed)),
        "flux2-dev": ("Flux2Pipeline", lambda: tiny_flux2_dev_components(seed=seed)),
        "flux2-klein-kv": ("Flux2KleinKVPipeline", lambda: tiny_flux2_components(distilled=True, seed=seed)),
        "flux1-kontext": ("FluxKontextPipeline", lambda: tiny_flux1_components(guidance_embeds=True, seed=seed)),
        "flux1-fill": ("FluxFillPipeline", lambda: tiny_flux1_components(guidance_embeds=True, seed=seed, fill=True)),
        "flux1-schnell": ("FluxPipeline", lambda: tiny_flux1_components(guidance_embeds=False, seed=seed)),
        "flux1-dev": ("FluxPipeline", lambda: tiny_flux1_components(guidance_embeds=True, seed=seed)),
    }
    if kind not in builders:
        raise ValueError(f"unknown tiny model kind {kind!r}; valid: {', '.join(KINDS)}")
    cls, parts = builders[kind]
    return getattr(diffusers, cls)(**parts())


def build_tiny(kind: str, path: str | Path, seed: int = 0) -> Path:
    """Build a tiny random pipeline of `kind` and save it in diffusers format at `path`."""
    path = Path(path)
    pipe = build_pipeline(kind, seed=seed)
    pipe.save_pretrained(path, safe_serialization=True)
    # Record what this is, for people who find the folder later.
    (path / "TINY.json").write_text(json.dumps({"kind": kind, "seed": seed, "random_weights": True}) + "\n")
    return path


def build_tiny_florence2(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Florence-2 captioner (transformers' native classes and processor) saved at `path`: a word-level
    tokenizer with Florence-2's special and location tokens, a 64x64 image processor, a 4-stage DaViT of 1 block
    each and a 1-layer BART, as a real one is laid out."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import (
        BartConfig,
        CLIPImageProcessor,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
        PreTrainedTokenizerFast,
    )

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<mask>", "<image>"] + [f"<loc_{i}>" for i in range(1000)]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([*CORPUS, "what does the image describe ?", "describe in detail what is shown in the "
                             "image ."], trainer=trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 1), ("</s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", mask_token="<mask>",
                                        extra_special_tokens={"image_token": "<image>"})
    # 64x64 pixels through strides 4, 2, 2, 2: 2x2 patches and one pooled token per image.
    images = CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False, image_seq_length=5)
    images.image_seq_length = 5
    processor = Florence2Processor(image_processor=images, tokenizer=tokenizer,
                                   post_processor_config={"pure_text": {}})
    vision = Florence2VisionConfig(depths=[1, 1, 1, 1], embed_dim=[8, 16, 16, 16], num_heads=[1, 1, 1, 1],
                                   num_groups=[1, 1, 1, 1], projection_dim=16, window_size=2, drop_path_rate=0.0)
    text = BartConfig(vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                      max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      decoder_start_token_id=2, forced_eos_token_id=2)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(Florence2Config(vision_config=vision, text_config=text,
                                                              image_token_id=tokenizer.image_token_id)).eval()
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    (path / "TINY.json").write_text(json.dumps({"kind": "florence2", "seed": seed, "random_weights": True}) + "\n")
    return path


def build_tiny_qwen2_5_vl(path: str | Path, seed: int = 0) -> Path:
    """A tiny random Qwen2.5-VL captioner saved at `path` as a real one is laid out (config, weights, tokenizer with
    its chat template, image processor): a word-level tokenizer with Qwen's special tokens, 1 vision block and 1
    text layer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([*CORPUS, "describe this image in one sentence , for training an image model .",
                             "user assistant system"], trainer=trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        unk_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
        "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=128 * 128, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    ids = {n: tokenizer.convert_tokens_to_ids(n) for n in specials}
    config = Qwen2_5_VLConfig(
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32,
                       "window_size": 28, "fullatt_block_indexes": [0], "patch_size": 14, "spatial_merge_size": 2,
                       "temporal_patch_size": 2},
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    images.save_pretrained(path)
    (path / "TINY.json").write_text(json.dumps({"kind": "qwen2_5_vl", "seed": seed, "random_weights": True}) + "\n")
    return path
