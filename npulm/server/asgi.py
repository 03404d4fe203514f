"""The ASGI app: the page, /health, /metrics and both APIs' routes over one ServerState. Apart from app.py, whose
helpers the route modules import, so that nothing imports back."""

from __future__ import annotations

import contextlib
from importlib import resources

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import ollama_routes, openai_routes
from .app import AuthAndMetrics, ServerState, health, metrics, page


def create_app(state: ServerState) -> Starlette:
    routes = [Route("/", page), Route("/health", health), Route("/metrics", metrics),
              Mount("/static", StaticFiles(directory=str(resources.files(__package__) / "static")), name="static"),
              *openai_routes.routes(), *ollama_routes.routes()]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if not state.engine.running:
            state.engine.start()
        yield
        state.engine.stop()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.npulm = state
    app.add_middleware(AuthAndMetrics, state=state)
    return app
