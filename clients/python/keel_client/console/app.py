"""The console's ASGI app (Starlette): the pages, and a JSON API that calls EngineService over gRPC.

Every route reaches the engine through `AsyncKeelClient`, the public API; the console keeps no
state of its own. The browser gets JSON from `/api/...` and a run's events as Server-Sent Events
(`/api/runs/{id}/events`, fed by WatchRun), so a run page follows the run without polling.
Actions are POSTs that carry the `X-Keel-Console` header: a page of another site cannot send that
header without the console's consent (CORS preflight), so it cannot cancel runs through a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, cast

from keel.engine.v1 import engine_pb2
from keel.worker.v1 import worker_pb2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from keel_client.aio import AsyncKeelClient
from keel_client.console.filters import FilterError, run_query
from keel_client.errors import (
    FailedPreconditionError,
    InvalidArgumentError,
    KeelClientError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from keel_client.models import Run, RunEvent, RunStatus, TerminalTarget, parse_enum, to_json_data

# How often the runs page re-reads its page (ListRuns is answered from the store's index).
DEFAULT_REFRESH_SECONDS = 2.0
# A comment line on an idle event stream, so that proxies do not cut it.
KEEPALIVE_SECONDS = 15.0
# The children tree of a run page: how deep and how many runs at most.
TREE_DEPTH = 4
TREE_NODES = 200
ACTION_HEADER = "x-keel-console"
_STATIC = Path(str(resources.files("keel_client") / "console" / "static"))
_HTTP_STATUS: tuple[tuple[type[KeelClientError], int], ...] = (
    (NotFoundError, 404),
    (InvalidArgumentError, 400),
    (FailedPreconditionError, 409),
    (UnimplementedError, 501),
    (ResourceExhaustedError, 429),
    (UnavailableError, 503),
)


def engine_methods() -> frozenset[str]:
    """The RPCs this console's client knows (`Service/Method`), and so can offer as actions."""
    services = [
        engine_pb2.DESCRIPTOR.services_by_name["EngineService"],
        worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    ]
    return frozenset(f"{service.name}/{method}" for service in services for method in service.methods_by_name)


# Each action or page of the console, and the RPC it needs.
_NEEDS = {
    "cancel": "EngineService/Terminalize",
    "terminalize": "EngineService/Terminalize",
    "rerun": "EngineService/RerunRun",
    "signal": "EngineService/SignalRun",
    "queues": "WorkerService/ListQueues",
}


def offered_actions(methods: frozenset[str]) -> list[str]:
    """The run actions and pages the console shows, given the RPCs the engine offers."""
    return [action for action, rpc in _NEEDS.items() if rpc in methods]


def error_response(error: KeelClientError) -> JSONResponse:
    """The engine's error as JSON, with the HTTP status closest to its gRPC status."""
    status = next((code for kind, code in _HTTP_STATUS if isinstance(error, kind)), 502)
    body = {"error": {"code": error.code, "message": error.message, "category": error.category}}
    return JSONResponse(body, status_code=status)


def _bad_request(message: str, code: str = "invalid_argument") -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=400)


Handler = Callable[[Request], Awaitable[Response]]


