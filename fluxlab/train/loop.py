"""The trainer: flow-matching training of a FLUX transformer's LoRA (or, with network.type full, of all its
weights) from an ai-toolkit-style config.

Written here because the loop is where training tools differ (caching, timestep sampling, resume, what a
run folder holds); the parts are the field's: peft adds the LoRA, diffusers provides the model, accelerate
starts data-parallel processes, bitsandbytes provides 8-bit AdamW where it runs.

Exact resume: the data order is a function of (seed, epoch), the noise/timestep/dropout generator's state
and the optimizer and EMA state are saved with every checkpoint (safetensors + JSON, never pickle), so a run
resumed from its last save continues as if it had never stopped.

Run folder (<training_folder>/<name>/):
    config.yaml          the resolved config
    NAME_000340.safetensors, ..., NAME.safetensors    LoRA checkpoints (ai-toolkit key names), or in full
                         mode single-file transformers (diffusers key names)
    state/               the exact training state of the last checkpoint
    samples/             sample images every sample_every steps
    loss.csv, loss.png   the loss per step and its curve
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path

from ..errors import UserError
from ..spec.trainconfig import Job
from . import checkpoint
from .networks import strategies
from .samples import SamplingModel, plot_loss, sample_requests

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
          "fp32": "float32", "float32": "float32"}


class Trainer:
    def __init__(self, job: Job, notify=print, device: str | None = None, *, on_step=None, on_save=None,
                 should_stop=None, render_samples=None):
        """`on_step(step, steps, loss, lr)` after every step, `on_save(step, path)` after every checkpoint;
        `should_stop()` is asked after every step (True: save a checkpoint and stop); `render_samples(model,
        [(request, path)], step)` draws sample images (the service passes it; without it, none are drawn)."""
        from ..files import inside

        self.job, self.p, self.notify = job, job.process, notify
        self.run_dir = inside(Path(self.p.training_folder), job.config.name, "config.name")
        self.device_name = device or self.p.device
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self.full = job.process.network.type == "full"
        self.on_step, self.on_save, self.should_stop = on_step, on_save, should_stop
        self.render_samples = render_samples
        self.stopped_at: int | None = None
        if self.rank != 0:  # one voice per run
            self.notify = lambda m: None

    # -- setup --------------------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        from ..runtime.model import load
        from ..spec.request import ModelRef, Runtime
        from .data import scan

        p = self.p
        if not p.train.train_unet:
            raise UserError("train.train_unet is false and fluxlab trains the transformer only: nothing to train")
        # Zipped datasets are extracted into a temp folder for the run (the latent cache keeps what training needs;
        # a resume extracts again), removed by close(), so a refused dataset leaves nothing behind.
        self.scratch = tempfile.TemporaryDirectory(prefix="fluxlab-datasets-")
        self.items, self.item_dataset = [], []  # each item, and the dataset settings it came with
        for d in p.datasets:
            if d.auto_caption:  # service.train captions such datasets first and points them at the result
                raise UserError(f"dataset {d.folder_path}: auto_caption is applied by service.train before training")
            found = scan(d.folder_path, d.caption_ext, p.trigger_word, d.resolution, self.notify,
                         workdir=Path(self.scratch.name), control=d.control_path, mask=d.mask_path,
                         per_line=d.caption_per_line)
            if d.num_repeats > 1:
                found = [dataclasses.replace(it, repeats=it.repeats * d.num_repeats) for it in found]
            self.items += found
            self.item_dataset += [d] * len(found)
        if self.world > 1:
            import torch.distributed as dist

            # Started by `accelerate launch` (torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR). accelerate
            # leaves the group uninitialised when there is no GPU, so it is set up here: gloo on CPU, NCCL on GPU.
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device_name.startswith("cuda") else "gloo")
            self.dist = dist
        dtype = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[DTYPES[p.train.dtype]]
        device = self.device_name
        if self.world > 1 and device == "cuda":
            device = f"cuda:{self.rank}"  # one GPU per process
        ref = ModelRef(name=self.train_model(), dtype=dtype, quantize="int8" if p.model.quantize else None)
        self.model = load(ref, Runtime(device=device, compute="native"), self.notify)
        self.torch = torch
        if any(it.control is not None for it in self.items) and self.model.spec.family != "flux2":
            raise UserError(f"control_path (edit training) needs a FLUX.2 model; {self.model.label} is FLUX.1")
        self._cache_text()
        self._cache_latents()
        self.networks = strategies(p)
        self.params = {}
        for network in self.networks:
            self.params.update(network.add(self.model, p))
        t = self.model.components.transformer
        if p.train.gradient_checkpointing and hasattr(t, "enable_gradient_checkpointing"):
            t.enable_gradient_checkpointing()
        self.optimizer = self._optimizer(list(self.params.values()))
        self.ema = {n: q.detach().clone() for n, q in self.params.items()} if p.train.ema_config.use_ema else None
        self.sampling = SamplingModel(self)

    def close(self) -> None:
        """Remove what the run extracted (zipped datasets)."""
        scratch = getattr(self, "scratch", None)
        if scratch is not None:
            scratch.cleanup()

    @property
    def pipe(self):
        """The model being trained (runtime.model.LoadedModel)."""
        return self.model

    def train_model(self) -> str:
        """klein: train on the base model (LoRAs trained on the distilled model are reported to give grey
        images); samples are then made with the distilled model."""
        name = self.p.model.name_or_path
        swap = {"flux2-klein-4b": "flux2-klein-base-4b", "flux2-klein-9b": "flux2-klein-base-9b"}
        if name in swap:
            self.notify(f"training on {swap[name]} (klein LoRAs train on the base model); samples use {name}")
            self.sample_model = name
            return swap[name]
        self.sample_model = None
        return name

    def _captions(self) -> list[str]:
        """Every text a training step can condition on: captions, their shufflings, and "" (dropout)."""
        caps = {c for it in self.items for c in it.captions}
        for it, d in zip(self.items, self.item_dataset, strict=True):
            if d.shuffle_tokens:
                caps.update(self._shuffled(c, k) for c in it.captions for k in range(4))
        return sorted(caps | {""})

    @staticmethod
    def _shuffled(caption: str, k: int) -> str:
        """One of four fixed shufflings of a caption's comma-separated tags (the first tag, usually the trigger,
        stays first), so shuffled captions can be encoded once up front."""
        import random

        tags = [t.strip() for t in caption.split(",")]
        head, rest = tags[:1], tags[1:]
        random.Random(f"{caption}|{k}").shuffle(rest)
        return ", ".join(head + rest)

    def _cache_text(self) -> None:
        """Encode every caption (and sample prompt) once, then release the text encoder. When the text encoder
        trains too, captions are encoded at every step instead (with gradients) and the encoder stays."""
        if self.p.train.train_text_encoder:
            return
        prompts = self._captions()
        if self.p.sample:
            prompts += [self._trigger(x) for x in self.p.sample.prompts] + [self.p.sample.neg]
        self.model.encode_all(prompts, release=True)
        self.notify(f"encoded {len(set(prompts))} distinct captions and prompts; text encoder released")

    def _trigger(self, text: str) -> str:
        return text.replace("[trigger]", self.p.trigger_word or "")

    def _cache_latents(self) -> None:
        """VAE latents per (image bytes, bucket), on disk in <training_folder>/latent_cache when asked."""
        import hashlib

        from diffusers.image_processor import VaeImageProcessor
        from safetensors.torch import load_file, save_file

        from ..files import atomic_write
        from ..spec.images import load_rgb

        torch, pipe = self.torch, self.model
        cache_dir = Path(self.p.training_folder) / "latent_cache"
        proc = VaeImageProcessor(vae_scale_factor=pipe.family.vae_scale * 2)
        self.latents, self.keys, self.control_keys, digests = {}, [], [], {}
        self.weights = {}  # item index -> (1, tokens, 1) loss weights, for datasets with a mask_path

        def cached(path: Path, width: int, height: int, to_disk: bool) -> str:
            if path not in digests:  # an image is listed once per resolution: hash its bytes once
                digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()[:32]
            key = f"{digests[path]}_{width}x{height}"
            if key in self.latents:
                return key
            f = cache_dir / f"{key}_{pipe.spec.family}.safetensors"
            if f.is_file():
                self.latents[key] = load_file(str(f))["latents"]
                return key
            img = load_rgb(path, None, "training image", check_shape=False)
            pixels = proc.preprocess(img, height=height, width=width, resize_mode="crop")
            with torch.inference_mode():
                z = pipe.family.encode_image(pixels.to(pipe.device, pipe.dtype), torch.Generator().manual_seed(0))
            tokens = pipe.family.pack(z).float().cpu().contiguous()
            self.latents[key] = tokens
            if to_disk and self.rank == 0:
                atomic_write(f, lambda tmp, t=tokens: save_file({"latents": t}, str(tmp)))
            return key

        for i, (it, dataset) in enumerate(zip(self.items, self.item_dataset, strict=True)):
            self.keys.append(cached(it.path, it.width, it.height, dataset.cache_latents_to_disk))
            if it.mask is not None:
                self.weights[i] = self._mask_weights(it, dataset.mask_min_value)
            # A reference is encoded at its training image's bucket size.
            self.control_keys.append(None if it.control is None else
                                     cached(it.control, it.width, it.height, dataset.cache_latents_to_disk))

    def _mask_weights(self, it, floor: float):
        """Per-token loss weights from a mask image: cropped to the bucket as the image is, averaged over each
        token's pixels, and lifted to at least `floor` (mask_min_value)."""
        import numpy as np
        from PIL import Image, ImageOps

        from ..spec.images import load_rgb

        h, w = self.model.family.latent_grid(it.width, it.height)
        m = ImageOps.fit(load_rgb(it.mask, None, "mask", check_shape=False).convert("L"), (it.width, it.height),
                         Image.BILINEAR)
        a = np.asarray(m, dtype=np.float32).reshape(h, it.height // h, w, it.width // w).mean(axis=(1, 3)) / 255
        return self.torch.from_numpy(floor + (1 - floor) * a).reshape(1, h * w, 1)

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): linear warm-up, then constant or cosine to 0."""
        tr = self.p.train
        if step < tr.lr_warmup_steps:
            return tr.lr * (step + 1) / tr.lr_warmup_steps
        if tr.lr_scheduler == "cosine":
            done = (step - tr.lr_warmup_steps) / max(1, tr.steps - tr.lr_warmup_steps)
            return tr.lr * 0.5 * (1 + math.cos(math.pi * done))
        return tr.lr

    def _optimizer(self, params):
        torch = self.torch
        if self.p.train.optimizer == "adamw8bit":
            if self.model.device.type == "cuda":
                try:
                    import bitsandbytes as bnb

                    return bnb.optim.AdamW8bit(params, lr=self.p.train.lr)
                except ImportError:
                    pass
            self.notify("adamw8bit needs bitsandbytes on a CUDA GPU; using AdamW (32-bit states)")
        return torch.optim.AdamW(params, lr=self.p.train.lr)

    # -- data ---------------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: items repeated, grouped by bucket, shuffled by (seed, epoch)."""
        import random

        rng = random.Random(self.p.train.seed * 1_000_003 + epoch)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(self.items):
            groups.setdefault((it.width, it.height, it.control is not None), []).extend([i] * it.repeats)
        batches = []
        for key in sorted(groups):
            idx = groups[key]
            rng.shuffle(idx)
            bs = self.p.train.batch_size
            batches += [idx[j:j + bs] for j in range(0, len(idx) - bs + 1, bs)] or [idx[:bs]]
        rng.shuffle(batches)
        return batches

    def batch(self, index: int) -> list[int]:
        per_epoch = len(self._batches(0))
        epoch, within = divmod(index, per_epoch)
        if getattr(self, "_epoch_cache", (None,))[0] != epoch:
            self._epoch_cache = (epoch, self._batches(epoch))
        return self._epoch_cache[1][within]

    # -- one step -----------------------------------------------------------------------------------
    def caption(self, i: int, gen) -> str:
        """What item i is captioned with at this step: one of its captions (caption_per_line), tags shuffled
        (shuffle_tokens), or "" (caption dropout)."""
        torch, it, d = self.torch, self.items[i], self.item_dataset[i]
        cap = it.caption
        if len(it.captions) > 1:
            cap = it.captions[int(torch.randint(0, len(it.captions), (1,), generator=gen))]
        if d.shuffle_tokens:
            cap = self._shuffled(cap, int(torch.randint(0, 4, (1,), generator=gen)))
        if torch.rand(1, generator=gen).item() < d.caption_dropout_rate:
            cap = ""
        return cap

    def loss(self, index: int, gen):
        """Flow-matching loss on one batch: predict v = noise - x0 at x_t = (1 - t) x0 + t noise."""
        torch, pipe = self.torch, self.model
        ids = self.batch(index)
        x0 = torch.cat([self.latents[self.keys[i]] for i in ids]).to(pipe.device)
        captions = [self.caption(i, gen) for i in ids]
        if self.p.train.train_text_encoder:
            cond = pipe.family.encode(captions, pipe.device)  # with gradients into the encoder's LoRA
        else:
            with torch.no_grad():
                cond = pipe.encode_prompts(captions)
        t = noise_levels(self.p.train, len(ids), x0.shape[1], gen).to(pipe.device)
        noise = torch.randn(x0.shape, generator=gen).to(pipe.device)
        tt = t.view(-1, 1, 1)
        x_t = ((1 - tt) * x0 + tt * noise).to(pipe.dtype)
        it = self.items[ids[0]]
        img_ids = pipe.family.image_ids(len(ids), it.width, it.height, pipe.device)
        # Guidance-distilled models train at guidance 1 (sd-scripts' advice for FLUX.1 dev).
        refs = None
        if self.control_keys[ids[0]] is not None:  # edit training: the references follow the image tokens
            from ..core.families import References

            ref = torch.cat([self.latents[self.control_keys[i]] for i in ids]).to(pipe.device, pipe.dtype)
            h, w = pipe.family.latent_grid(it.width, it.height)
            _, ref_ids = pipe.family.reference_tokens([ref[:1].transpose(1, 2).reshape(1, -1, h, w)])
            refs = References(ref, ref_ids.to(pipe.device))
        pred = pipe.family.velocity(x_t, (t * 1000).to(pipe.dtype), cond, img_ids, 1.0, refs=refs)
        err = (pred.float() - (noise - x0).float()).pow(2)
        if any(i in self.weights for i in ids):  # mask_path: weighted, normalised so the loss keeps its scale
            weight = torch.cat([self.weights.get(i, torch.ones(1, err.shape[1], 1)) for i in ids]).to(err.device)
            return (weight * err).mean() / weight.mean().clamp_min(1e-6)
        return err.mean()

    # -- the loop -----------------------------------------------------------------------------------
    def train(self, resume: bool = False, stop_after: int | None = None) -> Path:
        """Train to the configured step count (or `stop_after`, or until should_stop() says so, which saves a
        checkpoint first). Returns the final LoRA's path (written only when the run completes)."""
        from ..files import atomic_write

        torch, p = self.torch, self.p
        self.run_dir.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(p.train.seed + 7919 * self.rank)
        start = 0
        if resume:
            start, self.ema = checkpoint.load_state(self.run_dir, self.params, self.optimizer, self.ema, gen)
            self.notify(f"resuming {self.run_dir} after step {start}")
        elif self.rank == 0:
            self._write_config()
            atomic_write(self.run_dir / "loss.csv", lambda tmp: tmp.write_text("step,loss,lr,seconds\n"))
        accum = p.train.gradient_accumulation_steps
        for step in range(start, p.train.steps):
            t0 = time.perf_counter()
            total = 0.0
            for micro in range(accum):
                index = (step * accum + micro) * self.world + self.rank
                loss = self.loss(index, gen) / accum
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):
                raise UserError(f"the loss became non-finite (NaN/Inf) at step {step + 1}; lower train.lr (now "
                                f"{p.train.lr:g}) or set train.max_grad_norm; the last checkpoint is kept")
            if self.world > 1:
                for param in self.params.values():
                    self.dist.all_reduce(param.grad)
                    param.grad /= self.world
            if p.train.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), p.train.max_grad_norm)
            lr = self.lr_at(step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                d = p.train.ema_config.ema_decay
                for n, param in self.params.items():
                    self.ema[n].mul_(d).add_(param.detach(), alpha=1 - d)
            if self.rank == 0:
                with open(self.run_dir / "loss.csv", "a", newline="") as f:
                    csv.writer(f).writerow([step + 1, f"{total:.6f}", f"{lr:.6g}", f"{time.perf_counter() - t0:.3f}"])
            done = step + 1
            if self.on_step is not None:
                self.on_step(done, p.train.steps, total, lr)
            stop = self.should_stop is not None and self.should_stop()
            if done % p.save.save_every == 0 or done == p.train.steps or stop:
                self.save(done, gen)
            if p.sample and done % p.sample.sample_every == 0 and self.rank == 0:
                self.sample(done)
            if stop:
                self.stopped_at = done
                self.notify(f"stopped after step {done}; the checkpoint of step {done} is saved: resume with "
                            f"--resume {self.run_dir}")
                break
            if stop_after is not None and done >= stop_after:
                break
        if self.rank == 0:
            plot_loss(self.run_dir / "loss.csv", self.run_dir / "loss.png")
        return self.run_dir / f"{self.job.config.name}.safetensors"

    # -- saving -------------------------------------------------------------------------------------
    def lora_state(self, ema: bool = True) -> dict:
        """The trained tensors under their saved names (EMA weights when EMA is on): a LoRA in diffusers names, or
        in full mode the transformer's weights."""
        src = self.ema if (ema and self.ema is not None) else {n: q.detach() for n, q in self.params.items()}
        return self.networks[0].state(src)

    def save(self, step: int, gen) -> None:
        if self.rank != 0:
            return
        name = self.job.config.name
        dtype = getattr(self.torch, DTYPES[self.p.save.dtype])
        state = {k: v.to(dtype) for k, v in self.lora_state().items()}
        meta = {"fluxlab.config": json.dumps(self.job.model_dump()), "fluxlab.base_model": self.model.label,
                "fluxlab.trigger_word": self.p.trigger_word or "", "fluxlab.step": str(step),
                "fluxlab.world_size": str(self.world), "fluxlab.rank": str(self.p.network.linear),
                "ss_output_name": name}
        final = step == self.p.train.steps
        target = self.run_dir / (f"{name}.safetensors" if final else f"{name}_{step:06d}.safetensors")
        self.networks[0].write(state, self.model.spec.family, target, meta)
        checkpoint.save_state(self.run_dir, step, self.params, self.optimizer, self.ema, gen)
        checkpoint.rotate(self.run_dir, name, self.p.save.max_step_saves_to_keep)
        plot_loss(self.run_dir / "loss.csv", self.run_dir / "loss.png")
        self.notify(f"saved {target.name} (step {step})")
        if self.on_save is not None:
            self.on_save(step, target)

    def _write_config(self) -> None:
        import yaml

        from ..files import atomic_write

        text = yaml.safe_dump(self.job.model_dump(), sort_keys=False)
        atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(text))

    # -- samples ------------------------------------------------------------------------------------
    def sample(self, step: int) -> list:
        """Sample images with the current LoRA (the adapter is live in the transformer)."""
        if self.render_samples is None:
            return []
        t = self.model.components.transformer
        t.eval()
        try:
            model = self.sampling.get()
            if self.p.train.train_text_encoder:
                model.prompt_cache.clear()  # the encoder has changed since the last samples
            requests = sample_requests(self.p, step, self.run_dir / "samples", model.spec, self._trigger)
            with self.torch.no_grad():
                return self.render_samples(model, requests, step)
        finally:
            t.train()


def noise_levels(train, n: int, tokens: int, gen):
    """n noise levels t in (0, 1) (t = 1 is pure noise) for one batch, drawn as `train` (a Train config) asks:
    timestep_type's distributions, or content_or_style's cubic bias (ai-toolkit's), which replaces them."""
    import torch

    if train.content_or_style != "balanced":  # ai-toolkit indexes a high-to-low noise table with u**3
        u3 = torch.rand(n, generator=gen) ** 3
        return 1 - u3 if train.content_or_style == "content" else u3
    if train.timestep_type == "uniform":
        return torch.rand(n, generator=gen)
    t = torch.sigmoid(torch.randn(n, generator=gen))
    if train.timestep_type == "shift":
        s = 3.0
        t = t * s / (1 + (s - 1) * t)
    elif train.timestep_type == "flux_shift":
        from ..core.schedule import flux1_mu

        s = math.exp(flux1_mu(tokens))
        t = t * s / (1 + (s - 1) * t)
    return t
