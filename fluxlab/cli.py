"""The `fluxlab` command line. Command bodies are thin: parse -> resolve -> run -> save.

torch, diffusers and transformers are imported inside commands, never at module level, so `fluxlab --help`
answers instantly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(
    name="fluxlab",
    help="A lab for FLUX image models: generate, inspect, compare.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _say(msg: str) -> None:
    err.print(f"[yellow]note:[/yellow] {msg}")


Opt = typer.Option


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="What to draw.")] = None,
    model: Annotated[str, Opt("-m", "--model", help="Catalog name, local diffusers dir, or hub repo id.")] =
        "flux2-klein-4b",
    width: Annotated[int | None, Opt("-W", "--width", help="Width in pixels (multiple of 16).")] = None,
    height: Annotated[int | None, Opt("-H", "--height", help="Height in pixels (multiple of 16).")] = None,
    aspect: Annotated[str | None, Opt(help="Size preset: 1:1 9:16 3:4 4:3 16:9 512 768.")] = None,
    steps: Annotated[int | None, Opt(help="Denoising steps (default: the model's).")] = None,
    guidance: Annotated[float | None, Opt(help="Guidance scale (default: the model's).")] = None,
    negative: Annotated[str | None, Opt(help="Negative prompt (base models with real CFG).")] = None,
    seed: Annotated[int | None, Opt(help="Seed 0..4294967295 (random when omitted).")] = None,
    num_images: Annotated[int, Opt("-n", "--num-images", help="Images with seeds S, S+1, ...")] = 1,
    dtype: Annotated[str, Opt(help="auto|bf16|fp16|fp32 (auto: bf16 where fast).")] = "auto",
    device: Annotated[str, Opt(help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    out_path: Annotated[str | None, Opt("-o", "--out", help="FILE.png or a directory (default: outputs/).")] =
        None,
    transformer: Annotated[str | None, Opt(help="Single-file transformer .safetensors over the base model.")] =
        None,
    from_image: Annotated[str | None, Opt("--from", help="Regenerate a fluxlab PNG with its settings.")] = None,
    reproducible: Annotated[bool, Opt(help="Leave run timings out of the PNG: same request, same bytes.")] =
        False,
    quiet: Annotated[bool, Opt("-q", "--quiet", help="Print only the written paths.")] = False,
):
    """Generate images from a text prompt."""
    from .request import make_request

    given = {k: v for k, v in dict(prompt=prompt, width=width, height=height, aspect=aspect, steps=steps,
                                   guidance=guidance, negative=negative, seed=seed).items() if v is not None}
    if from_image:
        from .output import read_metadata

        meta = read_metadata(from_image)
        base = {k: meta[k] for k in ("prompt", "negative", "width", "height", "steps", "guidance", "seed")
                if meta.get(k) is not None}
        if "aspect" in given:
            base.pop("width"), base.pop("height")
        given = {**base, **given}
        model = meta["model"] if model == "flux2-klein-4b" else model
        transformer = transformer or meta.get("transformer_file")
        dtype = meta.get("dtype", dtype) if dtype == "auto" else dtype
    if "prompt" not in given:
        raise UserError("no prompt given: fluxlab generate \"a prompt\" (or --from IMAGE.png)")
    if num_images != 1:
        given["num_images"] = num_images
    req = make_request(**given)

    # Validate against the model before loading any weights, so bad input fails in milliseconds.
    from .loading import locate
    from .request import resolve

    source = locate(model)
    if source.spec is not None:  # known before download: catalog names and local directories
        resolve(req, source.spec)

    from .output import output_paths, save_png
    from .pipeline import load

    notify = (lambda m: None) if quiet else _say
    with err.status("loading model...", spinner="dots") if not quiet and err.is_terminal else _nullctx():
        pipe = load(model, device=device, dtype=dtype, transformer=transformer, notify=notify)
    job = resolve(req, pipe.spec)
    paths = output_paths(out_path, len(job.seeds), job.seeds)
    results = pipe.generate(req)
    for r, p in zip(results, paths, strict=True):
        save_png(r.image, p, r.metadata, None if reproducible else r.timings)
        if quiet:
            out.print(str(p))
        else:
            out.print(f"wrote {p}  (seed {r.seed}, {job.width}x{job.height}, {job.steps} steps)")
    if not quiet:
        t = results[0].timings
        err.print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items() if k != "validate"))


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@app.command()
def models(
    as_json: Annotated[bool, Opt("--json", help="Machine-readable output.")] = False,
):
    """List the catalog's models and whether each is in the local hub cache."""
    import json

    from .catalog import CATALOG

    cached = _cached_repos()
    rows = []
    for spec in CATALOG.values():
        size = sum(spec.sizes_gb.values())
        have = cached.get(spec.repo)
        rows.append({
            "name": spec.name, "repo": spec.repo, "family": spec.family, "steps": spec.steps,
            "guidance": spec.guidance, "guidance_mode": spec.guidance_mode, "text_encoder": spec.text_encoder,
            "license": spec.license, "gated": spec.gated, "size_gb": round(size, 1),
            "cached_gb": None if have is None else round(have / 1e9, 2),
        })
    if as_json:
        out.print_json(json.dumps(rows))
        return
    from rich.table import Table

    table = Table("name", "family", "steps", "guidance", "text encoder", "license", "size", "local cache")
    for r in rows:
        g = {"none": "none (distilled)", "embedded": f"{r['guidance']:g} embedded", "cfg": f"{r['guidance']:g} CFG"}
        lic = r["license"] + (" (gated)" if r["gated"] else "")
        local = "-" if r["cached_gb"] is None else f"{r['cached_gb']:.1f} GB"
        table.add_row(r["name"], r["family"], str(r["steps"]), g[r["guidance_mode"]], r["text_encoder"], lic,
                      f"~{r['size_gb']:.0f} GB", local)
    out.print(table)
    out.print("Get one: hf download REPO (gated repos: accept the license on its page, then hf auth login).")


def _cached_repos() -> dict[str, int]:
    """Bytes in the local hub cache per model repo (empty when there is no cache)."""
    try:
        from huggingface_hub import scan_cache_dir

        return {r.repo_id: r.size_on_disk for r in scan_cache_dir().repos if r.repo_type == "model"}
    except Exception:  # no cache directory yet, or an unreadable one: nothing is cached
        return {}


@app.command()
def show(
    image: Annotated[Path, typer.Argument(help="A PNG written by fluxlab.")],
    as_json: Annotated[bool, Opt("--json", help="Print the metadata as JSON.")] = False,
):
    """Print the settings an image was made with."""
    import json

    from .output import read_metadata

    meta = read_metadata(image)
    if as_json:
        out.print_json(json.dumps(meta))
        return
    for k, v in meta.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        out.print(f"[bold]{k:>16}[/bold]  {v}")


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: one line and exit 2 for user errors, 130 on Ctrl-C, never a traceback for those."""
    try:
        app(args=argv, standalone_mode=False)
    except UserError as e:
        err.print(f"[red]error:[/red] {e}")
        return 2
    except typer.TyperException as e:  # click usage errors (typer vendors click): bad flag, bad number
        if type(e).__name__ == "NoArgsIsHelpError":
            e.show()
            return 0
        err.print(f"[red]error:[/red] {e.format_message()}")
        return 2
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    return 0


def run() -> None:
    sys.exit(main())
