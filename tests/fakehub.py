"""A stand-in for the Hugging Face hub on a free loopback port, for downloads the tests can watch: it serves the
files of a local folder as one repo through the endpoints huggingface_hub's snapshot_download asks (the repo's
revision, its file tree, each file's HEAD and GET), optionally slowly (to watch progress and cancel), and answers
a gated repo as the hub does (403 with X-Error-Code: GatedRepo)."""

import contextlib
import hashlib
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from serving import free_port

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def app_for(repos: dict[str, Path], gated: set[str], pace: dict) -> FastAPI:
    app = FastAPI()

    def files(repo: str) -> dict[str, Path]:
        root = repos[repo]
        return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}

    def refused(repo: str):
        if repo in gated:
            return JSONResponse({"error": f"Access to model {repo} is restricted."}, status_code=403,
                                headers={"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
        if repo not in repos:
            return JSONResponse({"error": "Repository not found"}, status_code=404,
                                headers={"X-Error-Code": "RepoNotFound"})
        return None

    @app.get("/api/models/{owner}/{name}/revision/{revision}")
    def revision(owner: str, name: str, revision: str):
        repo = f"{owner}/{name}"
        return refused(repo) or {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": f} for f in files(repo)]}

    @app.get("/api/models/{owner}/{name}/tree/{revision}")
    def tree(owner: str, name: str, revision: str):
        repo = f"{owner}/{name}"
        return refused(repo) or [{"type": "file", "path": f, "size": p.stat().st_size,
                                  "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for f, p in files(repo).items()]

    @app.api_route("/{owner}/{name}/resolve/{revision}/{path:path}", methods=["GET", "HEAD"])
    def resolve(owner: str, name: str, revision: str, path: str, request: Request):
        repo = f"{owner}/{name}"
        if (no := refused(repo)) is not None:
            return no
        f = files(repo).get(path)
        if f is None:
            return JSONResponse({"error": "Entry not found"}, status_code=404,
                                headers={"X-Error-Code": "EntryNotFound"})
        data = f.read_bytes()
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return Response(headers=headers)

        def chunks():
            for i in range(0, len(data), 4096):
                if pace["delay_s"]:
                    time.sleep(pace["delay_s"])
                yield data[i:i + 4096]

        return StreamingResponse(chunks(), headers=headers, media_type="application/octet-stream")

    return app


@contextlib.contextmanager
def fake_hub(repos: dict[str, Path], gated: set[str] = frozenset(), port: int | None = None):
    """Serve `repos` (repo id -> folder) at http://127.0.0.1:PORT until the block ends; yields the endpoint and
    a dict whose "delay_s" (seconds per 4 KiB sent) can be changed while it runs."""
    import uvicorn

    port = port or free_port()
    pace = {"delay_s": 0.0}
    server = uvicorn.Server(uvicorn.Config(app_for(repos, set(gated), pace), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", pace
    finally:
        server.should_exit = True
        thread.join(10)
