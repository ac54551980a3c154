"""The run context: a JSON object threaded through the run and checkpointed after every step.

Layout: the run starts with its `initial_context` (a JSON object, default `{}`). When a step
completes, its output is stored under its step id at the top level: after steps `fetch` and
`shape`, the context is `{**initial_context, "fetch": <fetch output>, "shape": <shape output>}`.
A step id equal to a key of the initial context replaces that key. Ops read earlier outputs from
`ctx.context[<step id>]`; the run's `input` is passed to every step separately.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SNAPSHOT_ARTIFACT_KIND = "snapshot"


def with_step_output(context: Mapping[str, Any], step_id: str, output: Any) -> dict[str, Any]:
    """The context after `step_id` completed with `output`."""
    out = dict(context)
    out[step_id] = output
    return out
