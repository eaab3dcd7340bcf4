"""Finding and loading models: catalog names, local diffusers directories, hub repos, single-file transformers.

`locate()` answers "what is this model and where are its files" from JSON alone (fast, before any weights
are read, so requests can be validated first). `load_components()` then builds the diffusers/transformers
model objects from safetensors files only (never pickle), and never runs code shipped with a model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import UserError, did_you_mean
from ..files import check_safetensors, read_json
from ..spec.catalog import CATALOG, OVERRIDABLE, ModelSpec, bundled_path, text_encoder_layers

# model_index.json pipeline classes we can run, and how each maps onto the catalog's vocabulary.
FLUX2_PIPELINES = {"Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2Pipeline"}
FLUX1_PIPELINES = {"FluxPipeline", "FluxKontextPipeline", "FluxFillPipeline"}

# Component classes we instantiate, per library: a whitelist, so a model_index.json cannot name arbitrary code.
DIFFUSERS_CLASSES = {"Flux2Transformer2DModel", "FluxTransformer2DModel", "AutoencoderKLFlux2", "AutoencoderKL"}
TRANSFORMERS_CLASSES = {
    "Qwen3ForCausalLM", "Qwen3Model", "Mistral3ForConditionalGeneration", "CLIPTextModel", "T5EncoderModel",
}
HUB_REPO = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class ModelSource:
    """A located model: its spec (from the catalog, or derived from a directory's files) and where it lives."""

    spec: ModelSpec | None  # None for a hub repo outside the catalog, until its files are here
    path: Path | None  # None until a hub model is downloaded
    label: str  # what to record and show: a catalog name, an absolute directory, or a hub repo id
    repo: str | None = None


class Components:
    """A pipeline's parts, each loaded on first use and releasable.

    Loading on first use lets a one-shot run encode its prompts, release the text encoder, and only then
    load the transformer, so host memory holds one big model at a time. Configs are read from the files,
    so nothing needs a model loaded to know its shapes.
    """

    NAMES = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")

    def __init__(self, loaders: dict, configs: dict, scheduler_config: dict, dtype, device):
        self._loaders = loaders
        self._configs = configs
        self.scheduler_config = scheduler_config
        self.dtype = dtype
        self.device = device
        self.after_load: dict[str, list] = {}

    def __getattr__(self, name):
        if name not in Components.NAMES:
            raise AttributeError(name)
        loader = self.__dict__["_loaders"].get(name)
        if loader is None:
            return None
        value = loader()
        for fn in self.__dict__["after_load"].get(name, []):
            fn(value)
        self.__dict__[name] = value
        return value

    def is_loaded(self, name: str) -> bool:
        return name in self.__dict__

    def release(self, *names: str) -> None:
        """Drop loaded models (they load again if used again)."""
        import gc

        for n in names:
            self.__dict__.pop(n, None)
        gc.collect()

    def config(self, name: str):
        """A component's config with attribute access, without loading it."""
        if self.is_loaded(name) and hasattr(self.__dict__[name], "config"):
            return self.__dict__[name].config
        return _namespace(self._configs.get(name, {}))


def _namespace(d):
    from types import SimpleNamespace

    return SimpleNamespace(**{k: _namespace(v) if isinstance(v, dict) else v for k, v in d.items()})


# -- locating ---------------------------------------------------------------------------------------------
def derive_spec(path: Path, name: str | None = None) -> ModelSpec:
    """A ModelSpec for a diffusers-format directory, from model_index.json, the component configs and an
    optional fluxlab.json of defaults."""
    return _overrides(path, _derive_spec(path, name))


def _derive_spec(path: Path, name: str | None = None) -> ModelSpec:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise UserError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
    index = read_json(index_file)
    cls = index.get("_class_name", "?")
    name = name or path.name
    sizes = {
        comp: round(sum(f.stat().st_size for f in (path / comp).glob("*.safetensors")) / 1e9, 3)
        for comp in ("transformer", "text_encoder", "text_encoder_2", "vae")
        if (path / comp).is_dir()
    }
    common = dict(name=name, ref=f"fluxlab/{name}", repo=str(path), license="see the model's files", gated=False,
                  sizes_gb=sizes)
    if cls in FLUX2_PIPELINES:
        if cls == "Flux2Pipeline":
            mode, steps, guidance, enc = "embedded", 50, 4.0, "Mistral3"
        elif index.get("is_distilled", cls == "Flux2KleinKVPipeline"):  # the KV pipeline defaults to distilled
            mode, steps, guidance, enc = "none", 4, 1.0, "Qwen3"
        else:
            mode, steps, guidance, enc = "cfg", 50, 4.0, "Qwen3"
        return ModelSpec(family="flux2", description=f"local {cls}", steps=steps, guidance=guidance,
                         guidance_mode=mode, max_sequence_length=512, text_encoder=enc,
                         schedule="FLUX.2 empirical mu", max_references=10 if enc == "Mistral3" else 4,
                         kv_references=cls == "Flux2KleinKVPipeline", **common)
    if cls in FLUX1_PIPELINES:
        tcfg = read_json(path / "transformer" / "config.json")
        kontext, fill = cls == "FluxKontextPipeline", cls == "FluxFillPipeline"
        if kontext:
            mode, steps, guidance, seq = "embedded", 28, 2.5, 512
        elif fill:
            mode, steps, guidance, seq = "embedded", 50, 30.0, 512
        elif tcfg.get("guidance_embeds", False):
            mode, steps, guidance, seq = "embedded", 28, 3.5, 512
        else:
            mode, steps, guidance, seq = "none", 4, 0.0, 256
        return ModelSpec(family="flux1", description=f"local {cls}", steps=steps, guidance=guidance,
                         guidance_mode=mode, max_sequence_length=seq, text_encoder="T5 + CLIP",
                         schedule="from scheduler_config.json", max_references=1 if kontext else 0, fill=fill,
                         **common)
    supported = ", ".join(sorted(FLUX2_PIPELINES | FLUX1_PIPELINES))
    raise UserError(f"{path} holds a {cls} pipeline, not a supported FLUX pipeline (supported: {supported})")




def _overrides(path: Path, spec: ModelSpec) -> ModelSpec:
    """Apply a directory's fluxlab.json (written by fluxlab for models it builds, such as the demo)."""
    f = path / "fluxlab.json"
    if not f.is_file():
        return spec
    data = read_json(f)
    unknown = sorted(set(data) - set(OVERRIDABLE))
    if unknown:
        raise UserError(f"{f}: unknown keys {', '.join(unknown)}; valid: {', '.join(OVERRIDABLE)}")
    if "default_size" in data:
        data["default_size"] = tuple(data["default_size"])
    return replace(spec, **data)


def locate(model: str) -> ModelSource:
    """Resolve a -m value: a catalog name, a local directory, or a hub repo id."""
    if model in CATALOG:
        spec = CATALOG[model]
        if spec.bundled:
            path = bundled_path(spec)
            if not (path / "model_index.json").is_file():
                raise UserError(f"the bundled {spec.name} model is missing from this install ({path}); rebuild it "
                                f"with: python -m fluxlab.demo.build")
            return ModelSource(spec, path, spec.name)
        return ModelSource(spec, None, spec.name, repo=spec.repo)
    p = Path(model).expanduser()
    looks_like_path = model.startswith((".", "/", "~")) or p.exists() or (os.sep in model and not HUB_REPO.match(model))
    if looks_like_path:
        if not p.exists():
            raise UserError(f"model directory {model} does not exist")
        if not p.is_dir():
            raise UserError(f"model {model} is a file, not a pipeline directory (a single-file transformer goes "
                            f"in --transformer, over a base model given with -m)")
        p = p.resolve()
        return ModelSource(derive_spec(p), p, str(p))
    if HUB_REPO.match(model):
        return ModelSource(None, None, model, repo=model)
    raise UserError(
        f"unknown model {model!r}{did_you_mean(model, CATALOG)}; valid names: {', '.join(CATALOG)}"
        " (or a local directory, or a hub repo id org/name)"
    )


def fetch(source: ModelSource, revision: str | None = None) -> ModelSource:
    """Make sure a hub model's files are local (download if allowed), and derive its real spec from them."""
    if source.path is not None:
        if revision is not None:
            raise UserError(f"a revision ({revision}) only applies to hub models; {source.label} is local")
        return source
    path = download(source, revision)
    derived = derive_spec(path, name=source.label)
    spec = source.spec or derived
    if spec.family != derived.family:
        raise UserError(f"{source.repo} holds a {derived.family} pipeline, but the catalog says {spec.family}")
    return replace(source, spec=spec, path=path)


# What a diffusers pipeline needs from a hub repo: its index and its components' folders, not the single-file,
# pickle or GGUF copies some repos also carry.
HUB_FILES = {"allow_patterns": ["model_index.json", "*/*"],
             "ignore_patterns": ["*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx*"]}


def download(source: ModelSource, revision: str | None = None, progress=None) -> Path:
    """A hub model's files into the hub cache (what is there already is kept): its folder, or one line saying why
    not (offline, gated, missing). `progress(done_bytes, total_bytes)` is called as bytes arrive and may raise to
    stop (a cancel)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    repo = source.repo
    get = f"hf download {repo} --exclude '*.bin' '*.pth' '*.gguf'"
    try:
        return Path(snapshot_download(repo, revision=revision, **HUB_FILES,
                                      **({"tqdm_class": byte_counter(progress)} if progress else {})))
    except GatedRepoError:
        raise UserError(
            f"{repo} is gated (HTTP 403): accept its license at https://huggingface.co/{repo}, create a read token "
            f"at https://huggingface.co/settings/tokens, run `hf auth login`, then `{get}`"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(f"hub repo {repo} does not exist or is private; check the name, or run `hf auth login` "
                        f"if it is yours") from None
    except LocalEntryNotFoundError:
        gated = source.spec is not None and source.spec.gated
        pre = f"accept the license at https://huggingface.co/{repo}, run `hf auth login`, then " if gated else ""
        raise UserError(
            f"the weights of {source.label} ({repo}) are not in the local cache and the hub cannot be reached "
            f"(offline); to get them: {pre}`{get}` on a connected machine (or copy its cache folder here), "
            f"or pass a local diffusers directory with -m ./DIR"
        ) from None
    except HfHubHTTPError as e:
        raise UserError(f"downloading {repo} failed: {e}") from None


def byte_counter(progress):
    """A tqdm class for snapshot_download that shows nothing and hands its byte counts to `progress`: the hub
    library reports a snapshot's bytes written through the progress bars it makes with this class."""
    from tqdm.auto import tqdm

    class Bytes(tqdm):
        def __init__(self, *args, **kwargs):
            self.counting = kwargs.get("unit") == "B" and not str(kwargs.get("desc", "")).startswith("Downloading")
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.done = kwargs.get("initial") or 0

        def update(self, n=1):
            if self.counting:
                self.done += n or 0
                progress(self.done, self.total or 0)
            return super().update(n)

    return Bytes


# -- loading ----------------------------------------------------------------------------------------------
# FLUX.2 encoders: the class to load instead (the bare decoder: no LM head, no vision tower's head).
LEAN_ENCODERS = {"Qwen3ForCausalLM": "Qwen3Model", "Qwen3Model": "Qwen3Model",
                 "Mistral3ForConditionalGeneration": "Mistral3Model"}


def lean_config(folder: Path):
    """A FLUX.2 text encoder's config cut after the deepest layer FLUX.2 reads (see load_lean_encoder)."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    text_cfg = getattr(cfg, "text_config", cfg)
    text_cfg.num_hidden_layers = max(text_encoder_layers(text_cfg.num_hidden_layers))
    return cfg


def _cut_norm(model):
    import torch

    decoder = getattr(model, "language_model", model)
    decoder.norm = torch.nn.Identity()
    return model.eval()


def load_lean_encoder(folder: Path, cls: str, dtype):
    """A FLUX.2 text encoder cut after the deepest layer FLUX.2 reads (3L/4 of L), without its LM head.

    FLUX.2 stacks the hidden states after layers L/4, L/2 and 3L/4; the rest of the network (a quarter of
    the layers and the vocabulary projection) never influences the embeddings. The decoder's final norm is
    made the identity, because a model cut at layer k would otherwise normalise the state it returns as
    hidden_states[k], which the full model leaves unnormalised.
    """
    import transformers

    model = getattr(transformers, LEAN_ENCODERS[cls]).from_pretrained(folder, config=lean_config(folder),
                                                                     dtype=dtype, use_safetensors=True)
    return _cut_norm(model)


def _layerwise_recipe(folder: Path, cls: str, dtype, lean_encoder: bool):
    """How to build a component layer by layer (runtime.reader): (make, name prefixes in its files, whether to
    cut the final norm), or None for the classes this does not cover (they load whole)."""
    if cls in ("Flux2Transformer2DModel", "FluxTransformer2DModel"):
        import diffusers

        model_cls = getattr(diffusers, cls)
        cfg = model_cls.load_config(folder)
        return (lambda: model_cls.from_config(cfg)), ("",), False
    if lean_encoder and LEAN_ENCODERS.get(cls) == "Qwen3Model":
        import transformers

        cfg = lean_config(folder)
        return (lambda: transformers.Qwen3Model._from_config(cfg, dtype=dtype)), ("", "model."), True
    if cls in ("T5EncoderModel", "CLIPTextModel", "Qwen3Model"):
        import transformers

        cfg = transformers.AutoConfig.from_pretrained(folder)
        model_cls = getattr(transformers, cls)
        return (lambda: model_cls._from_config(cfg, dtype=dtype)), ("",), False
    return None


def quantized_component(folder: Path, cls: str, dtype, mode: str, lean_encoder: bool):
    """The transformer or a lean Qwen3 text encoder built layer by layer from its files, each Linear quantized
    (int8/fp8, torchao) as soon as its weights are read, so no full-precision copy of the model is ever held
    (runtime.reader). None for the classes this does not cover (they load whole, then quantize)."""
    from .heap import own_pages
    from .quantize import quantize_linear
    from .reader import build_layerwise

    recipe = _layerwise_recipe(folder, cls, dtype, lean_encoder)
    if recipe is None or cls in ("T5EncoderModel", "CLIPTextModel", "Qwen3Model"):
        return None  # whole-then-quantize for these, as before
    make, prefixes, cut = recipe
    # Every buffer of 1 MB or more gets its own pages, and free pages go back after each layer (runtime.heap):
    # otherwise int8 layers end up interleaved with freed full-precision ones, 20% more resident memory than
    # the weights on a test model.
    with own_pages() as trim:
        def on_linear(module):
            quantize_linear(module, mode)
            trim()  # the layer's full-precision buffers go back to the system now, not at the end

        model = build_layerwise(make, sorted(folder.glob("*.safetensors")), dtype, on_linear, prefixes=prefixes)
    if cut:
        model = _cut_norm(model)
    model.fluxlab_quantized = mode
    return model.eval()


def streamed_component(folder: Path, cls: str, dtype, lean_encoder: bool):
    """A transformer or text encoder whose blocks stay in its files and are read each time they run
    (runtime.streaming: `--memory low` on a CPU). None for the classes this does not cover."""
    from .reader import build_layerwise

    recipe = _layerwise_recipe(folder, cls, dtype, lean_encoder)
    if recipe is None:
        return None
    make, prefixes, cut = recipe
    model = build_layerwise(make, sorted(folder.glob("*.safetensors")), dtype, prefixes=prefixes, stream=True)
    if cut:
        model = _cut_norm(model)
    return model.eval()


def _component(path: Path, name: str, index: dict, dtype, lean: bool = True, quantize: str | None = None,
               stream: bool = False):
    lib, cls = index[name]
    folder = path / name
    if not folder.is_dir():
        raise UserError(f"{path} is missing the {name}/ folder that its model_index.json lists")
    lean_encoder = (lean and name == "text_encoder" and cls in LEAN_ENCODERS
                    and index.get("_class_name") in FLUX2_PIPELINES)
    if stream and not name.startswith(("vae", "tokenizer")):
        check_safetensors(folder.glob("*.safetensors"))
        model = streamed_component(folder, cls, dtype, lean_encoder)
        if model is not None:
            return model
    if quantize in ("int8", "fp8") and not name.startswith(("vae", "tokenizer")):
        check_safetensors(folder.glob("*.safetensors"))
        model = quantized_component(folder, cls, dtype, quantize, lean_encoder)
        if model is not None:
            return model
    if lean_encoder:
        check_safetensors(folder.glob("*.safetensors"))
        return load_lean_encoder(folder, cls, dtype)
    if cls in DIFFUSERS_CLASSES:
        check_safetensors(folder.glob("*.safetensors"))
        import diffusers

        return getattr(diffusers, cls).from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()
    if cls in TRANSFORMERS_CLASSES:
        check_safetensors(folder.glob("*.safetensors"))
        import transformers

        return getattr(transformers, cls).from_pretrained(folder, dtype=dtype, use_safetensors=True).eval()
    if name.startswith("tokenizer"):
        import transformers

        if cls.endswith("Processor"):
            return transformers.AutoProcessor.from_pretrained(folder)
        return transformers.AutoTokenizer.from_pretrained(folder)
    raise UserError(f"{folder} has component class {lib}.{cls}, which fluxlab does not load")


def quiet_logging() -> None:
    """Lower the log levels of what the libraries print at import that users cannot act on: torchao's notes
    about optional CUDA kernels missing on a CPU-only machine, torch's deprecation chatter, diffusers' and
    transformers' warnings about optional integrations. Imports nothing, so the CLI calls it first thing; it
    must run before the first of those libraries is imported."""
    import logging
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("torch.utils._pytree", "torchao", "peft", "accelerate", "ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Their warnings too (peft's "Already found a peft_config", torchao's notes on LoRA layers): fluxlab says what
    # a user can act on itself. `--verbose` keeps them all.
    warnings.filterwarnings("ignore", module=r"(peft|torchao|accelerate|diffusers|transformers|ray)(\..*)?$")


def quiet_libraries() -> None:
    """quiet_logging, and no per-file loading progress bars."""
    quiet_logging()
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def refuse_remote_code(folder: Path) -> None:
    """A component whose config asks for code shipped with the model (`auto_map`, custom classes) is refused:
    fluxlab loads weights and configs, never a model's own Python files."""
    for name in ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        f = folder / name
        if f.is_file():
            data = read_json(f)
            if isinstance(data, dict) and (data.get("auto_map") or data.get("trust_remote_code")):
                raise UserError(f"{f} asks to run code shipped with the model (auto_map); fluxlab never runs code "
                                f"from a model folder")


def check_model_files(path: Path) -> tuple[dict, list[str]]:
    """What must hold before anything is built (callable before any weights load): the components the pipeline
    needs are listed and present, ship no code to run, and have readable safetensors headers. Returns the
    model index and the needed component names."""
    index = read_json(path / "model_index.json")
    needed = ["transformer", "vae", "text_encoder", "tokenizer"]
    if index.get("_class_name") in FLUX1_PIPELINES:
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [n for n in needed if n not in index]
    if missing:
        raise UserError(f"{path}/model_index.json lacks the component(s) {', '.join(missing)}")
    for name in needed:
        folder = path / name
        if not folder.is_dir():
            raise UserError(f"{path} is missing the {name}/ folder that its model_index.json lists")
        refuse_remote_code(folder)
        if not name.startswith("tokenizer"):
            check_safetensors(folder.glob("*.safetensors"))
    return index, needed


_frozen = False


def freeze_imported(index: dict, needed: list[str]) -> None:
    """Import the model classes a pipeline needs, then move everything alive so far out of the garbage
    collector's sight (gc.freeze), once per process.

    torch, diffusers and transformers leave about a million long-lived objects behind at import; every full
    collection walks them all (0.35 s a time on a 2-core EPYC, three times in a one-shot generation, where
    releasing a text encoder calls gc.collect). Module-level objects never become garbage, so freezing them
    loses nothing. Done once, before the first model exists, so no model's objects are ever frozen (a released
    model's reference cycles stay collectable).
    """
    global _frozen
    if _frozen:
        return
    for name in needed:
        cls = index[name][1]
        if cls in DIFFUSERS_CLASSES:
            import diffusers

            getattr(diffusers, cls)
        elif cls in TRANSFORMERS_CLASSES or name.startswith("tokenizer"):
            import transformers

            getattr(transformers, LEAN_ENCODERS.get(cls, cls), None)
    import gc

    gc.collect()
    gc.freeze()
    _frozen = True


def load_components(path: Path, dtype, device, transformer_file: str | None = None, lean: bool = True,
                    quantize: str | None = None, stream: bool = False) -> Components:
    """A pipeline's parts, loaded on first use onto `device`. Files are checked now (headers only), so a
    corrupt or missing file is reported before any work starts. `lean` cuts FLUX.2 text encoders after the
    deepest layer used (see load_lean_encoder); `lean=False` loads them whole, as diffusers does. `quantize`
    (int8, fp8) quantizes the transformer and text encoders while they load (quantized_component); `stream`
    leaves their blocks in the files, read each time they run (streamed_component)."""
    quiet_libraries()
    index, needed = check_model_files(path)
    freeze_imported(index, needed)
    configs = {n: read_json(path / n / "config.json") for n in needed if not n.startswith("tokenizer")}
    if transformer_file:
        from .singlefile import check_transformer_file

        check_transformer_file(transformer_file, path / "transformer")

    def loader(name):
        def load():
            if name == "transformer" and transformer_file:
                from .singlefile import load_transformer_file

                m = load_transformer_file(transformer_file, path / "transformer", dtype)
            else:
                m = _component(path, name, index, dtype, lean, quantize, stream)
            if hasattr(m, "to") and not name.startswith("tokenizer") and not hasattr(m, "fluxlab_stream"):
                m.to(device)
                m.requires_grad_(False)
            return m
        return load

    sched = path / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(sched) if sched.is_file() else {}
    return Components({n: loader(n) for n in needed}, configs, scheduler_config, dtype, device)
