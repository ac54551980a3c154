"""Keel's web console: runs, a run's DAG, timeline, children, facts and events, and actions on runs.

It talks to the engine only through EngineService (the async client). Needs the `console` extra
(`pip install 'keel-client[console]'`): Starlette for the app, uvicorn to serve it.
"""

from __future__ import annotations

from keel_client.console.app import DEFAULT_REFRESH_SECONDS, create_app
from keel_client.console.server import ConsoleServer

__all__ = ["DEFAULT_REFRESH_SECONDS", "ConsoleServer", "create_app"]
