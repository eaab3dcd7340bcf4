"""GET /v1/models: the catalog, the server's own models, which are loaded, and the caller's LoRAs."""

from pathlib import Path

from fastapi import APIRouter

from ..deps import Owner, Srv
from ..schemas import ERRORS

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERRORS)


@router.get("")
def models(who: Owner, srv: Srv) -> dict:
    """The catalog, the server's own models, which are loaded, and this token's LoRAs."""
    from ...service.info import models as catalog

    loaded = srv.broker.loaded
    rows = [{**r, "loaded": r["name"] in loaded} for r in catalog()]
    rows += [{"name": n, "bundled": False, "loaded": str(Path(p).resolve()) in loaded}
             for n, p in srv.settings.models.items()]
    loras = [{"name": r["name"], "training": r["job_id"], "trigger_word": r["trigger"], "sha256": r["sha256"]}
             for r in srv.store.loras(who)]
    return {"models": rows, "loras": loras}
