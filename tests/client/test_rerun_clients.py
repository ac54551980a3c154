"""RerunRun through the Python clients (blocking and asyncio) and `keel rerun`, against real services."""

from __future__ import annotations

import json
import uuid

import pytest
from keel_client import AsyncKeelClient, KeelClient, RunStatus
from keel_client.errors import FailedPreconditionError, NotFoundError

from tests.client.conftest import pipeline, run_keel, step

PIPELINE = pipeline(
    "client-rerun",
    step("first", "keel.echo", {"n": 1}),
    step("second", "keel.transform", {"fields": {"n": "$context.first.config.n"}}, ("first",)),
)


def test_blocking_client_reruns_from_a_step(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        old = keel.start_run(PIPELINE, input={"x": 1}, wait=True).run
        assert old is not None and old.status is RunStatus.COMPLETED
        run_id_new = str(uuid.uuid4())
        rerun = keel.rerun_run(old.run_id, "second", run_id_new=run_id_new)
        assert (rerun.run_id, rerun.created) == (run_id_new, True)
        run = keel.await_run(run_id_new).run
        assert run is not None
        assert run.status is RunStatus.COMPLETED
        assert (run.rerun_of_run_id, run.rerun_from_step_id) == (old.run_id, "second")
        assert run.step("first").reused_from_run_id == old.run_id
        assert run.step("second").reused_from_run_id is None
        assert run.final_snapshot == old.final_snapshot
        assert keel.get_run(old.run_id).reruns == (run_id_new,)
        assert keel.rerun_run(old.run_id, "second", run_id_new=run_id_new).created is False
        with pytest.raises(NotFoundError) as caught:
            keel.rerun_run(old.run_id, "nope")
        assert caught.value.code == "step_not_found"


async def test_async_client_reruns_and_refuses_a_running_run(engine_address: str) -> None:
    async with AsyncKeelClient(engine_address) as keel:
        old = (await keel.start_run(PIPELINE, wait=True)).run
        assert old is not None
        rerun = await keel.rerun_run(old.run_id, "first")
        # Both ids picked by the client, as UUIDv7s (keel_core.ids).
        assert [uuid.UUID(run_id).version for run_id in (old.run_id, rerun.run_id)] == [7, 7]
        run = (await keel.await_run(rerun.run_id)).run
        assert run is not None
        assert run.status is RunStatus.COMPLETED
        assert [s.reused_from_run_id for s in run.steps] == [None, None]
        busy = await keel.start_run(op="keel.sleep", op_config={"seconds": 30})
        with pytest.raises(FailedPreconditionError) as caught:
            await keel.rerun_run(busy.run_id, "main")
        assert caught.value.code == "run_not_terminal"
        await keel.cancel(busy.run_id)


def test_keel_rerun_command(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        old = keel.start_run(PIPELINE, wait=True).run
    assert old is not None
    said = run_keel("rerun", old.run_id, "--from", "second", engine=engine_address)
    assert said.code == 0, said.stderr
    assert f"a rerun of {old.run_id} from step 'second' (reused: first)" in said.stdout
    waited = run_keel("rerun", old.run_id, "--from", "second", "--wait", "--json", engine=engine_address)
    assert waited.code == 0, waited.stderr
    run = json.loads(waited.stdout)
    assert (run["status"], run["rerun_of_run_id"]) == ("completed", old.run_id)
    got = run_keel("get", old.run_id, engine=engine_address).stdout.splitlines()
    reruns = next(line for line in got if line.startswith("reruns"))
    assert run["run_id"] in reruns
    shown = run_keel("get", run["run_id"], engine=engine_address).stdout.splitlines()
    assert f"rerun of   {old.run_id} from step second" in shown
    assert any(line.split()[:3] == ["first", "keel.echo@1", "reused"] for line in shown)
    bad = run_keel("rerun", old.run_id, "--from", "nope", engine=engine_address)
    assert bad.code == 1 and "has no step 'nope'" in bad.stderr, bad.stderr


def test_delete_run_through_the_blocking_client_and_keel_delete(engine_address: str) -> None:
    with KeelClient(engine_address) as keel:
        parent = keel.start_run(
            op="keel.fan_out", op_config={"op_id": "keel.echo", "inputs": [1, 2]}, wait=True
        )
        assert parent.run is not None
        children = {c.child_run_id for c in parent.run.children}
        deleted = keel.delete_run(parent.run_id)
        assert deleted.run_ids[0] == parent.run_id and set(deleted.run_ids[1:]) == children
        with pytest.raises(NotFoundError):
            keel.get_run(parent.run_id)
        other = keel.start_run(PIPELINE, wait=True)
    said = run_keel("delete", other.run_id, engine=engine_address)
    assert said.code == 0, said.stderr
    assert f"deleted run {other.run_id} and 0 run(s) it spawned" in said.stdout
    again = run_keel("delete", other.run_id, engine=engine_address)
    assert again.code == 1 and "does not exist" in again.stderr
