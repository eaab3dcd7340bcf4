"""Build the bundled demo model from nothing, deterministically by seed:

    python -m fluxlab.demo.build            # ~55 min on 2 CPU cores; writes fluxlab/demo/model
    python -m fluxlab.demo.build --quick    # a smoke build in seconds (same code path, few steps)

The model is FLUX.2 [klein]'s architecture at toy size, so everything fluxlab does with klein works on it:

1. data      the synthetic shape scenes of fluxlab.demo.data, written as an image folder with captions (full
             captions, and for one render in three a caption missing one attribute);
2. tokenizer a BPE tokenizer trained on the caption vocabulary (single letters stay in the vocabulary, so a new
             word such as a LoRA trigger still gets tokens of its own instead of <unk>);
3. encoder   a small Qwen3-architecture text encoder, randomly initialised (embeddings scaled to unit variance
             so the words stay far apart); it is not trained;
4. VAE       an AutoencoderKLFlux2 trained by the reconstruction loop below on the demo scenes and on random
             polygons, ellipses and stripes (a codec should not know only three shapes); its batch-norm
             statistics are then measured on the training images, as the FLUX.2 VAE's are;
5. transformer a Flux2Transformer2DModel trained from scratch by fluxlab's own trainer (network.type full,
             flow matching, EMA), with caption dropout so classifier-free guidance works, on the scenes (each
             drawn at its exact spot, with a loss mask that weighs the shape 5x the background: mask_path) and
             on before/after pairs (control_path) so that reference editing works as in klein.

The VAE loop is written here because diffusers ships no VAE trainer; everything else is fluxlab's or the
libraries'. Each stage is cached in --work (keyed by its settings), so a rebuild after a change reruns only
what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import string
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import data

DEFAULT_OUT = Path(__file__).parent / "model"


@dataclass(frozen=True)
class Settings:
    seed: int = 0
    renders: int = 3  # images per training scene
    wobble: float = 0.0  # random shift of the training shapes, in grid cells (see data.render)
    mask_floor: float = 0.2  # loss weight of the background (the shapes and their edges weigh 1); 1: no masks
    vae_steps: int = 3000
    vae_batch: int = 16
    latent_channels: int = 16
    steps: int = 7000  # transformer steps
    batch: int = 32
    lr: float = 1e-3  # 5e-4 left the model under-trained: held-out shape 69% vs 80% (same steps)
    warmup: int = 300
    ema: float = 0.999
    heads: int = 4
    double_blocks: int = 2
    single_blocks: int = 4
    scenes: int | None = None  # use only the first N training scenes (quick builds)

    @classmethod
    def quick(cls) -> Settings:
        return cls(renders=1, vae_steps=20, steps=20, batch=8, warmup=5, scenes=48)

    def key(self, *fields: str) -> str:
        d = asdict(self)
        return hashlib.sha256(json.dumps({f: d[f] for f in fields}, sort_keys=True).encode()).hexdigest()[:12]


# -- 1. data ------------------------------------------------------------------------------------------------
def captioned(s: Settings) -> list[tuple[data.Scene, int, str]]:
    """(scene, render seed, caption) of every training image."""
    out = []
    train = list(data.scenes("train"))[: s.scenes]
    for i, scene in enumerate(train):
        for k in range(s.renders):
            caption = scene.caption
            if k == 2:  # one render in three says less
                caption = scene.short_caption(("colour", "position", "background")[i % 3])
            out.append((scene, s.seed * 1000 + k, caption))
    return out


def write_dataset(s: Settings, folder: Path) -> Path:
    if (folder / "DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for n, (scene, seed, caption) in enumerate(captioned(s)):
        data.render(scene, seed=seed, wobble=s.wobble).save(folder / f"{n:05d}.png")
        (folder / f"{n:05d}.txt").write_text(caption + "\n")
    (folder / "DONE").write_text("")
    return folder


def write_edits(s: Settings, folder: Path) -> Path:
    """Before/after pairs for reference editing (FLUX.2 klein is an editing model): a training scene as the
    reference (control/), the same scene with another colour or shape as the target, at exactly the same spot;
    the caption describes the target and, two times in three, leaves out where it is or the background, which
    the model must then take from the reference."""
    if (folder / "DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "control").mkdir(parents=True)
    train = list(data.scenes("train"))[: s.scenes]
    for n, scene in enumerate(train):
        target = data.edited(scene, n)
        key = f"pair|{s.seed}|{n}"
        data.render(scene, jitter=key, wobble=s.wobble).save(folder / "control" / f"{n:05d}.png")
        data.render(target, jitter=key, wobble=s.wobble).save(folder / f"{n:05d}.png")
        caption = target.caption if n % 3 == 0 else target.short_caption(("position", "background")[n % 3 - 1])
        (folder / f"{n:05d}.txt").write_text(caption + "\n")
    (folder / "DONE").write_text("")
    return folder


def write_masks(images: Path, folder: Path) -> Path:
    """Loss-weight masks (the trainer's mask_path) for the captioned images: white on the shape, on any hole in
    it (a ring's hole is part of what it is) and 2 px around it, black on the background. Most of a 64x64 scene
    is flat background that the model learns early; the shape's outline is what tells a circle from a square,
    and unweighted it is a few percent of the loss."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter, ImageOps

    from .evaluate import background

    if (folder / "DONE").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for f in sorted(images.glob("*.png")):
        a = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
        shape = Image.fromarray((np.abs(a - background(a)).max(-1) > 30).astype(np.uint8) * 255)
        # Holes: background that cannot be reached from outside the image. A 1 px frame joins every piece of
        # background that touches the border (a shape cut by the border may split it), so one fill finds them.
        outside = ImageOps.expand(shape, border=1, fill=0)
        ImageDraw.floodfill(outside, (0, 0), 128)
        shape = Image.fromarray(np.where(np.asarray(outside)[1:-1, 1:-1] == 128, 0, 255).astype(np.uint8))
        shape.filter(ImageFilter.MaxFilter(5)).save(folder / f.name)
    (folder / "DONE").write_text("")
    return folder


# -- 2, 3. tokenizer and text encoder ------------------------------------------------------------------------
def build_tokenizer(s: Settings):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from ..tiny import QWEN3_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=list(string.ascii_lowercase + string.digits))
    corpus = [c for _, _, c in captioned(Settings(renders=3))] + ["user assistant"] * 50
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = QWEN3_CHAT_TEMPLATE
    return fast


def build_text_encoder(s: Settings, vocab: int):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(s.seed)
    te = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False,
    ))
    with torch.no_grad():  # unit-variance word vectors: distinct words stay far apart after the random layers
        te.model.embed_tokens.weight.normal_(0, 1, generator=torch.Generator().manual_seed(s.seed))
    return te.eval()


