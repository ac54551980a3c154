"""Run manifests: the immutable, content-addressed description of a run.

A manifest is canonical JSON (see `canonical`); its artifact id `sha256:<hex>` is its identity.
Layout::

    {"op_id", "op_version",
     "input_params": {"pipeline": {...}, "input": <json>, "initial_context": {...}},
     "run_config": {"execution_mode", "retry_policy": {...}, "replay_of_run_id"?},
     "build": {"keel_version", "python_version", "dependency_set_hash"}}
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine_service.domain.canonical import artifact_id_for_bytes, canonical_json_bytes, parse_json_bytes
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND
from engine_service.domain.events import KernelEvent, RunStarted
from engine_service.domain.labels import run_attributes
from engine_service.domain.plan import PipelineSpec
from engine_service.domain.run_config import RunConfig

MANIFEST_ARTIFACT_KIND = "manifest"


@dataclass(frozen=True)
class BuildProvenance:
    """Which engine build made the manifest."""

    keel_version: str
    python_version: str
    dependency_set_hash: str

    def to_json(self) -> dict[str, Any]:
        """Provenance as manifest JSON."""
        return {
            "keel_version": self.keel_version,
            "python_version": self.python_version,
            "dependency_set_hash": self.dependency_set_hash,
        }

    def canonical_bytes(self) -> bytes:
        """Provenance as canonical JSON bytes (encoded once: one engine's build is in every manifest)."""
        return self._canonical_bytes

    @functools.cached_property
    def _canonical_bytes(self) -> bytes:
        return canonical_json_bytes(self.to_json())


@dataclass(frozen=True)
class RunManifest:
    """What a run executes: pipeline, input, initial context, run config, provenance."""

    pipeline: PipelineSpec
    input: Any
    initial_context: dict[str, Any]
    run_config: RunConfig
    build: BuildProvenance

    @property
    def op_id(self) -> str:
        """The run's op id: the pipeline id."""
        return self.pipeline.pipeline_id

    @property
    def op_version(self) -> str:
        """The run's op version: the pipeline version."""
        return self.pipeline.pipeline_version

    def to_json(self) -> dict[str, Any]:
        """The manifest as JSON (the canonical bytes are made from this)."""
        return {
            "op_id": self.op_id,
            "op_version": self.op_version,
            "input_params": {
                "pipeline": self.pipeline.to_json(),
                "input": self.input,
                "initial_context": self.initial_context,
            },
            "run_config": self.run_config.to_json(),
            "build": self.build.to_json(),
        }

    def canonical_bytes(self) -> bytes:
        """The manifest's canonical JSON bytes (encoded once: a manifest is never changed)."""
        return self._canonical_bytes

    @functools.cached_property
    def _canonical_bytes(self) -> bytes:
        # canonical_json_bytes(self.to_json()), with the pipeline's part encoded once per pipeline
        # (one pipeline object serves every run started with it: engine_service.wire.messages) and
        # put in its place: the keys around it, in canonical order, are encoded in two objects
        # whose braces are dropped at the seam. input_params' keys sort as
        # initial_context < input < pipeline; the manifest's as build < input_params < op_id.
        params = canonical_json_bytes({"initial_context": self.initial_context, "input": self.input})
        rest = canonical_json_bytes(
            {"op_id": self.op_id, "op_version": self.op_version, "run_config": self.run_config.to_json()}
        )
        return b"".join(
            (
                b'{"build":',
                self.build.canonical_bytes(),
                b',"input_params":',
                params[:-1],
                b',"pipeline":',
                self.pipeline.canonical_bytes(),
                b"},",
                rest[1:],
            )
        )

    def manifest_id(self) -> str:
        """The manifest's artifact id, computed locally."""
        return artifact_id_for_bytes(self.canonical_bytes())

    @staticmethod
    def from_bytes(data: bytes) -> RunManifest:
        """A manifest read back from its artifact bytes."""
        raw = parse_json_bytes(data)
        params = raw["input_params"]
        build = raw["build"]
        return RunManifest(
            pipeline=PipelineSpec.from_json(params["pipeline"]),
            input=params.get("input"),
            initial_context=dict(params.get("initial_context") or {}),
            run_config=RunConfig.from_json(raw["run_config"]),
            build=BuildProvenance(
                keel_version=str(build["keel_version"]),
                python_version=str(build["python_version"]),
                dependency_set_hash=str(build["dependency_set_hash"]),
            ),
        )


@dataclass(frozen=True)
class RunStart:
    """What starting a run writes: its RunStarted, and the artifacts stored in the same append."""

    started: RunStarted
    manifest_id: str
    snapshot_id: str
    artifacts: list[tuple[str, bytes]]  # (kind, bytes): the manifest unless stored, the initial snapshot
    attributes: dict[str, str]  # the run stream's index entries, set with the same append
    # Events after RunStarted in the same first append (a rerun's reused steps: domain.rerun).
    copied: tuple[KernelEvent, ...] = ()


def run_start(
    manifest: RunManifest,
    *,
    manifest_id: str | None = None,
    parent: tuple[str, str] | None = None,
    manifest_stored: bool = False,
    at_us: int = 0,
    labels: Mapping[str, str] | None = None,
    trace_context: Mapping[str, str] | None = None,
) -> RunStart:
    """The first append of a run of `manifest` (a child's names its parent run and fact key).

    `manifest_id`: the id the manifest is stored under, when known (else computed from it);
    `manifest_stored`: the manifest artifact is in the store already, so it is not sent again.
    """
    manifest_bytes = manifest.canonical_bytes() if manifest_id is None or not manifest_stored else b""
    manifest_id = manifest_id or artifact_id_for_bytes(manifest_bytes)
    snapshot = canonical_json_bytes(manifest.initial_context)
    snapshot_id = artifact_id_for_bytes(snapshot)
    parent_run_id, parent_fact_key = parent or ("", "")
    labels = dict(labels or {})
    started = RunStarted(
        manifest.op_id,
        manifest_id,
        snapshot_id,
        parent_run_id,
        parent_fact_key,
        at_us=at_us,
        labels=labels,
        trace_context=dict(trace_context or {}),
    )
    artifacts = [(SNAPSHOT_ARTIFACT_KIND, snapshot)]
    if not manifest_stored:
        artifacts.insert(0, (MANIFEST_ARTIFACT_KIND, manifest_bytes))
    attributes = run_attributes(manifest.op_id, parent_run_id, labels)
    return RunStart(started, manifest_id, snapshot_id, artifacts, attributes)