def _engine_errors(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except KeelClientError as error:
            return error_response(error)
        except FilterError as error:
            return _bad_request(str(error))

    return wrapped


class ConsoleApi:
    """The JSON API's handlers, each one or a few EngineService calls."""

    def __init__(self, client: AsyncKeelClient, refresh_seconds: float) -> None:
        self.client = client
        self.refresh_seconds = refresh_seconds
        self.actions = offered_actions(engine_methods())

    async def info(self, request: Request) -> Response:
        """What the pages need to know: the engine's address, the actions offered, the refresh period."""
        return JSONResponse(
            {"engine": self.client.target, "actions": self.actions, "refresh_seconds": self.refresh_seconds}
        )

    async def list_runs(self, request: Request) -> Response:
        """One page of runs for the runs page's filters."""
        params = {key: request.query_params.getlist(key) for key in request.query_params}
        query = run_query(params, datetime.now(UTC))
        page = await self.client.list_runs(
            statuses=query.statuses,
            page_size=query.page_size,
            page_token=query.page_token,
            pipeline_id=query.pipeline_id,
            labels=query.labels,
            started_after=query.started_after,
            started_before=query.started_before,
            top_level=query.top_level,
            parent_run_id=query.parent_run_id,
            min_duration=query.min_duration,
            max_duration=query.max_duration,
        )
        return JSONResponse(to_json_data(page))

    async def get_run(self, request: Request) -> Response:
        """A run as GetRun returns it."""
        run = await self.client.get_run(request.path_params["run_id"])
        return JSONResponse({"run": to_json_data(run)})

    async def children_tree(self, request: Request) -> Response:
        """The run's children, theirs, and so on (TREE_DEPTH levels, TREE_NODES runs at most)."""
        root = await self.client.get_run(request.path_params["run_id"])
        return JSONResponse({"tree": await self._tree(root)})

    async def _tree(self, root: Run) -> dict[str, Any]:
        node: dict[str, Any] = _tree_node(root.run_id, root.op_id, root.status, "")
        level: list[tuple[dict[str, Any], Run]] = [(node, root)]
        budget = TREE_NODES
        for _ in range(TREE_DEPTH):
            wanted: list[tuple[dict[str, Any], str]] = []
            for parent_node, parent in level:
                for child in parent.children:
                    child_node = _tree_node(child.child_run_id, child.op_id, child.status, child.fact_key)
                    parent_node["children"].append(child_node)
                    if child.status != RunStatus.PENDING and budget > 0:
                        budget -= 1
                        wanted.append((child_node, child.child_run_id))
            runs = await asyncio.gather(
                *(self.client.get_run(run_id) for _, run_id in wanted), return_exceptions=True
            )
            level = [
                (child_node, run)
                for (child_node, _), run in zip(wanted, runs, strict=True)
                if isinstance(run, Run)
            ]
            for child_node, run in level:
                child_node["status"] = run.status.value
            if not level:
                break
        node["truncated"] = budget <= 0 or bool(level and any(run.children for _, run in level))
        return node

    async def events(self, request: Request) -> Response:
        """The run's events as Server-Sent Events (`id` is the event's sequence), `end` after the last."""
        run_id = request.path_params["run_id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after", "0")
        if not after.isdigit():
            return _bad_request(f"after: {after!r} is not a sequence number")
        return StreamingResponse(
            self._event_stream(run_id, int(after)),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    async def _event_stream(self, run_id: str, after: int) -> AsyncIterator[str]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)

        async def pump() -> None:
            try:
                # watch_run is an async generator: aclosing cancels its call as soon as this ends.
                watch = cast(AsyncGenerator[RunEvent, None], self.client.watch_run(run_id, after_seq=after))
                async with contextlib.aclosing(watch) as events:
                    async for event in events:
                        await queue.put(f"id: {event.seq}\ndata: {_dumps(to_json_data(event))}\n\n")
                await queue.put("event: end\ndata: {}\n\n")
            except KeelClientError as error:
                failure = {"code": error.code, "message": error.message}
                await queue.put(f"event: failure\ndata: {_dumps(failure)}\n\n")
            await queue.put(None)

        task = asyncio.create_task(pump())
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(queue.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keepalive\n\n"
                    continue
                if chunk is None:
                    return
                yield chunk
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def rerun(self, request: Request) -> Response:
        """Start a rerun of the (terminal) run from `from_step_id`; answers the new run's id."""
        body = await _action_body(request)
        step = body.get("from_step_id")
        if not isinstance(step, str) or not step:
            raise FilterError("from_step_id: name the step to rerun from")
        result = await self.client.rerun_run(request.path_params["run_id"], step)
        return JSONResponse({"run_id": result.run_id, "created": result.created})

    async def signal(self, request: Request) -> Response:
        """Send the signal `name` with the JSON `payload` (and an optional `signal_id`) to the run."""
        body = await _action_body(request)
        name, signal_id = body.get("name"), body.get("signal_id") or None
        if not isinstance(name, str) or not name:
            raise FilterError("name: name the signal to send")
        if signal_id is not None and not isinstance(signal_id, str):
            raise FilterError("signal_id: a string, or nothing for a new id")
        sent = await self.client.signal_run(
            request.path_params["run_id"], name, body.get("payload"), signal_id=signal_id
        )
        return JSONResponse(to_json_data(sent))

    async def queues(self, request: Request) -> Response:
        """The task queues, with their backlog, running tasks and the workers seen polling them."""
        return JSONResponse({"queues": to_json_data(await self.client.list_queues())})

    async def cancel(self, request: Request) -> Response:
        """Cancel the run (Terminalize to canceled), with an optional `reason`."""
        body = await _action_body(request)
        result = await self.client.cancel(request.path_params["run_id"], reason=str(body.get("reason", "")))
        return JSONResponse(to_json_data(result))

    async def terminalize(self, request: Request) -> Response:
        """Terminalize the run to `target` (completed, failed, canceled) with an optional `reason`."""
        body = await _action_body(request)
        try:
            target = parse_enum(TerminalTarget, str(body.get("target", "")))
        except ValueError as error:
            raise FilterError(f"target: {error}") from None
        result = await self.client.terminalize(
            request.path_params["run_id"], target, reason=str(body.get("reason", ""))
        )
        return JSONResponse(to_json_data(result))


def _tree_node(run_id: str, op_id: str, status: RunStatus, fact_key: str) -> dict[str, Any]:
    return {"run_id": run_id, "op_id": op_id, "status": status.value, "fact_key": fact_key, "children": []}


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def _action_body(request: Request) -> dict[str, Any]:
    """The JSON object of an action (empty body: {}); FilterError for anything else."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise FilterError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise FilterError("the request body must be a JSON object")
    return body


def _guarded(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> Response:
        if request.headers.get(ACTION_HEADER) != "1":
            message = f"actions must carry the header {ACTION_HEADER}: 1 (sent by the console's pages)"
            return JSONResponse({"error": {"code": "forbidden", "message": message}}, status_code=403)
        return await handler(request)

    return wrapped


async def _page(request: Request) -> Response:
    return FileResponse(_STATIC / "index.html", headers={"cache-control": "no-store"})


async def _home(request: Request) -> Response:
    return RedirectResponse("/runs")


def create_app(client: AsyncKeelClient, *, refresh_seconds: float = DEFAULT_REFRESH_SECONDS) -> Starlette:
    """The console for the engine that `client` talks to (the caller closes the client)."""
    api = ConsoleApi(client, refresh_seconds)
    routes = [
        Route("/", _home),
        Route("/runs", _page),
        Route("/runs/{run_id}", _page),
        Route("/queues", _page),
        Route("/api/info", _engine_errors(api.info)),
        Route("/api/runs", _engine_errors(api.list_runs)),
        Route("/api/queues", _engine_errors(api.queues)),
        Route("/api/runs/{run_id}", _engine_errors(api.get_run)),
        Route("/api/runs/{run_id}/tree", _engine_errors(api.children_tree)),
        Route("/api/runs/{run_id}/events", _engine_errors(api.events)),
        Route("/api/runs/{run_id}/cancel", _guarded(_engine_errors(api.cancel)), methods=["POST"]),
        Route("/api/runs/{run_id}/terminalize", _guarded(_engine_errors(api.terminalize)), methods=["POST"]),
        Route("/api/runs/{run_id}/rerun", _guarded(_engine_errors(api.rerun)), methods=["POST"]),
        Route("/api/runs/{run_id}/signal", _guarded(_engine_errors(api.signal)), methods=["POST"]),
        Mount("/static", StaticFiles(directory=_STATIC), name="static"),
    ]
    return Starlette(routes=routes)
