"""fluxlab's own loop equals diffusers' pipelines on the same tiny random weights, seeds and settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

PROMPT = "a red circle in the top left on a white background"
W, H = 96, 64  # non-square on purpose: catches swapped height/width anywhere
SEEDS = (11, 12)


def _reference(kind, path, steps, guidance, negative=None, cache=None, seeds=SEEDS):
    from diffusers import DiffusionPipeline, FirstBlockCacheConfig

    ref = DiffusionPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    if cache is not None:  # a First Block Cache threshold, or any diffusers cache config
        ref.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache) if isinstance(cache, float) else cache)
    kw = dict(prompt=PROMPT, height=H, width=W, num_inference_steps=steps, guidance_scale=guidance,
              num_images_per_prompt=len(seeds))
    if kind.startswith("flux2"):
        kw["text_encoder_out_layers"] = (1, 2, 3)  # L/4, L/2, 3L/4 of the tiny 4-layer encoder
        if negative is not None:
            neg, _ = ref.encode_prompt(negative, device="cpu", text_encoder_out_layers=(1, 2, 3))
            kw["negative_prompt_embeds"] = neg
    else:
        kw["max_sequence_length"] = 256 if kind == "flux1-schnell" else 512

    def run(output_type):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        return ref(generator=gens, output_type=output_type, **kw).images

    lat = run("latent")
    if kind == "flux2-dev":  # Flux2Pipeline returns packed tokens: scatter, undo batch-norm and patchify
        b, _, c = lat.shape
        z = ref._unpack_latents_with_ids(lat, ref._prepare_latent_ids(torch.zeros(b, c, H // 16, W // 16)))
        bn = ref.vae.bn
        z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + ref.vae.config.batch_norm_eps)
        lat = ref._unpatchify_latents(z + bn.running_mean.view(1, -1, 1, 1))
    if kind.startswith("flux1"):  # FluxPipeline returns packed tokens; bring them to the VAE's input form
        lat = ref._unpack_latents(lat, H, W, ref.vae_scale_factor)
        lat = lat / ref.vae.config.scaling_factor + ref.vae.config.shift_factor
    return lat, run("pil")


@pytest.mark.parametrize(
    "kind,steps,guidance,negative",
    [
        ("flux2-klein", 4, 1.0, None),
        ("flux2-klein-base", 3, 4.0, "blurry, low quality"),
        ("flux2-dev", 3, 2.5, None),
        ("flux1-schnell", 4, 0.0, None),
        ("flux1-dev", 3, 3.5, None),
    ],
)
def test_latents_and_pixels_match_diffusers(tiny_dirs, tiny_pipes, kind, steps, guidance, negative):
    pipe = tiny_pipes[kind]
    fields = dict(prompt=PROMPT, width=W, height=H, steps=steps, seed=SEEDS[0], num_images=len(SEEDS))
    if pipe.spec.guidance_mode != "none":
        fields["guidance"] = guidance
    if negative is not None:
        fields["negative"] = negative
    ours = pipe.generate(**fields)
    ref_latents, ref_images = _reference(kind, tiny_dirs[kind], steps, guidance, negative)

    got = torch.cat([r.latents for r in ours])
    assert got.shape == ref_latents.shape
    assert (got - ref_latents).abs().max().item() <= 1e-5
    for r, im in zip(ours, ref_images, strict=True):
        a = np.asarray(r.image, dtype=np.int16)
        b = np.asarray(im, dtype=np.int16)
        assert a.shape == (H, W, 3)
        assert np.abs(a - b).max() <= 1


@pytest.mark.parametrize("kind,guidance,threshold", [("flux1-dev", 3.5, 0.3), ("flux1-schnell", 0.0, 0.9)])
def test_first_block_cache_is_diffusers_and_leaves_the_model_as_it_was(tiny_dirs, tiny_pipes, kind, guidance,
                                                                      threshold):
    """--cache fbc:T on our loop equals diffusers' pipeline with the same FirstBlockCacheConfig, image by image (the
    cache decides per forward batch: one image, so an image depends on its seed alone); the pooled model runs
    uncached afterwards exactly as before."""
    pipe, steps = tiny_pipes[kind], 8
    fields = dict(prompt=PROMPT, width=W, height=H, steps=steps, seed=SEEDS[1])
    if pipe.spec.guidance_mode != "none":
        fields["guidance"] = guidance
    cached = pipe.generate(**fields, cache=f"fbc:{threshold}")
    plain = pipe.generate(**fields)
    ref_latents, ref_images = _reference(kind, tiny_dirs[kind], steps, guidance, cache=threshold, seeds=SEEDS[1:])
    got = torch.cat([r.latents for r in cached])
    assert (got - ref_latents).abs().max().item() <= 1e-5
    for r, im in zip(cached, ref_images, strict=True):
        assert np.abs(np.asarray(r.image, dtype=np.int16) - np.asarray(im, dtype=np.int16)).max() <= 1
    assert (got - torch.cat([r.latents for r in plain])).abs().max().item() > 1e-3  # steps were skipped
    plain_ref, _ = _reference(kind, tiny_dirs[kind], steps, guidance, seeds=SEEDS[1:])
    assert (torch.cat([r.latents for r in plain]) - plain_ref).abs().max().item() <= 1e-5
    assert cached[0].metadata["request"]["cache"] == f"fbc:{threshold:g}"  # recorded: --from makes it again


@pytest.mark.parametrize("kind,guidance,negative", [("flux2-klein-base", 4.0, "blurry"), ("flux2-klein", 1.0, None),
                                                     ("flux1-dev", 3.5, None)])
def test_taylorseer_is_diffusers_on_both_families(tiny_dirs, tiny_pipes, kind, guidance, negative):
    """--cache taylorseer:N is diffusers' TaylorSeer hook (lite: whole steps predicted) on our loop: the same
    latents as diffusers' pipeline with the same config, over 10 steps (3 full, then one full in N); recorded, and
    the pooled model runs uncached afterwards exactly as before."""
    from diffusers.hooks import TaylorSeerCacheConfig

    pipe, steps = tiny_pipes[kind], 10
    fields = dict(prompt=PROMPT, width=W, height=H, steps=steps, seed=SEEDS[1])
    if pipe.spec.guidance_mode != "none":
        fields["guidance"] = guidance
    if negative is not None:
        fields["negative"] = negative
    plain = pipe.generate(**fields)
    cached = pipe.generate(**fields, cache="taylorseer:3")
    config = TaylorSeerCacheConfig(cache_interval=3, disable_cache_before_step=3, max_order=1,
                                   taylor_factors_dtype=torch.float32, use_lite_mode=True)
    ref_latents, _ = _reference(kind, tiny_dirs[kind], steps, guidance, negative, cache=config, seeds=SEEDS[1:])
    got = torch.cat([r.latents for r in cached])
    assert (got - ref_latents).abs().max().item() <= 1e-5
    assert (got - torch.cat([r.latents for r in plain])).abs().max().item() > 1e-3  # steps were predicted
    again = pipe.generate(**fields)
    assert torch.equal(torch.cat([r.latents for r in again]), torch.cat([r.latents for r in plain]))
    assert cached[0].metadata["request"]["cache"] == "taylorseer:3"


@pytest.mark.parametrize("threshold", [0.3, 0.9])
def test_our_first_block_cache_is_diffusers_hook_where_both_run(tiny_dirs, threshold):
    """core.stepcache (written for FLUX.2, which diffusers' hook cannot run) gives diffusers' hook's latents on
    FLUX.1, run by diffusers' own pipeline; removed, the transformer is as before."""
    from diffusers import DiffusionPipeline, FirstBlockCacheConfig

    from fluxlab.core.stepcache import FirstBlockCache

    def pipeline():
        pipe = DiffusionPipeline.from_pretrained(tiny_dirs["flux1-dev"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe):
        return pipe(prompt=PROMPT, height=H, width=W, num_inference_steps=8, guidance_scale=3.5,
                    generator=torch.Generator("cpu").manual_seed(SEEDS[0]), output_type="latent",
                    max_sequence_length=512).images

    theirs = pipeline()
    theirs.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    ours = pipeline()
    cache = FirstBlockCache(ours.transformer, threshold).install()
    cached = run(ours)
    assert torch.equal(cached, run(theirs))
    cache.remove()
    plain = run(ours)
    assert not torch.equal(cached, plain) and torch.equal(plain, run(pipeline()))


def test_step_cache_on_flux2_keeps_cond_and_uncond_apart_and_leaves_the_model_as_it_was(tiny_pipes):
    pipe = tiny_pipes["flux2-klein-base"]  # real CFG: "cond" and "uncond" calls each keep their own state
    fields = dict(prompt=PROMPT, width=W, height=H, steps=8, seed=SEEDS[0], guidance=4.0)
    before = pipe.generate(**fields)[0].latents
    never = pipe.generate(**fields, cache="fbc:1e-9")[0].latents  # a threshold nothing is under: every block runs
    assert torch.equal(never, before)
    cached = [pipe.generate(**fields, cache="fbc:0.9")[0].latents for _ in range(2)]
    assert torch.equal(cached[0], cached[1]) and not torch.equal(cached[0], before)  # skipped; state reset per run
    assert torch.equal(pipe.generate(**fields)[0].latents, before)


def test_negative_prompt_changes_base_output(tiny_pipes):
    """Real CFG really uses the negative prompt (guards against it being dropped on the way)."""
    pipe = tiny_pipes["flux2-klein-base"]
    a = pipe.generate(prompt=PROMPT, width=W, height=H, steps=2, seed=3, negative="")[0].latents
    b = pipe.generate(prompt=PROMPT, width=W, height=H, steps=2, seed=3, negative="a blue square")[0].latents
    assert (a - b).abs().max().item() > 1e-4


def test_batch_equals_single_images(tiny_pipes):
    pipe = tiny_pipes["flux2-klein"]
    batch = pipe.generate(prompt=PROMPT, width=W, height=H, seed=40, num_images=3, batch_size=3)
    for i, r in enumerate(batch):
        single = pipe.generate(prompt=PROMPT, width=W, height=H, seed=40 + i)[0]
        assert r.seed == 40 + i
        assert (r.latents - single.latents).abs().max().item() <= 1e-5


def test_noise_is_drawn_on_cpu_generator(tiny_pipes):
    """The seed's noise is the CPU generator's, whatever the device: same seed, same starting latents."""
    fam = tiny_pipes["flux2-klein"].family
    x = fam.noise([torch.Generator("cpu").manual_seed(123)], W, H, torch.float32)
    g = torch.Generator("cpu").manual_seed(123)
    expect = torch.randn((1, fam.latent_channels, H // 16, W // 16), generator=g)
    assert torch.equal(x, expect.flatten(2).transpose(1, 2))


def test_mistral_system_message_is_the_reference_text():
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    from fluxlab.core.families.flux2 import MISTRAL_SYSTEM_MESSAGE

    assert MISTRAL_SYSTEM_MESSAGE == SYSTEM_MESSAGE


def test_kontext_resolutions_are_the_reference_table():
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    from fluxlab.spec.families import KONTEXT_RESOLUTIONS

    assert list(PREFERRED_KONTEXT_RESOLUTIONS) == KONTEXT_RESOLUTIONS
