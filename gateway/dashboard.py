"""The dashboard at / of every node: one static page (HTML, JS, CSS shipped as package data, no build
step, nothing from elsewhere) that polls the node's own JSON: /mesh/self, /mesh/peers, /v1/models,
/mesh/stats, and chats through /v1/chat/completions.

The page renders peer-provided strings as text only; the Content-Security-Policy below backs that up
(scripts and connections to this origin only, no inline script), so a hostile advert cannot run code.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

FILES = {  # the only files served: name -> content type
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _read(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


def add_dashboard_routes(app: web.Application) -> None:
    """GET / and GET /dashboard/{file}; the files are read once, when the routes are added."""
    bodies = {name: _read(name) for name in FILES}
    headers = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache",
               "Referrer-Policy": "no-referrer"}

    async def page(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bodies["index.html"], headers={**headers, "Content-Type": FILES["index.html"]})

    async def asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name not in bodies or name == "index.html":
            raise web.HTTPNotFound()
        return web.Response(body=bodies[name], headers={**headers, "Content-Type": FILES[name]})

    app.router.add_get("/", page)
    app.router.add_get("/dashboard/{name}", asset)
