"""`fluxlab serve` and `fluxlab token ...`: the HTTP API (serve.app) and the tokens that may use it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from . import app, escape, out, say

Opt = typer.Option
token_app = typer.Typer(help="Tokens for `fluxlab serve` (only their SHA-256 is stored).", no_args_is_help=True)
app.add_typer(token_app, name="token")
DATA_HELP = "Data folder (default: $FLUXLAB_DATA or ~/.local/share/fluxlab)."


def _store(data: str | None):
    from ..files import check_writable
    from ..serve.settings import default_data
    from ..serve.store import Store

    folder = Path(data) if data else default_data()
    check_writable(folder, "data folder")
    return Store(folder)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Annotated[str, Opt(help="Address to listen on (loopback unless a token exists).")] = "127.0.0.1",
    port: Annotated[int, Opt(help="Port.", min=1, max=65535)] = 7860,
    data: Annotated[str | None, Opt(help=DATA_HELP)] = None,
    model: Annotated[list[str] | None, Opt("--model", help="Offer a local diffusers folder as NAME=DIR "
                                                           "(repeatable); catalog models are always offered.")] = None,
    device: Annotated[str, Opt(help="auto|cpu|cuda|cuda:N|mps.")] = "auto",
    max_models: Annotated[int | None, Opt(help="Models the worker keeps loaded at once (default: as memory "
                                               "allows).", min=1)] = None,
):
    """Serve the HTTP API: predictions, trainings, files, the queue and Server-Sent Events, models kept loaded."""
    import os

    import uvicorn

    from ..files import safe_name
    from ..serve.settings import Settings
    from ..web import create_site

    models = {}
    for item in model or []:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise UserError(f"--model {item!r}: give NAME=DIR with DIR a local diffusers folder")
        models[safe_name(name, "--model name")] = str(Path(folder).resolve())
    store = _store(data)
    if os.environ.get("FLUXLAB_TOKEN"):
        store.ensure_token("env", os.environ["FLUXLAB_TOKEN"])
    if not is_loopback(host) and store.active_tokens() == 0:
        raise UserError(f"refusing to listen on {host} with no token: anyone could use the server; create one "
                        f"with `fluxlab token create NAME{' --data ' + data if data else ''}` (or set FLUXLAB_TOKEN)")
    if store.active_tokens() == 0:
        say("no token exists yet: every route but /v1/health needs one; create one with `fluxlab token create NAME`")
    settings = Settings(data=store.data, models=models, runtime={"device": device}, max_models=max_models)
    out.print(escape(f"fluxlab serving on http://{host}:{port} (data: {store.data}): the page at /, the API at "
                     f"/v1, its docs at /docs"))
    uvicorn.run(create_site(settings), host=host, port=port, log_level="warning")


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="A name for the token (who or what uses it).")],
                 data: Annotated[str | None, Opt(help=DATA_HELP)] = None):
    """Create a token and print it once (it is not shown again)."""
    from ..files import safe_name

    token = _store(data).create_token(safe_name(name, "token name"))
    out.print(token)


@token_app.command("list")
def token_list(data: Annotated[str | None, Opt(help=DATA_HELP)] = None):
    """The tokens by name (never the tokens themselves)."""
    import datetime as dt

    for t in _store(data).tokens():
        when = dt.datetime.fromtimestamp(t["created_at"]).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if t["revoked_at"] else "active"
        out.print(escape(f"{t['name']:<20} {state:<8} created {when}"))


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument()], data: Annotated[str | None, Opt(help=DATA_HELP)] = None):
    """Revoke a token: requests with it are refused from now on."""
    if not _store(data).revoke(name):
        raise UserError(f"no active token named {name!r}; see `fluxlab token list`")
    out.print(escape(f"revoked {name}"))
