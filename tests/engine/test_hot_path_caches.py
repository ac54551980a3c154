"""What the engine keeps or skips on a run's hot path (issue 13) changes nothing a caller sees."""

from __future__ import annotations

import copy

import pytest
from keel.engine.v1 import engine_pb2

from engine_service.domain import (
    BuildProvenance,
    PipelineSpec,
    RunConfig,
    RunManifest,
    StepSpec,
    make_run_config,
)
from engine_service.domain.canonical import canonical_json_bytes, json_copy
from engine_service.domain.run_config import REPLAY
from engine_service.wire import messages
from keel_core.errors import KeelError
from keel_core.json_values import to_value

BUILD = BuildProvenance("test", "3", "none")
REPLAYED = "0b9f7c1e-6a52-4a57-9f3e-1d2c3b4a5f60"


def request(op_config: object, input: object = None) -> engine_pb2.StartRunRequest:
    step = engine_pb2.Step(step_id="a", op_id="keel.echo", op_config=to_value(op_config))
    return engine_pb2.StartRunRequest(
        pipeline=engine_pb2.Pipeline(pipeline_id="p", steps=[step]), input=to_value(input)
    )


def test_json_copy_shares_nothing_mutable_with_what_it_copies() -> None:
    value = {"a": [1, {"b": "c"}], "d": None, "e": 1.5, "f": True, "rows": ({"n": 1},)}
    copied = json_copy(value)
    assert copied == copy.deepcopy(value)
    copied["a"][1]["b"] = "changed"
    copied["rows"][0]["n"] = 2  # a tuple an op put in a request is copied too
    assert value == {"a": [1, {"b": "c"}], "d": None, "e": 1.5, "f": True, "rows": ({"n": 1},)}


def test_a_small_pipeline_is_parsed_once_and_a_large_one_every_time() -> None:
    small = request({"k": 1})
    assert messages.pipeline_from(small) is messages.pipeline_from(request({"k": 1}))
    large = request({"blob": "x" * (messages.PIPELINE_CACHED_BYTES + 1)})
    first, second = messages.pipeline_from(large), messages.pipeline_from(large)
    assert first == second and first is not second  # not kept: it is parsed again


def test_a_request_without_a_run_config_gets_the_defaults_made_once_and_one_with_fields_its_own() -> None:
    unset = messages.run_config_from(engine_pb2.RunConfig())
    assert unset == make_run_config() and unset is messages.run_config_from(engine_pb2.RunConfig())
    asked = engine_pb2.RunConfig(retry_policy=engine_pb2.RetryPolicy(max_attempts=5))
    assert messages.run_config_from(asked) == make_run_config(max_attempts=5) != unset
    # A retry policy set but empty makes a message with a field: read as the defaults, past the shortcut.
    empty_policy = engine_pb2.RunConfig(retry_policy=engine_pb2.RetryPolicy())
    assert messages.run_config_from(empty_policy) == make_run_config()
    with pytest.raises(KeelError) as refused:
        messages.run_config_from(engine_pb2.RunConfig(execution_mode=99))  # type: ignore[arg-type]
    assert refused.value.code == "invalid_argument"


def test_the_manifest_is_encoded_once_and_an_oversized_input_is_still_refused_by_name() -> None:
    manifest = messages.manifest_from(request({"k": 1}, {"n": 1}), BUILD)
    assert manifest.canonical_bytes() is manifest.canonical_bytes()
    assert manifest.canonical_bytes() == canonical_json_bytes(manifest.to_json())
    with pytest.raises(KeelError) as refused:
        messages.manifest_from(request({"k": 1}, "x" * messages.MAX_INPUT_BYTES), BUILD)
    assert refused.value.code == "input_too_large"
    assert refused.value.message.startswith("input is ")


@pytest.mark.parametrize(
    ("data", "context", "config"),
    [
        (None, {}, make_run_config()),
        ({"n": 1, "é": ["ü", {"b": None}]}, {"seed": {"x": 1.5}}, make_run_config(max_attempts=3)),
        ('a\u2028string with "quotes" and }', {"input": 1, "pipeline": 2}, make_run_config()),
        ([1, 2, {"pipeline": 0}], {}, make_run_config(execution_mode=REPLAY, replay_of_run_id=REPLAYED)),
    ],
    ids=["none", "unicode", "tricky-keys", "replay"],
)
def test_a_manifest_put_together_around_its_pipelines_bytes_is_its_canonical_json(
    data: object, context: dict[str, object], config: RunConfig
) -> None:
    # The pipeline's canonical bytes are kept with the (shared) pipeline and the manifest's are put
    # together around them: byte for byte what encoding the whole would give, whatever the values.
    steps = (
        StepSpec("a", "keel.echo", op_config={"k": [1, "ü"]}),
        StepSpec("b", "keel.transform", depends_on=("a",), task_queue="q"),
    )
    for pipeline in (PipelineSpec("p", "2", steps), PipelineSpec("p", "1", steps[:1], max_parallel=2)):
        manifest = RunManifest(pipeline, data, context, config, BUILD)
        assert manifest.canonical_bytes() == canonical_json_bytes(manifest.to_json())
        assert RunManifest.from_bytes(manifest.canonical_bytes()) == manifest
    assert pipeline.canonical_bytes() is pipeline.canonical_bytes()
