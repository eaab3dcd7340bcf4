"""/docs: the OpenAPI page served entirely by this server (swagger-ui-bundle's files, our own start script), under a
Content-Security-Policy, instead of FastAPI's default that loads Swagger UI from a CDN with an inline script."""

from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'")
PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fluxlab API</title>
<link rel="stylesheet" href="/docs/static/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/static/swagger-ui-bundle.js"></script><script src="/docs/init.js"></script></body></html>
"""
INIT = """SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout"});
"""


def mount_docs(app: FastAPI) -> None:
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    headers = {"Content-Security-Policy": CSP}
    app.mount("/docs/static", StaticFiles(directory=swagger_ui_path), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(PAGE, headers=headers)

    @app.get("/docs/init.js", include_in_schema=False)
    def init() -> Response:
        return Response(INIT, media_type="text/javascript", headers=headers)
