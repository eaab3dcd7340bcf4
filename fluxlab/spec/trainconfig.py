"""Training configuration: ai-toolkit's YAML (`job: extension`, `config.process[0]` of type `sd_trainer`) as typed,
strict pydantic models. Every key of seed 004's recipe is accepted and honoured; an unknown key is an error
that names it (with a "did you mean"), and a wrong value names its field.

The one-line form (`fluxlab train --images DIR --trigger WORD`) builds the same object with the recipe's
recommended defaults, so both paths train identically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from ..errors import UserError
from .typed import Strict, explain


class NetworkKwargs(Strict):
    # Layer targeting, as ai-toolkit spells it: substrings of the transformer's module names (diffusers names,
    # e.g. "single_transformer_blocks.3.attn", "x_embedder"). Empty only_if_contains: every Linear.
    only_if_contains: list[str] = Field(default_factory=list)
    ignore_if_contains: list[str] = Field(default_factory=list)


class Network(Strict):
    # "full": train every transformer weight (a full fine-tune, or from scratch when the model's transformer is
    # freshly initialised, as the demo model's is); linear/linear_alpha are then unused.
    type: Literal["lora", "full"] = "lora"
    linear: int = Field(32, ge=1, le=256)  # rank (ai-toolkit's and Replicate's trainers stop at 128-256)
    linear_alpha: float = Field(32, gt=0)
    network_kwargs: NetworkKwargs = NetworkKwargs()


class Save(Strict):
    dtype: Literal["float16", "fp16", "bfloat16", "bf16", "float32", "fp32"] = "float16"
    save_every: int = Field(250, ge=1)
    max_step_saves_to_keep: int = Field(4, ge=1)


class Dataset(Strict):
    folder_path: str
    control_path: str | None = None  # reference images under the same names (edit training)
    mask_path: str | None = None  # loss weights under the same names: white trains fully, black by mask_min_value
    mask_min_value: float = Field(0.0, ge=0, le=1)
    caption_ext: str = "txt"
    # Caption the images that have no caption first, with this captioner (florence-2-large, demo, a folder...);
    # the captions used are kept in the run folder (captions/dataset-N), so a resumed or repeated run uses them.
    auto_caption: str | None = None
    caption_dropout_rate: float = Field(0.05, ge=0, le=1)
    shuffle_tokens: bool = False
    caption_per_line: bool = False  # each line of a caption file is one caption; a step picks one at random
    num_repeats: int = Field(1, ge=1, le=10_000)  # each image this many times per epoch (times a `10_x` folder's)
    cache_latents_to_disk: bool = True
    resolution: list[int] = Field(default_factory=lambda: [1024])

    @field_validator("resolution", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, int) else v

    @field_validator("resolution")
    @classmethod
    def _multiples(cls, v):
        for r in v:
            if r < 64 or r % 16 or r > 4096:
                raise ValueError(f"resolution {r} must be a multiple of 16 from 64 to 4096")
        return sorted(set(v))


class Ema(Strict):
    use_ema: bool = False
    ema_decay: float = Field(0.99, gt=0, lt=1)


class Train(Strict):
    batch_size: int = Field(1, ge=1, le=256)
    steps: int = Field(1000, ge=1, le=1_000_000)
    gradient_accumulation_steps: int = Field(1, ge=1, le=1024)
    train_unet: bool = True
    train_text_encoder: bool = False
    gradient_checkpointing: bool = True
    noise_scheduler: Literal["flowmatch"] = "flowmatch"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw8bit"
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0 to lr
    max_grad_norm: float | None = Field(None, gt=0)  # clip the gradients' global norm
    ema_config: Ema = Ema()
    dtype: Literal["bf16", "fp16", "fp32", "float32", "bfloat16"] = "bf16"
    timestep_type: Literal["sigmoid", "uniform", "shift", "flux_shift"] = "sigmoid"
    # ai-toolkit's cubic bias, which replaces timestep_type: "content" draws noise levels near pure noise, where
    # shapes and layout are decided (new objects, structure); "style" near the clean image (texture, colour).
    content_or_style: Literal["balanced", "content", "style"] = "balanced"
    seed: int = 42


class Model(Strict):
    name_or_path: str
    quantize: bool = False
    quantize_dtype: Literal["int8"] = "int8"
    is_flux: bool | None = None  # ai-toolkit's family hint; the family is read from the model itself


class Sample(Strict):
    sampler: Literal["flowmatch", "euler"] = "flowmatch"
    sample_every: int = Field(250, ge=1)
    width: int = 1024
    height: int = 1024
    prompts: list[str] = Field(default_factory=list)
    neg: str = ""
    seed: int = 42
    walk_seed: bool = True  # prompt k uses seed + k
    guidance_scale: float = Field(4.0, ge=0)
    sample_steps: int = Field(20, ge=1)


class Process(Strict):
    type: Literal["sd_trainer"] = "sd_trainer"
    training_folder: str = "outputs/training"
    device: str = "auto"
    trigger_word: str | None = None
    network: Network = Network()
    save: Save = Save()
    datasets: list[Dataset]
    train: Train = Train()
    model: Model
    sample: Sample | None = None


class Config(Strict):
    name: str  # the run folder's name: one path component, checked in `parse`
    process: list[Process]


class Job(Strict):
    job: Literal["extension"] = "extension"
    config: Config
    meta: dict | None = None

    @property
    def process(self) -> Process:
        return self.config.process[0]


# Names from other trainers that mean one of ours.
ALIASES = {"learning_rate": "lr", "rank": "linear", "alpha": "linear_alpha", "network_dim": "linear",
           "network_alpha": "linear_alpha", "max_train_steps": "steps", "train_batch_size": "batch_size"}


def parse(data: dict, source: str = "config") -> Job:
    if not isinstance(data, dict):
        raise UserError(f"{source} should hold a mapping with job: and config:, not a {type(data).__name__}")
    try:
        job = Job.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: {explain(e, Job, ALIASES)}") from None
    except RecursionError:
        raise UserError(f"{source} nests too deeply to be a training config") from None
    if len(job.config.process) != 1:
        raise UserError(f"{source}: config.process must hold exactly one sd_trainer process")
    from ..files import safe_name

    safe_name(job.config.name, f"{source}: config.name")
    return job


MAX_CONFIG_BYTES = 1024 * 1024


def yaml_text(text: str, source: str):
    """YAML parsed safely and without aliases: `*name` repeats an anchored node, so a few hundred bytes of nested
    aliases can expand to gigabytes (the "billion laughs" shape, which safe_load still expands); a training config
    never needs them."""
    import yaml

    class NoAliases(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a training "
                                                              "config; write the values out", mark)
            return super().compose_node(parent, index)

    try:
        return yaml.load(text, Loader=NoAliases)  # a SafeLoader subclass
    except RecursionError:
        raise UserError(f"{source} nests too deeply to be a training config") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{source} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def load_yaml(path: str | Path) -> Job:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"training config {path} is a folder; give the YAML file")
    if not p.is_file():
        raise UserError(f"training config {path} does not exist")
    if p.stat().st_size > MAX_CONFIG_BYTES:
        raise UserError(f"training config {path} is {p.stat().st_size // 1024} KB; a config is at most "
                        f"{MAX_CONFIG_BYTES // 1024} KB")
    try:
        data = yaml_text(p.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} should hold a YAML mapping with job: and config:")
    return parse(data, str(path))


def default_resolution(model: str) -> int:
    """The side a model trains at unless told: its own largest side (64 for the demo model), 1024 for models
    outside the catalog."""
    from .catalog import CATALOG

    return max(CATALOG[model].default_size) if model in CATALOG else 1024


def one_line(images: str, trigger: str, steps: int, model: str, name: str, out: str, resolution: int | None = None,
             rank: int = 32, device: str = "cpu") -> Job:
    """The hosted-trainer flow (seed 003) with seed 004's recommended settings."""
    if resolution is None:
        resolution = default_resolution(model)
    optimizer = "adamw8bit" if device.startswith("cuda") else "adamw"
    return parse({
        "job": "extension",
        "config": {"name": name, "process": [{
            "type": "sd_trainer", "training_folder": out, "trigger_word": trigger,
            "network": {"type": "lora", "linear": rank, "linear_alpha": rank},
            # A checkpoint every quarter of the run, but not more often than every 250 steps: a short run keeps
            # just its result (and the state to resume or extend it).
            "save": {"dtype": "float16", "save_every": max(250, steps // 4), "max_step_saves_to_keep": 4},
            "datasets": [{"folder_path": images, "caption_ext": "txt", "caption_dropout_rate": 0.05,
                          "resolution": [resolution]}],
            # 8-bit AdamW where it exists (bitsandbytes on CUDA); on other devices plain AdamW, without a notice
            # about a choice the user never made.
            "train": {"batch_size": 1, "steps": steps, "gradient_accumulation_steps": 1,
                      "gradient_checkpointing": True, "optimizer": optimizer, "lr": 1e-4, "dtype": "bf16"},
            "model": {"name_or_path": model},
        }]},
    }, "one-line training")
