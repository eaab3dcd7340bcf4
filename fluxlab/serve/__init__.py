"""`fluxlab serve`: the HTTP API (app), its SQLite store, the broker that feeds the worker process, the worker
that owns the loaded models, and signed webhooks. A front end over fluxlab.service, like the CLI."""
