"""`fluxlab serve` and `fluxlab token ...`: the HTTP API (serve.app) and the tokens that may use it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from ..errors import UserError
from . import app, escape, out, say

Opt = typer.Option
token_app = typer.Typer(help="Tokens for `fluxlab serve` (only their SHA-256 is stored).", no_args_is_help=True)
app.add_typer(token_app, name="token")
DATA_HELP = "Data folder (default: $FLUXLAB_DATA or ~/.local/share/fluxlab)."


def _folder(data: str | None) -> Path:
    from ..serve.settings import default_data

    return Path(data) if data else default_data()


def _store(data: str | None, create: bool = True):
    """The data folder's store. Everything the server writes is for its owner alone (folder 0700, files 0600);
    with `create` False, a folder without a store is an error, and nothing is made."""
    import os

    from ..files import check_writable
    from ..serve.store import Store, exists

    folder = _folder(data)
    if not create and not exists(folder):
        raise UserError(f"{folder} holds no fluxlab server data (no fluxlab.db); give --data, or create a token "
                        f"first with `fluxlab token create NAME`")
    old = os.umask(0o077)
    try:
        check_writable(folder, "data folder")
        store = Store(folder, check=True)
        os.chmod(folder, 0o700)
        return store
    finally:
        os.umask(old)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, port: int) -> None:
    """Bind the address now, so a bad host or a port in use is one line before anything is announced or made."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as e:
        raise UserError(f"--host {host!r} is not an address of this machine ({e})") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            what = "in use" if e.errno == 98 else f"not available ({e.strerror})"
            raise UserError(f"cannot listen on {host}:{port}: the address is {what}; choose another --host or "
                            f"--port") from None


