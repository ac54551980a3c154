"""Run labels and ListRuns search over gRPC: labels recorded with the start, every filter, paging."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from keel.engine.v1 import engine_pb2
from keel.store.v1 import store_pb2

from engine_service.domain.labels import check_labels
from keel_core.errors import KeelError
from keel_core.json_values import to_value
from store_service.sql_backend import SqlStoreBackend
from tests.engine.conftest import Cluster
from tests.engine.test_engine_rpcs import all_streams, expect_error
from tests.engine.test_signals import pipeline as signal_pipeline
from tests.engine.test_signals import wait_step


def echo(labels: dict[str, str], *, wait: bool = True) -> engine_pb2.StartRunRequest:
    """A single-op keel.echo run with `labels`."""
    return engine_pb2.StartRunRequest(op=engine_pb2.SingleOp(op_id="keel.echo"), labels=labels, wait=wait)


async def listed(cluster: Cluster, **filters: object) -> list[str]:
    """The run ids of every ListRuns page with these filters, in order."""
    ids: list[str] = []
    token = ""
    while True:
        request = engine_pb2.ListRunsRequest(page_token=token, **filters)  # type: ignore[arg-type]
        page = await cluster.stub.ListRuns(request)
        ids += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            return ids


async def test_labels_are_recorded_with_the_start_and_shown(cluster: Cluster) -> None:
    labels = {"team": "billing", "example.com/tier": "gold", "empty": ""}
    for wait in (True, False):
        run_id = (await cluster.stub.StartRun(echo(labels, wait=wait))).run_id
        run = (await cluster.stub.GetRun(engine_pb2.GetRunRequest(run_id=run_id))).run
        assert dict(run.labels) == labels
        # Indexed in the store with the append that holds RunStarted (the first one).
        streams = await cluster.store_stub.ListStreams(
            store_pb2.ListStreamsRequest(prefix=f"run:{run_id}", attributes={"label:team": "billing"})
        )
        assert [s.stream_id for s in streams.streams] == [f"run:{run_id}"]
    summary = (await cluster.stub.ListRuns(engine_pb2.ListRunsRequest(page_size=1))).runs[0]
    assert (summary.pipeline_id, dict(summary.labels), summary.parent_run_id) == ("keel.echo", labels, "")


async def test_list_runs_by_labels_pipeline_and_status(cluster: Cluster) -> None:
    a = (await cluster.stub.StartRun(echo({"team": "a", "env": "prod"}))).run_id
    b = (await cluster.stub.StartRun(echo({"team": "a", "env": "dev"}))).run_id
    c = (await cluster.stub.StartRun(echo({"team": "b", "env": "prod"}))).run_id
    failing = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(op_id="keel.fail_n_times", op_config=to_value({"n": 1, "retryable": False})),
        labels={"team": "a"},
        wait=True,
    )
    d = (await cluster.stub.StartRun(failing)).run_id
    assert await listed(cluster, labels={"team": "a"}) == [d, b, a]
    assert await listed(cluster, labels={"team": "a", "env": "prod"}) == [a]
    assert await listed(cluster, labels={"team": "c"}) == []
    assert await listed(cluster, pipeline_id="keel.echo") == [c, b, a]
    assert await listed(cluster, pipeline_id="keel.fail_n_times", labels={"team": "a"}) == [d]
    assert await listed(cluster, labels={"team": "a"}, statuses=[engine_pb2.RUN_STATUS_COMPLETED]) == [b, a]


async def test_list_runs_by_start_time(cluster: Cluster) -> None:
    early = (await cluster.stub.StartRun(echo({"k": "v"}))).run_id
    await asyncio.sleep(0.01)  # two distinct start times, however fast the machine is
    late = (await cluster.stub.StartRun(echo({"k": "v"}))).run_id
    runs = {r.run_id: r for r in (await cluster.stub.ListRuns(engine_pb2.ListRunsRequest())).runs}
    cut = Timestamp()
    cut.CopyFrom(runs[late].created_at)
    assert await listed(cluster, started_after=cut) == [late]
    assert await listed(cluster, started_before=cut) == [early]
    assert await listed(cluster, started_before=cut, labels={"k": "v"}) == [early]


async def test_list_runs_by_duration_counts_a_finished_run_to_its_end_and_a_running_one_to_now(
    cluster: Cluster,
) -> None:
    done = (await cluster.stub.StartRun(echo({"k": "d"}))).run_id
    waiting = engine_pb2.StartRunRequest(
        pipeline=signal_pipeline(wait_step("w", "never-sent")), labels={"k": "d"}
    )
    live = (await cluster.stub.StartRun(waiting)).run_id
    runs = {r.run_id: r for r in (await cluster.stub.ListRuns(engine_pb2.ListRunsRequest())).runs}
    assert runs[done].status == engine_pb2.RUN_STATUS_COMPLETED
    assert runs[live].status == engine_pb2.RUN_STATUS_RUNNING
    started = runs[live].created_at
    backend = cluster.store_backend
    assert isinstance(backend, SqlStoreBackend)
    # The store's clock an hour after the waiting run started: it has run an hour; the echo run
    # (which took far less) ended, and its duration stopped there.
    backend.now_us = lambda: started.seconds * 1_000_000 + started.nanos // 1000 + 3_600_000_000
    hour, minute = Duration(seconds=3600), Duration(seconds=60)
    assert await listed(cluster, min_duration=hour) == [live]
    assert await listed(cluster, max_duration=Duration(seconds=3599)) == [done]
    assert await listed(cluster, min_duration=Duration(), max_duration=hour, labels={"k": "d"}) == [
        live,
        done,
    ]
    assert await listed(cluster, max_duration=minute, statuses=[engine_pb2.RUN_STATUS_RUNNING]) == []


@pytest.mark.parametrize(
    "bounds",
    [
        {"min_duration": Duration(seconds=-1)},
        {"max_duration": Duration(nanos=-1)},
        {"max_duration": Duration(nanos=1_000_000_000)},
        {"min_duration": Duration(seconds=61), "max_duration": Duration(seconds=60)},
    ],
    ids=["negative-min", "negative-max", "nanos-out-of-range", "min-above-max"],
)
async def test_bad_duration_filters_are_invalid_duration(
    cluster: Cluster, bounds: dict[str, Duration]
) -> None:
    await expect_error(
        cluster.stub.ListRuns(engine_pb2.ListRunsRequest(**bounds)),  # type: ignore[arg-type]
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_duration",
    )


async def test_list_runs_top_level_or_children(cluster: Cluster) -> None:
    request = engine_pb2.StartRunRequest(
        op=engine_pb2.SingleOp(
            op_id="keel.fan_out", op_config=to_value({"op_id": "test.tick_once", "inputs": [1, 2]})
        ),
        labels={"batch": "one"},
        wait=True,
    )
    parent = await cluster.stub.StartRun(request)
    assert parent.run.status == engine_pb2.RUN_STATUS_COMPLETED
    children = {c.child_run_id for c in parent.run.children}
    assert len(children) == 2
    assert await listed(cluster, lineage=engine_pb2.RUN_LINEAGE_TOP_LEVEL) == [parent.run_id]
    assert set(await listed(cluster, lineage=engine_pb2.RUN_LINEAGE_CHILDREN)) == children
    page = await cluster.stub.ListRuns(engine_pb2.ListRunsRequest(lineage=engine_pb2.RUN_LINEAGE_CHILDREN))
    assert {r.parent_run_id for r in page.runs} == {parent.run_id}
    # Labels are the started run's own: children do not inherit them.
    assert await listed(cluster, labels={"batch": "one"}) == [parent.run_id]


async def test_list_runs_by_label_pages_without_losing_or_repeating_runs(cluster: Cluster) -> None:
    tagged = [(await cluster.stub.StartRun(echo({"page": "me"}, wait=False))).run_id for _ in range(5)]
    for _ in range(3):
        await cluster.stub.StartRun(echo({"page": "not-me"}, wait=False))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await cluster.stub.ListRuns(
            engine_pb2.ListRunsRequest(labels={"page": "me"}, page_size=2, page_token=token)
        )
        pages += 1
        seen += [r.run_id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
    assert seen == tagged[::-1]
    assert pages == 3


@pytest.mark.parametrize(
    "labels",
    [
        {"": "v"},
        {"-team": "v"},
        {"team": "has space"},
        {"x" * 64: "v"},
        {"team": "v" * 64},
        {"Bad_Prefix.io/team": "v"},
        {"a/b/c": "v"},
        {f"k{i}": "v" for i in range(65)},
    ],
    ids=[
        "empty-key",
        "leading-dash",
        "space",
        "long-name",
        "long-value",
        "bad-prefix",
        "two-slashes",
        "too-many",
    ],
)
async def test_bad_labels_are_invalid_labels_and_write_nothing(
    cluster: Cluster, labels: dict[str, str]
) -> None:
    before = await all_streams(cluster)
    message = await expect_error(
        cluster.stub.StartRun(echo(labels)), grpc.StatusCode.INVALID_ARGUMENT, "invalid_labels"
    )
    assert "Kubernetes" in message
    assert await all_streams(cluster) == before
    await expect_error(
        cluster.stub.ListRuns(engine_pb2.ListRunsRequest(labels=labels)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid_labels",
    )


def test_label_bytes_are_bounded_in_total() -> None:
    # 64 keys with a 253-character prefix each: every key is valid, the whole is too big.
    prefix = ".".join(["a" * 63] * 4)[:253]
    labels = {f"{prefix}/k{i}": "v" * 63 for i in range(64)}
    with pytest.raises(KeelError) as caught:
        check_labels(labels)
    assert caught.value.code == "invalid_labels"
    assert "bytes" in caught.value.message
    assert check_labels({f"{prefix}/k": "v"}) == {f"{prefix}/k": "v"}