# -- 4. VAE ----------------------------------------------------------------------------------------------------
def to_tensor(images):
    """PIL images -> a (B, 3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch

    a = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1
    return torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()


def vae_images(step: int, s: Settings):
    """A deterministic training batch for the VAE: demo scenes and generic images, half and half, in [-1, 1]."""
    train = list(data.scenes("train"))
    ims = []
    for j in range(s.vae_batch):
        n = step * s.vae_batch + j
        if j % 2 == 0:
            ims.append(data.render(train[(n * 7919) % len(train)], seed=s.seed * 1000 + n, wobble=0.08))
        else:
            ims.append(data.render_random(s.seed * 10_000_000 + n))
    return to_tensor(ims)


def train_vae(s: Settings, log=print):
    """L1 + MSE reconstruction, weighted 5x on the shapes (most pixels are flat background, and it is the shapes'
    colours and edges the model must get right), with a small KL term on the posterior mean; Adam with cosine
    decay. The latent is used deterministically (the posterior mode, as FLUX.2's pipelines encode), which here
    learned sharper shapes than training on posterior samples. Then the batch-norm statistics."""
    import math

    import torch
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(s.seed + 1)
    # 4x down-sampling (FLUX.2's is 8x): at 64x64 a 16x16x16 latent, 8x8 tokens of 64 channels after the 2x2
    # patchify. An 8x VAE of this size reconstructed the shapes too poorly after the training a build can afford.
    vae = AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             block_out_channels=(16, 32, 64), latent_channels=s.latent_channels, layers_per_block=1,
                             norm_num_groups=8, sample_size=64)
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    vae.train()
    t0 = time.perf_counter()
    for step in range(s.vae_steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / s.vae_steps))
        x = vae_images(step, s)
        border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
        bg = border.median(dim=2).values[:, :, None, None]
        weight = 1 + 4 * ((x - bg).abs().amax(1, keepdim=True) > 0.1).float()
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        err = (rec - x).abs() + (rec - x).pow(2)
        loss = (weight * err).mean() / weight.mean() + 1e-4 * 0.5 * post.mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == s.vae_steps - 1:
            log(f"vae step {step + 1}/{s.vae_steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    vae.eval()
    # Batch-norm statistics of the patchified latents, which the pipelines use to normalise them.
    with torch.no_grad():
        zs = []
        for step in range(8):
            x = vae_images(100_000 + step, Settings(**{**asdict(s), "vae_batch": 32}))
            z = vae.encode(x).latent_dist.mode()
            b, c, h, w = z.shape
            zs.append(z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, -1))
        z = torch.cat(zs).transpose(0, 1).reshape(c * 4, -1)
        vae.bn.running_mean.copy_(z.mean(1))
        vae.bn.running_var.copy_(z.var(1))
    return vae


def vae_check(vae) -> str:
    """How well the VAE reconstructs held-out scenes and rings (which the transformer never sees): the mean
    error in 8-bit levels, and how often the evaluator still reads colour, shape and position right."""
    import numpy as np
    import torch
    from PIL import Image

    from .evaluate import Tally, read

    held = list(data.scenes("heldout"))
    rings = [data.Scene(s.colour, data.NEW_SHAPE, s.position, s.size, s.background) for s in held[::2]]
    scenes = held + rings
    x = to_tensor([data.render(s, seed=77 + i) for i, s in enumerate(scenes)])
    with torch.no_grad():
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    shapes, ring = Tally(), Tally()
    for s, r in zip(scenes, rec, strict=True):
        im = Image.fromarray(((r.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
        (ring if s.shape == data.NEW_SHAPE else shapes).add(read(im), s.colour, s.shape, s.position)
    return (f"mean error {float((rec - x).abs().mean() * 127.5):.2f} levels of 255; evaluator reads "
            f"{shapes.rates()['all']:.0%} of held-out scenes and {ring.rates()['all']:.0%} of rings right")


# -- 5. the pipeline with a fresh transformer ----------------------------------------------------------------
def init_dir(s: Settings, work: Path) -> Path:
    key = s.key("seed", "vae_steps", "vae_batch", "latent_channels", "heads", "double_blocks", "single_blocks")
    return work / f"init-{key}"


def build_init(s: Settings, work: Path, log=print) -> Path:
    """The demo pipeline with a trained VAE and a freshly initialised transformer (what training starts from)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel

    from ..spec.catalog import CATALOG
    from ..tiny import SHIFTED_SCHEDULER

    path = init_dir(s, work)
    if (path / "model_index.json").is_file():
        return path
    tok = build_tokenizer(s)
    te = build_text_encoder(s, len(tok))
    vae = train_vae(s, log)
    log(f"vae reconstructions: {vae_check(vae)}")
    torch.manual_seed(s.seed + 3)
    head_dim = 32
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=s.double_blocks,
        num_single_layers=s.single_blocks, attention_head_dim=head_dim, num_attention_heads=s.heads,
        joint_attention_dim=3 * te.config.hidden_size, timestep_guidance_channels=256,
        axes_dims_rope=(head_dim // 4,) * 4, guidance_embeds=False,
    )
    pipe = Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SHIFTED_SCHEDULER), vae=vae,
                              text_encoder=te, tokenizer=tok, transformer=transformer, is_distilled=False)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    write_defaults(tmp, CATALOG["demo"])
    tmp.rename(path)
    return path


