"""A Python worker process for tests/client/test_node_worker.py: `py.total` on a queue, until SIGTERM.

python python_worker_process.py ENGINE TASK_QUEUE WORKER_ID
"""

from __future__ import annotations

import sys
from typing import Any

from keel_client.worker import TaskContext, Worker, op


@op("py.total")
async def total(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Adds the op config's `add` to what the Node step computed."""
    return {
        "total": ctx.context["enrich"]["n"] + op_config["add"],
        "lang": "python",
        "saw": sorted(ctx.context),
    }


def main() -> None:
    """Serve the queue until SIGTERM or SIGINT."""
    engine, queue, worker_id = sys.argv[1:4]
    worker = Worker(engine, queue, ops=[total], worker_id=worker_id)
    print(f"WORKER {worker.worker_id} polling {queue}", flush=True)
    worker.run()


if __name__ == "__main__":
    main()
