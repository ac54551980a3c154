"""The engine's pure core: manifests, plans, events, the history fold and the resume decision.

Beside them: `streams` (every stream id, event type name and status label the engine writes),
`leasing` (lease and liveness records, and whether a holder still holds) and `facts` (the one
fact-key rule). Nothing here imports grpc or protobuf; it is tested without a server.
"""

from __future__ import annotations

from engine_service.domain.canonical import artifact_id_for_bytes, canonical_json_bytes
from engine_service.domain.context import SNAPSHOT_ARTIFACT_KIND, step_context, with_step_output
from engine_service.domain.decision import (
    BRANCH_CANCELED,
    Action,
    AlreadyTerminal,
    CompleteRun,
    RunStep,
    RunSteps,
    next_action,
)
from engine_service.domain.events import (
    CANCELED,
    COMPLETED,
    FAILED,
    CorruptEvent,
    ErrorRecord,
    FactRecorded,
    KernelEvent,
    RunCompleted,
    RunStarted,
    StepAttemptFailed,
    StepAttemptStarted,
    StepCompleted,
    StoredEvent,
    UnknownEvent,
    corrupt_event_error,
    decode_event,
    encode_event,
)
from engine_service.domain.history import OpenAttempt, RunHistory, StepFailure, fold
from engine_service.domain.manifest import MANIFEST_ARTIFACT_KIND, BuildProvenance, RunManifest
from engine_service.domain.ops import DEFAULT_REGISTRY, OpDefinition, OpError, OpRegistry, StepContext, op
from engine_service.domain.plan import PipelineSpec, Plan, StepSpec, resolve_plan, single_op_pipeline
from engine_service.domain.run_config import RetryPolicy, RunConfig, make_run_config, parse_run_id
from engine_service.domain.secrets import looks_like_secret
from engine_service.domain.transports import (
    DEFAULT_TRANSPORTS,
    Transport,
    TransportRegistry,
    register_transport,
)

__all__ = [
    "BRANCH_CANCELED",
    "CANCELED",
    "COMPLETED",
    "DEFAULT_REGISTRY",
    "DEFAULT_TRANSPORTS",
    "FAILED",
    "MANIFEST_ARTIFACT_KIND",
    "SNAPSHOT_ARTIFACT_KIND",
    "Action",
    "AlreadyTerminal",
    "BuildProvenance",
    "CompleteRun",
    "CorruptEvent",
    "ErrorRecord",
    "FactRecorded",
    "KernelEvent",
    "OpDefinition",
    "OpError",
    "OpRegistry",
    "OpenAttempt",
    "PipelineSpec",
    "Plan",
    "RetryPolicy",
    "RunCompleted",
    "RunConfig",
    "RunHistory",
    "RunManifest",
    "RunStarted",
    "RunStep",
    "RunSteps",
    "StepAttemptFailed",
    "StepAttemptStarted",
    "StepCompleted",
    "StepContext",
    "StepFailure",
    "StepSpec",
    "StoredEvent",
    "Transport",
    "TransportRegistry",
    "UnknownEvent",
    "artifact_id_for_bytes",
    "canonical_json_bytes",
    "corrupt_event_error",
    "decode_event",
    "encode_event",
    "fold",
    "looks_like_secret",
    "make_run_config",
    "next_action",
    "op",
    "parse_run_id",
    "register_transport",
    "resolve_plan",
    "single_op_pipeline",
    "step_context",
    "with_step_output",
]
