"""The HTTP API of `fluxlab serve`: Replicate/cog-shaped predictions and trainings under /v1, files, outputs, the
queue, Server-Sent Events and webhooks; FastAPI in one process, the models in worker processes or Ray actors
(serve.worker, started and fed by serve.broker).

Every route but GET /v1/health needs `Authorization: Bearer <token>`; jobs, files, outputs and LoRAs belong to the
token that made them (anyone else gets 404), and admin tokens alone may steer the shared queue. Requests name inputs
by uploaded file id and models by name, never by a server path, and no answer shows one. A request is checked by
the same service.prepare the CLI uses, so a bad value gets the CLI's words, as a 422, before anything is stored.
This module only assembles: the routes live in serve.routes (one router per resource) and serve.jobs (the routes
every kind of job shares), their dependencies in serve.deps.
"""

from contextlib import asynccontextmanager

from fastapi import FastAPI

from .. import __version__
from .settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    import os

    from .broker import Broker
    from .deps import KINDS, Server
    from .docs import mount_docs
    from .http import BodyLimit, Throttle, install_handlers
    from .jobs import job_routes, render
    from .routes import (
        batches,
        captions,
        downloads,
        files,
        grids,
        models,
        predictions,
        queue,
        trainings,
        upsamples,
    )
    from .store import Store
    from .uploads import sweep

    settings = settings or Settings()
    store = Store(settings.data, check=True)
    sweep(settings.data)
    if os.environ.get("FLUXLAB_TOKEN"):
        store.ensure_token("env", os.environ["FLUXLAB_TOKEN"])
    srv = Server(store, None, settings, Throttle())
    srv.broker = Broker(store, settings, lambda job: render(srv, job))

    @asynccontextmanager
    async def lifespan(app):
        srv.broker.start()
        try:
            yield
        finally:
            srv.broker.stop()

    app = FastAPI(title="fluxlab", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Predictions, trainings, files and outputs of a fluxlab server.")
    app.state.server = srv
    app.add_middleware(BodyLimit, default=settings.max_json_bytes,
                       uploads=max(settings.max_zip_bytes, settings.max_lora_bytes, settings.max_image_bytes))
    if settings.allowed_hosts:
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    install_handlers(app, settings)
    for router in (predictions.router, trainings.router, batches.router, grids.router, captions.router,
                   upsamples.router, downloads.router):
        app.include_router(router)
    for kind in KINDS:
        app.include_router(job_routes(kind))
    for router in (files.files, files.outputs, models.router, models.account, queue.queue, queue.webhooks,
                   queue.health):
        app.include_router(router)
    mount_docs(app)
    return app
