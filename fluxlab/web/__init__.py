"""The web page of `fluxlab serve`: generate with live progress, the queue, a gallery, grids and training, in
server-rendered templates with a little plain JavaScript, every script and style served by fluxlab itself."""

from __future__ import annotations


def create_site(settings=None):
    """The API (serve.app) with the page mounted on it: one process, one port."""
    from ..serve.app import create_app
    from .pages import mount

    app = create_app(settings)
    mount(app)
    return app
