"""The run context: a JSON object checkpointed after every step.

Layout: the run starts with its `initial_context` (a JSON object, default `{}`). When a step
completes, the run's checkpoint becomes the latest checkpoint plus that step's output under its
step id at the top level: after steps `fetch` and `shape`, the checkpoint is
`{**initial_context, "fetch": <fetch output>, "shape": <shape output>}`. A step id equal to a key
of the initial context replaces that key.

What a step *sees* (`ctx.context`) is narrower: the initial context plus the outputs of the steps
it depends on, directly or transitively (`step_context`). Parallel branches complete in any order,
so a step never sees a sibling it does not depend on: what it sees is the same whichever branch
finished first. The run's `input` is passed to every step separately.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

SNAPSHOT_ARTIFACT_KIND = "snapshot"


def with_step_output(context: Mapping[str, Any], step_id: str, output: Any) -> dict[str, Any]:
    """The checkpoint after `step_id` completed with `output` (`context`: the latest checkpoint)."""
    out = dict(context)
    out[step_id] = output
    return out


def step_context(
    initial: Mapping[str, Any], checkpoint: Mapping[str, Any], ancestors: Set[str]
) -> dict[str, Any]:
    """What a step sees: `initial` plus the outputs its `ancestors` left in `checkpoint`.

    `checkpoint` is any checkpoint taken after every ancestor completed (the attempt's base); a
    step completes once, so its output is the same in every later checkpoint.
    """
    seen = dict(initial)
    for step_id, output in checkpoint.items():  # in the checkpoint's order: deterministic
        if step_id in ancestors:
            seen[step_id] = output
    return seen
