"""The node's weights on HTTP: `POST /mesh/pull` (fetch a whole model into the cache), `GET /mesh/pull`
(its progress), and the file adverts that tell members which bytes this node holds."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
from typing import TYPE_CHECKING

from aiohttp import web

from dataplane.weights_store import WeightsError
from discovery.advert import FileAdvert
from gateway.app import KEYS_KEY

if TYPE_CHECKING:
    from node.daemon import Node

log = logging.getLogger("meshllm.weights")
_NAME = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def compute_file_adverts(node: Node) -> tuple[FileAdvert, ...]:
    """Blocking: a FileAdvert per GGUF we hold bytes of: whole (offered) files, and cached ranges with
    the range they hold; each names its manifest id, so members can fetch from us."""
    from node.model_loader import file_advert

    held = {h.digest: h for h in node.weight_store.held()}
    out = []
    for model in node.models.offered_files():
        advert = file_advert(model, node.config, node.models.context)
        h = held.get(model.digest)
        if h is not None:
            partial = (h.start, h.end) != (0, h.n_layers)
            advert = dataclasses.replace(advert, manifest=h.manifest_id, start=h.start if partial else 0,
                                         end=h.end if partial else 0)
        out.append(advert)
    return tuple(out)


def _resolve(node: Node, name: str) -> tuple[str, str] | None:
    """(digest, alias) of a model members advertise bytes of, by alias, digest or a 12+ character prefix."""
    for advert in [node.self_advert(), *node.peer_adverts()]:
        for f in advert.files:
            if name in (f.alias, f.digest) or (len(name) >= 12 and f.digest.startswith(name)):
                return f.digest, f.alias
    return None


def add_weights_routes(app: web.Application, node: Node) -> None:
    pulls: dict[str, dict] = {}  # digest -> state of the last pull asked for
    tasks: set[asyncio.Task] = set()

    def authorised(request: web.Request) -> bool:
        keys = request.app[KEYS_KEY]
        if not keys.enabled:
            return True
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and keys.match(presented.strip()) is not None

    async def run(digest: str, alias: str) -> None:
        state = pulls[digest]
        try:
            path = await node.weight_store.pull(digest, node.peer_adverts(), alias)
            state.update(state="done", path=str(path), **node.weight_store.last_fetch.get(digest, {}))
            log.info("pulled %s into %s", alias, path)
        except WeightsError as e:
            state.update(state="error", error=str(e))
            log.error("pull of %s failed: %s", alias, e)

    async def start_pull(request: web.Request) -> web.StreamResponse:
        """Cheap to ask, costly to run: keyed when the node has API keys (a pull fills the disk)."""
        if not authorised(request):
            return web.json_response({"error": "an API key is needed"}, status=401)
        try:
            body = await request.json()
            name = body["model"]
        except (ValueError, KeyError, TypeError):
            return web.json_response({"error": "send {\"model\": NAME}"}, status=400)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            return web.json_response({"error": "model must be an alias or a digest"}, status=400)
        found = _resolve(node, name)
        if found is None:
            return web.json_response({"error": f"no member advertises the bytes of {name}"}, status=404)
        digest, alias = found
        if pulls.get(digest, {}).get("state") != "running":
            pulls[digest] = {"state": "running", "digest": digest, "alias": alias}
            if len(pulls) > 64:
                pulls.pop(next(iter(pulls)))
            task = asyncio.create_task(run(digest, alias))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        return web.json_response(pulls[digest], status=202)

    async def pull_state(request: web.Request) -> web.StreamResponse:
        digest = request.query.get("model", "")
        state = pulls.get(digest)
        if state is None:
            return web.json_response({"error": "no pull of that digest"}, status=404)
        progress = node.weight_store.fetching.get(digest)
        return web.json_response({**state, "progress": progress.snapshot() if progress is not None else None})

    async def cancel_pulls(app: web.Application) -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    app.router.add_post("/mesh/pull", start_pull)
    app.router.add_get("/mesh/pull", pull_state)
    app.on_cleanup.append(cancel_pulls)
