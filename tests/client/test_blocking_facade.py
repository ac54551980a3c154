"""The blocking client is AsyncKeelClient on a private loop; the client alone cannot start services."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
import time

import pytest
from keel_client import KeelClient
from keel_client.cli import main


def _loop_threads() -> int:
    return sum(thread.name == "keel-client-loop" for thread in threading.enumerate())


def test_closing_or_dropping_a_client_stops_its_loop_thread(engine_address: str) -> None:
    before = _loop_threads()
    with KeelClient(engine_address) as keel:
        assert keel.list_ops()
        assert _loop_threads() == before + 1
    assert _loop_threads() == before
    dropped = KeelClient(engine_address)
    assert dropped.list_ops()
    del dropped
    gc.collect()
    assert _loop_threads() == before


def test_a_closed_client_refuses_calls_with_a_clear_error(engine_address: str) -> None:
    keel = KeelClient(engine_address)
    keel.close()
    keel.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        keel.list_ops()


def test_leaving_a_watch_early_lets_the_client_go_on(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        started = keel.start_run(op="keel.echo", input={"n": 1}, wait=True)
        events = keel.watch_run(started.run_id)
        first = next(events)
        events.close()
        assert first.seq == 1
        assert keel.get_run(started.run_id).run_id == started.run_id


def test_the_blocking_methods_document_the_blocking_call() -> None:
    doc = KeelClient.watch_run.__doc__ or ""
    assert "for event in keel.watch_run(run_id)" in doc
    assert "await" not in doc and "async for" not in doc


@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_without_the_server_say_they_need_it(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What a client-only install (`pip install ./clients/python`) looks like from the inside.
    monkeypatch.setitem(sys.modules, "engine_service", None)
    assert main([command]) == 1
    stderr = capsys.readouterr().err
    assert f"keel: error: keel {command} needs the Keel server" in stderr
    assert "pip install ." in stderr


def test_a_client_closed_on_its_own_loop_thread_stops_without_waiting_for_itself(engine_address: str) -> None:
    # What a garbage collection that drops an unclosed client on the loop's thread does.
    keel = KeelClient(engine_address)
    loop_thread = keel._loop._thread
    keel._loop._loop.call_soon_threadsafe(keel.close)
    loop_thread.join()  # a deadlock would hang here (until pytest-timeout)
    assert not loop_thread.is_alive()


def test_closing_a_client_ends_a_call_another_thread_is_blocked_in(engine_address: str) -> None:
    keel = KeelClient(engine_address)
    started = keel.start_run(op="keel.sleep", op_config={"seconds": 3600})
    outcome: list[BaseException | object] = []
    entered = threading.Event()

    def wait_for_the_run() -> None:
        entered.set()
        try:
            outcome.append(keel.await_run(started.run_id))
        except BaseException as error:
            outcome.append(error)

    waiter = threading.Thread(target=wait_for_the_run, daemon=True)
    waiter.start()
    entered.wait()
    while not _awaiting(keel):
        time.sleep(0.01)
    keel.close()
    waiter.join(60)  # a hang detector: the call must end once the client is closed
    assert not waiter.is_alive(), "a call blocked in another thread outlived close()"
    assert len(outcome) == 1 and isinstance(outcome[0], BaseException)
    with KeelClient(engine_address) as other:
        other.cancel(started.run_id)


def _awaiting(keel: KeelClient) -> bool:
    """Whether the client's loop runs a task besides its own (the call under way)."""
    loop = keel._loop._loop
    return bool(asyncio.run_coroutine_threadsafe(_tasks_besides_self(), loop).result())


async def _tasks_besides_self() -> int:
    return len(asyncio.all_tasks()) - 1