def write_defaults(path: Path, spec) -> None:
    """fluxlab.json: the catalog's defaults for this model, so the directory loads the same by path."""
    from ..spec.catalog import OVERRIDABLE

    (path / "fluxlab.json").write_text(json.dumps({k: getattr(spec, k) for k in OVERRIDABLE}, indent=1) + "\n")


# -- 6. training ---------------------------------------------------------------------------------------------
def train_config(s: Settings, init: Path, dataset: Path, edits: Path, out: Path, masks: Path | None = None) -> dict:
    """The ai-toolkit-style config the demo transformer is trained with (also written to the run folder)."""
    return {"job": "extension", "config": {"name": "demo", "process": [{
        "type": "sd_trainer", "training_folder": str(out), "device": "cpu",
        "network": {"type": "full"},
        "save": {"dtype": "float32", "save_every": s.steps, "max_step_saves_to_keep": 1},
        "datasets": [{"folder_path": str(dataset), "caption_dropout_rate": 0.1, "resolution": [64],
                      "cache_latents_to_disk": True,
                      **({"mask_path": str(masks), "mask_min_value": s.mask_floor} if masks else {})},
                     {"folder_path": str(edits), "control_path": str(edits / "control"), "caption_dropout_rate": 0.1,
                      "resolution": [64], "cache_latents_to_disk": True}],
        "train": {"batch_size": s.batch, "steps": s.steps, "lr": s.lr, "optimizer": "adamw", "dtype": "fp32",
                  "gradient_checkpointing": False, "timestep_type": "sigmoid", "lr_scheduler": "cosine",
                  "lr_warmup_steps": s.warmup, "max_grad_norm": 1.0, "seed": s.seed,
                  "ema_config": {"use_ema": True, "ema_decay": s.ema}},
        "model": {"name_or_path": str(init)},
        "sample": {"sample_every": max(1, s.steps // 6), "width": 64, "height": 64, "guidance_scale": 4.0,
                   "sample_steps": 20, "walk_seed": False, "seed": 1, "prompts": [
                       "a red circle in the top left on a white background",
                       "a small blue square in the center on a black background",
                       "a yellow triangle at the bottom on a gray background"]},
    }]}}


def build(out: Path = DEFAULT_OUT, work: Path | None = None, s: Settings | None = None, log=print) -> Path:
    import torch
    from diffusers import Flux2Transformer2DModel
    from safetensors.torch import load_file

    from ..runtime.threads import apply_threads, usable_cpus
    from ..service import events as ev
    from ..service.train import train
    from ..spec.trainconfig import parse

    s = s or Settings()
    # One thread count whatever else runs on the machine (the thread policy would give a busy machine fewer): sums
    # split over another number of threads add in another order, and a build gives the same bits every time.
    threads = int(os.environ.get("FLUXLAB_THREADS") or usable_cpus())
    apply_threads(threads)
    work = Path(work or Path.home() / ".cache" / "fluxlab" / "demo-build")
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Stages found in the cache are not rebuilt; BUILD.json says which, as their time is then not in its seconds.
    key = s.key("seed", "renders", "scenes", "wobble")
    dataset = work / f"data-{key}"
    masks = work / f"masks-{key}" if s.mask_floor < 1 else None
    edits = work / f"edits-{s.key('seed', 'scenes', 'wobble')}"
    stages = {"data": dataset / "DONE", "edits": edits / "DONE",
              "tokenizer, encoder and VAE": init_dir(s, work) / "model_index.json"}
    if masks:
        stages["masks"] = masks / "DONE"
    reused = [name for name, done in stages.items() if done.is_file()]
    write_dataset(s, dataset)
    write_edits(s, edits)
    if masks:
        write_masks(dataset, masks)
    log(f"data: {len(list(dataset.glob('*.png')))} images in {dataset}, "
        f"{len(list(edits.glob('*.png')))} edit pairs in {edits}")
    init = build_init(s, work, log)
    t1 = time.perf_counter()
    log(f"tokenizer, encoder and VAE ready ({t1 - t0:.0f} s)")
    run_root = work / f"train-{s.key(*asdict(s))}"
    shutil.rmtree(run_root / "demo", ignore_errors=True)
    config = parse(train_config(s, init, dataset, edits, run_root, masks), "demo build")
    weights = train(config, events=lambda e: log(e.text) if isinstance(e, ev.Notice) else None, threads=threads).lora
    t2 = time.perf_counter()
    log(f"transformer trained: {s.steps} steps in {t2 - t1:.0f} s")
    # Assemble: the init pipeline with the trained (EMA) transformer weights, written next to `out`, then moved.
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(init, tmp)
    # from_config, not from_pretrained: the saved config then names no path on the build machine.
    transformer = Flux2Transformer2DModel.from_config(Flux2Transformer2DModel.load_config(init / "transformer"))
    transformer.load_state_dict(load_file(str(weights)))
    shutil.rmtree(tmp / "transformer")
    transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
    (tmp / "BUILD.json").write_text(json.dumps({
        "settings": asdict(s), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "seconds": {"data_tokenizer_encoder_vae": round(t1 - t0), "transformer": round(t2 - t1)},
        "reused_from_cache": reused,
    }, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f} s")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m fluxlab.demo.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the model goes (default: in the package)")
    ap.add_argument("--work", type=Path, default=None, help="cache of intermediate stages "
                    "(default: ~/.cache/fluxlab/demo-build)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help=f"transformer training steps (default {Settings.steps})")
    ap.add_argument("--quick", action="store_true", help="a smoke build: few images and steps")
    a = ap.parse_args(argv)
    s = Settings.quick() if a.quick else Settings()
    s = Settings(**{**asdict(s), "seed": a.seed, **({"steps": a.steps} if a.steps else {})})
    build(a.out, a.work, s)


if __name__ == "__main__":
    main()