def allowed(host: str, given: list[str] | None) -> tuple:
    """The Host headers the server answers: the ones given, else the bind address and localhost (a wildcard bind
    adds this machine's name)."""
    import socket

    if given:
        return tuple(given)
    hosts = {host, "localhost", "127.0.0.1", "[::1]"} | ({f"[{host}]"} if ":" in host else set())
    if host in ("0.0.0.0", "::"):  # listening everywhere: this machine's names and addresses
        hosts |= {socket.gethostname(), socket.getfqdn()}
        with contextlib.suppress(OSError):
            hosts |= {i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)}
    return tuple(sorted(h for h in hosts if h))


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
    webhook_allow: Annotated[list[str] | None, Opt("--webhook-allow", help="An internal address, network (CIDR) "
                                                   "or host webhooks may reach (repeatable; default: public "
                                                   "addresses only).")] = None,
    allowed_host: Annotated[list[str] | None, Opt("--allowed-host", help="A Host header to answer (repeatable; "
                                                  "default: the bind address and localhost).")] = None,
    tls_cert: Annotated[str | None, Opt("--tls-cert", help="Serve HTTPS with this certificate (PEM; with "
                                                           "--tls-key).")] = None,
    tls_key: Annotated[str | None, Opt("--tls-key", help="The certificate's private key (PEM).")] = None,
    workers: Annotated[int | None, Opt(help="Workers taking jobs at once (default 1, or one per --devices entry); "
                                            "on a CPU they share its cores.", min=1, max=256)] = None,
    devices: Annotated[str | None, Opt(help="One worker per entry, e.g. cuda:0,cuda:1; cuda:0+cuda:1 is one worker "
                                            "whose model is split over both (local engine).")] = None,
    engine: Annotated[str, Opt(help="local: worker processes on this machine; ray: Ray actors on a cluster.")]
    = "local",
    ray_address: Annotated[str | None, Opt(help="The Ray cluster to join (default: $RAY_ADDRESS, or a local "
                                                "one).")] = None,
    gpus_per_worker: Annotated[float, Opt(help="GPUs each Ray worker asks for.", min=0)] = 0.0,
    cpus_per_worker: Annotated[float, Opt(help="CPUs each Ray worker asks for.", min=0.1)] = 1.0,
    min_workers: Annotated[int | None, Opt(help="Autoscaling: the fewest workers kept.", min=1)] = None,
    max_workers: Annotated[int | None, Opt(help="Autoscaling: workers are added while jobs wait, up to this.",
                                           min=1, max=256)] = None,
    affinity_wait: Annotated[float, Opt(help="Seconds a job may wait for a busy worker that has its model loaded "
                                             "before an idle one loads it.", min=0)] = 5.0,
    no_affinity: Annotated[bool, Opt("--no-affinity", help="Give each job the first idle worker.")] = False,
    shared_data: Annotated[bool, Opt("--shared-data", help="Ray: the data folder is the same path on every node "
                                                           "(else files travel through Ray).")] = False,
    heartbeat: Annotated[float, Opt(help="Replace a worker silent this many seconds.", min=5)] = 30.0,
    worker_idle: Annotated[float, Opt(help="Autoscaling: stop a worker beyond --min-workers idle this many "
                                           "seconds.", min=1)] = 120.0,
):
    """Serve the HTTP API: predictions, trainings, files, the queue and Server-Sent Events, models kept loaded."""
    import os

    import uvicorn

    from ..files import safe_name
    from ..runtime.devices import resolve_device
    from ..serve.datalock import hold
    from ..serve.outbound import Policy
    from ..serve.settings import Settings
    from ..web import create_site

    models = {}
    for item in model or []:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise UserError(f"--model {item!r}: give NAME=DIR with DIR a local diffusers folder")
        models[safe_name(name, "--model name")] = str(Path(folder).resolve())
    policy = Policy.parse(webhook_allow)
    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give both (PEM files) or neither")
    for option, f in (("--tls-cert", tls_cert), ("--tls-key", tls_key)):
        if f is not None and not Path(f).is_file():
            raise UserError(f"{option} {f}: no such file (a PEM certificate or key)")
    resolve_device(device)
    pool = worker_settings(workers, devices, engine, ray_address, gpus_per_worker, cpus_per_worker, min_workers,
                           max_workers, affinity_wait, no_affinity, shared_data, heartbeat, worker_idle)
    check_bind(host, port)
    if pool.engine == "ray":
        from ..serve.workers import connect_ray, ray_room

        connect_ray(pool.ray_address)
        room = ray_room(pool.count, pool.cpus_per_worker, pool.gpus_per_worker)
        if room:
            say(room)
    from ..serve.store import exists

    no_token = UserError(f"refusing to listen on {host} with no token: anyone could use the server; create one with "
                         f"`fluxlab token create NAME{' --data ' + data if data else ''}` (or set FLUXLAB_TOKEN)")
    if not is_loopback(host) and not os.environ.get("FLUXLAB_TOKEN") and not exists(_folder(data)):
        raise no_token
    os.umask(0o077)  # everything the server and its worker write: for this user alone
    store = _store(data)
    hold(store.data, port)
    if os.environ.get("FLUXLAB_TOKEN"):
        store.ensure_token("env", os.environ["FLUXLAB_TOKEN"])
    if not is_loopback(host) and store.active_tokens() == 0:
        raise no_token
    if store.active_tokens() == 0:
        say("no token exists yet: every route but /v1/health needs one; create one with `fluxlab token create NAME`")
    settings = Settings(data=store.data, models=models, runtime={"device": device}, max_models=max_models,
                        webhook_policy=policy, allowed_hosts=allowed(host, allowed_host), workers=pool)
    site = create_site(settings)
    scheme = "https" if tls_cert else "http"
    out.print(escape(f"fluxlab serving on {scheme}://{host}:{port} (data: {store.data}): the page at /, the API at "
                     f"/v1, its docs at /docs"))
    if pool.most > 1 or pool.engine != "local":
        say(describe(pool))
    # Connections: idle keep-alive closed after 5 s, headers over 64 KB refused, at most 1000 at once (uvicorn
    # has no header-read timeout: facing the internet, put a proxy in front; see the README). On Ctrl-C, open
    # event streams (a page following the queue or a job) are closed after 3 s instead of holding the server up.
    config = uvicorn.Config(site, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                            h11_max_incomplete_event_size=64 * 1024, limit_concurrency=1000, ssl_certfile=tls_cert,
                            ssl_keyfile=tls_key, timeout_graceful_shutdown=3)
    closing = site.state.server.closing

    class Serving(uvicorn.Server):
        def handle_exit(self, sig, frame):  # streams see it and end before uvicorn waits for their connections
            closing.set()
            super().handle_exit(sig, frame)

    import contextlib

    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled; as uvicorn.run, quietly
        Serving(config).run()


