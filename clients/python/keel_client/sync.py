"""KeelClient: the blocking face of AsyncKeelClient, with the same methods, results and errors.

The client is written once, as AsyncKeelClient. KeelClient runs one on a private event loop in a
background thread and forwards every call there, blocking the caller until the answer comes back;
a streaming method (`watch_run`, `iter_runs`) becomes a generator that fetches one item per step.
Deadlines, retries and typed errors are therefore exactly the asynchronous client's.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from typing import Any, Concatenate, ParamSpec, TypeVar

from keel_client.aio import AsyncKeelClient
from keel_client.channel import DEFAULT_DEADLINE, TlsConfig

P = ParamSpec("P")
T = TypeVar("T")


class _LoopThread:
    """A private asyncio event loop in a daemon thread, and a blocking way to run coroutines on it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="keel-client-loop", daemon=True)
        self._thread.start()

    def on_loop(self) -> bool:
        """Whether the caller is the loop's own thread (which must never wait for the loop)."""
        return threading.current_thread() is self._thread

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run `coroutine` on the loop and return its result (or raise its exception) in this thread."""
        if self._loop.is_closed() or self.on_loop():
            coroutine.close()
            raise RuntimeError(
                "this KeelClient is closed" if self._loop.is_closed() else "called on its own loop"
            )
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # Interrupted while waiting (Ctrl-C): the call must not go on in the background.
            future.cancel()
            raise

    def iterate(self, items: AsyncIterator[T]) -> Generator[T, None, None]:
        """`items` as a blocking generator; closing the generator closes `items` (ending its stream)."""
        try:
            while True:
                try:
                    item = self.run(_next(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            self._close(items)

    def _close(self, items: AsyncIterator[Any]) -> None:
        aclose = getattr(items, "aclose", None)
        if aclose is None or self._loop.is_closed():
            return
        if self.on_loop():
            # Collected on the loop's own thread: waiting for the loop here would wait forever.
            self._loop.create_task(aclose())
        else:
            self.run(aclose())

    def stop_after(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        """From the loop's own thread: run `coroutine`, then stop the loop, without waiting for either."""
        self._loop.create_task(_then_cancel_the_rest(coroutine)).add_done_callback(
            lambda _: self._loop.stop()
        )

    def stop(self) -> None:
        """Cancel what still runs on the loop, stop it, wait for its thread, and close it; idempotent.

        A call another thread is blocked in (an `await_run` with no limit, a retry's backoff) ends
        with CancelledError rather than waiting forever on a loop that no longer runs.
        """
        if self._loop.is_closed():
            return
        self.run(_cancel_the_rest())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _cancel_the_rest() -> None:
    """Cancel every task on this loop but the caller's, and wait until they have ended."""
    current = asyncio.current_task()
    rest = [task for task in asyncio.all_tasks() if task is not current]
    for task in rest:
        task.cancel()
    await asyncio.gather(*rest, return_exceptions=True)


async def _then_cancel_the_rest(coroutine: Coroutine[Any, Any, Any]) -> None:
    try:
        await coroutine
    finally:
        await _cancel_the_rest()


async def _next(items: AsyncIterator[T]) -> T:
    # run_coroutine_threadsafe takes a coroutine, and anext() returns a bare awaitable.
    return await anext(items)


async def _call(factory: Callable[[], T]) -> T:
    # grpc.aio binds a channel to the loop it is created on: create it on the client's own loop.
    return factory()


def _shutdown(loop: _LoopThread, client: AsyncKeelClient) -> None:
    if loop.on_loop():
        # Dropped during a garbage collection that ran on the loop's thread: it cannot wait for itself.
        loop.stop_after(client.close())
        return
    try:
        loop.run(client.close())
    finally:
        loop.stop()


def _adopt(call: Callable[..., Any], method: Callable[..., Any]) -> None:
    """Give the blocking `call` the async `method`'s name and signature, and its docstring rewritten.

    The example in the docstring loses its `await` and `async for`, which the blocking call has not.
    """
    functools.update_wrapper(call, method)
    call.__qualname__ = f"KeelClient.{method.__name__}"
    call.__module__ = __name__
    doc = method.__doc__ or ""
    call.__doc__ = doc.replace("async for ", "for ").replace("await ", "").replace("aclosing(", "closing(")


def _blocking(
    method: Callable[Concatenate[AsyncKeelClient, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[KeelClient, P], T]:
    """A KeelClient method that runs AsyncKeelClient's `method` on the client's loop and waits for it."""

    def call(client: KeelClient, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return client._loop.run(method(client._async, *args, **kwargs))

    _adopt(call, method)
    return call


def _blocking_iter(
    method: Callable[Concatenate[AsyncKeelClient, P], AsyncIterator[T]],
) -> Callable[Concatenate[KeelClient, P], Generator[T, None, None]]:
    """A KeelClient generator method over AsyncKeelClient's asynchronous generator `method`."""

    def call(client: KeelClient, /, *args: P.args, **kwargs: P.kwargs) -> Generator[T, None, None]:
        return client._loop.iterate(method(client._async, *args, **kwargs))

    _adopt(call, method)
    return call


class KeelClient:
    """A blocking client of EngineService (thread-safe; one channel per client).

    Example::

        with KeelClient("127.0.0.1:7070") as keel:
            pipeline = {"pipeline_id": "hello", "steps": [{"step_id": "a", "op_id": "echo"}]}
            started = keel.start_run(pipeline)
            run = keel.await_run(started.run_id)
            print(run.status, run.final_snapshot)

    Every call has a deadline (`deadline` seconds, default 30, overridable per call) except those
    that wait for a run (`await_run`, `watch_run`, `start_run(wait=True)`), which wait as long as
    they are told to. UNAVAILABLE is retried by gRPC itself (see keel_client.channel); failures
    raise a subclass of KeelClientError chosen by the ErrorInfo reason. The methods are
    AsyncKeelClient's, run on a private event loop in a background thread.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:7070",
        *,
        deadline: float = DEFAULT_DEADLINE,
        retries: bool = True,
        tls: TlsConfig | None = None,
        token: str | None = None,
    ) -> None:
        self._loop = _LoopThread()
        try:
            self._async = self._loop.run(
                _call(
                    lambda: AsyncKeelClient(target, deadline=deadline, retries=retries, tls=tls, token=token)
                )
            )
        except BaseException:
            self._loop.stop()
            raise
        # Closes the channel and stops the loop on close(), or when the client is dropped unclosed.
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._async)
        self.target = target

    def __enter__(self) -> KeelClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self._finalizer()

    start_run = _blocking(AsyncKeelClient.start_run)
    signal_run = _blocking(AsyncKeelClient.signal_run)
    resume_run = _blocking(AsyncKeelClient.resume_run)
    spawn_child = _blocking(AsyncKeelClient.spawn_child)
    await_child = _blocking(AsyncKeelClient.await_child)
    terminalize = _blocking(AsyncKeelClient.terminalize)
    cancel = _blocking(AsyncKeelClient.cancel)
    get_run = _blocking(AsyncKeelClient.get_run)
    rerun_run = _blocking(AsyncKeelClient.rerun_run)
    delete_run = _blocking(AsyncKeelClient.delete_run)
    list_runs = _blocking(AsyncKeelClient.list_runs)
    iter_runs = _blocking_iter(AsyncKeelClient.iter_runs)
    await_run = _blocking(AsyncKeelClient.await_run)
    watch_run = _blocking_iter(AsyncKeelClient.watch_run)
    list_ops = _blocking(AsyncKeelClient.list_ops)
    list_queues = _blocking(AsyncKeelClient.list_queues)
