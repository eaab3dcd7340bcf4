"""Single-file transformer checkpoints (BFL or diffusers key names, or GGUF) over a base model's config.

People share fine-tuned FLUX transformers as one .safetensors file, in BFL's original key names (as ComfyUI and
BFL's code write them, sometimes under `model.diffusion_model.`) or in diffusers' names, and quantized ones as
GGUF (gguf_files). diffusers' own converters rename BFL keys; the base model's transformer config gives the
architecture.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..files import check_safetensors, read_json


def _bfl_to_diffusers(sd: dict, family: str) -> dict:
    """Rename BFL (original) transformer keys to diffusers names, with diffusers' own converters."""
    from diffusers.loaders import single_file_utils as sfu

    prefix = "model.diffusion_model."
    sd = {k.removeprefix(prefix): v for k, v in sd.items()}
    if family == "flux2":
        return sfu.convert_flux2_transformer_checkpoint_to_diffusers(sd)
    return sfu.convert_flux_transformer_checkpoint_to_diffusers(sd)


def check_transformer_file(file: str, config_dir: Path | None = None) -> Path:
    """Check a single-file transformer's format (and for GGUF, that it holds the base model's family)."""
    f = Path(file).expanduser()
    if not f.is_file():
        raise UserError(f"transformer file {file} does not exist")
    if f.suffix == ".gguf":
        from .gguf_files import check_gguf

        check_gguf(f, config_family(config_dir)[1] if config_dir is not None else None)
        return f
    if f.suffix != ".safetensors":
        raise UserError(f"transformer file {file} is neither .safetensors nor .gguf (fluxlab never loads pickle "
                        f"checkpoints)")
    check_safetensors([f])
    return f


def config_family(config_dir: Path) -> tuple[str, str]:
    """The transformer class a base model's config names, and its family."""
    cfg = read_json(config_dir / "config.json")
    cls = cfg.get("_class_name")
    if cls not in ("Flux2Transformer2DModel", "FluxTransformer2DModel"):
        raise UserError(f"{config_dir}/config.json describes {cls}, not a FLUX transformer")
    return cls, "flux2" if cls == "Flux2Transformer2DModel" else "flux1"


def load_transformer_file(file: str, config_dir: Path, dtype):
    """A single-file transformer checkpoint (safetensors in BFL or diffusers key names, or GGUF) on the base
    model's config."""
    import diffusers
    import torch
    from safetensors.torch import load_file

    cls, family = config_family(config_dir)
    f = Path(file).expanduser()
    if f.suffix == ".gguf":
        from .gguf_files import load_gguf_transformer

        return load_gguf_transformer(f, config_dir, dtype, family)
    f = check_transformer_file(file)
    sd = load_file(str(f))
    cfg = read_json(config_dir / "config.json")
    if any(k.startswith(("double_blocks.", "single_blocks.", "model.diffusion_model.")) for k in sd):
        try:
            sd = _bfl_to_diffusers(sd, family)
        except (KeyError, ValueError, RuntimeError) as e:
            raise UserError(f"{file} has BFL-style keys that do not fit a {family} transformer ({e})") from None
    model_cls = getattr(diffusers, cls)
    with torch.device("meta"):
        model = model_cls.from_config(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"{file} does not fit this {family} transformer: {len(missing)} missing keys"
            f"{' (e.g. ' + missing[0] + ')' if missing else ''}, {len(unexpected)} unexpected"
            f"{' (e.g. ' + unexpected[0] + ')' if unexpected else ''}"
        )
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            want = tuple(expected[k].shape)
            raise UserError(f"{file}: {k} has shape {tuple(v.shape)}, the base model expects {want}")
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True, assign=True)
    return model.to(dtype).eval()