def worker_settings(workers, devices, engine, ray_address, gpus, cpus, least, most, affinity_wait, no_affinity,
                    shared_data, heartbeat, idle=120.0):
    """The serve command's worker options, checked together (one line for a combination that means nothing)."""
    from ..runtime.devices import resolve_device
    from ..serve.settings import Workers

    if engine not in ("local", "ray"):
        raise UserError(f"--engine {engine!r}: valid engines are local, ray")
    listed = tuple(d.strip() for d in devices.split(",")) if devices else ()
    if listed and engine == "ray":
        raise UserError("--devices is for the local engine; Ray places workers by --gpus-per-worker and "
                        "--cpus-per-worker")
    for d in listed:
        if not d or "" in d.split("+"):
            raise UserError(f"--devices {devices!r}: an empty entry; give a comma-separated list like cuda:0,cuda:1 "
                            f"(cuda:0+cuda:1: one worker over both)")
        from pydantic import ValidationError

        from ..spec.request import Runtime

        try:  # a worker over several devices: the same checks as --devices on generate
            Runtime(device=d.replace("+", ","))
        except ValidationError as e:
            raise UserError(f"--devices {d!r}: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
        resolve_device(d.replace("+", ","))
    if engine == "local":
        for option, value, default in (("--ray-address", ray_address, None), ("--gpus-per-worker", gpus, 0.0),
                                       ("--cpus-per-worker", cpus, 1.0), ("--shared-data", shared_data, False)):
            if value != default:
                raise UserError(f"{option} is for --engine ray")
    count = workers or least or (len(listed) if listed else 1)
    if least is not None and workers is not None and least != workers:
        raise UserError(f"--workers {workers} and --min-workers {least}: give one (--min-workers is the fewest "
                        f"kept while autoscaling)")
    most = most if most is not None else count
    if most < count:
        raise UserError(f"--max-workers {most} is below the {count} workers started; raise it or start fewer")
    return Workers(engine=engine, count=count, most=most, devices=listed, ray_address=ray_address,
                   gpus_per_worker=gpus, cpus_per_worker=cpus, shared_data=shared_data, affinity=not no_affinity,
                   affinity_wait_s=affinity_wait, heartbeat_s=heartbeat, idle_s=idle)


def describe(pool) -> str:
    where = (f"on Ray ({pool.cpus_per_worker:g} CPU, {pool.gpus_per_worker:g} GPU each"
             f"{', shared data folder' if pool.shared_data else ', files through Ray'})" if pool.engine == "ray"
             else f"on {', '.join(pool.devices)}" if pool.devices else "on this machine, sharing its cores")
    scale = f" (up to {pool.most} while jobs wait)" if pool.most > pool.count else ""
    affinity = (f"jobs wait up to {pool.affinity_wait_s:g} s for a worker with their model loaded" if pool.affinity
                else "each job to the first idle worker")
    return f"{pool.count} worker(s) {where}{scale}; {affinity}"


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="A name for the token (who or what uses it).")],
                 data: Annotated[str | None, Opt(help=DATA_HELP)] = None,
                 admin: Annotated[bool, Opt("--admin", help="May pause the queue, use priorities and see every "
                                                            "job (the first token is always admin).")] = False):
    """Create a token and print it once (it is not shown again)."""
    from ..files import safe_name

    name = safe_name(name, "token name")
    token = _store(data).create_token(name, admin=True if admin else None)
    out.print(token)


@token_app.command("list")
def token_list(data: Annotated[str | None, Opt(help=DATA_HELP)] = None):
    """The tokens by name (never the tokens themselves)."""
    import datetime as dt

    for t in _store(data, create=False).tokens():
        when = dt.datetime.fromtimestamp(t["created_at"]).strftime("%Y-%m-%d %H:%M")
        state = "revoked" if t["revoked_at"] else "active"
        out.print(escape(f"{t['name']:<20} {t['role']:<6} {state:<8} created {when}"))


@token_app.command("revoke")
def token_revoke(name: Annotated[str, typer.Argument()], data: Annotated[str | None, Opt(help=DATA_HELP)] = None):
    """Revoke a token: requests with it are refused from now on."""
    if not _store(data, create=False).revoke(name):
        raise UserError(f"no active token named {name!r}; see `fluxlab token list`")
    out.print(escape(f"revoked {name}"))
