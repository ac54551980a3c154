"""A Keel worker: runs the `charge` and `receipt` steps of payments_pipeline.yaml.

    .venv/bin/keel up &
    .venv/bin/python clients/python/keel_client/examples/payments_worker.py &     # polls queue `payments`
    .venv/bin/keel run clients/python/keel_client/examples/payments_pipeline.yaml --wait

`charge` calls a (pretend) payment provider through `ctx.io.call`, so the answer is recorded in the
run before the op sees it: if this worker dies after the charge, the attempt that runs next (here or
on another worker) is served the recorded answer and the customer is not charged twice. SIGTERM
stops polling and lets running tasks finish.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from keel_client.worker import CallInfo, OpFailure, TaskContext, Worker, op

_receipts = itertools.count(1000)


async def payment_provider(request: Any, call: CallInfo) -> Any:
    """The transport of namespace `payments`: a real one would call the provider's API, passing
    `call.fact_key` as its idempotency key."""
    return {"charged": request["amount"], "receipt": f"R-{next(_receipts)}", "idempotency_key": call.fact_key}


@op("charge", description="Charges the order's amount once")
async def charge(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Charges the order's amount once (a recorded fact)."""
    if input["amount"] <= 0:
        raise OpFailure("bad_amount", f"cannot charge {input['amount']}", retryable=False)
    answer = await ctx.io.call("payments", {"amount": input["amount"]}, fact_key=f"charge:{input['order']}")
    return {"receipt": answer["receipt"], "amount": answer["charged"]}


@op("receipt", description="Formats the receipt line")
async def receipt(ctx: TaskContext, op_config: Any, input: Any) -> Any:
    """Formats the receipt line from the charge step's output (in the context)."""
    charged = ctx.context["charge"]
    return {"line": f"{op_config['shop']}: {charged['amount']} paid, receipt {charged['receipt']}"}


if __name__ == "__main__":
    Worker(
        os.environ.get("KEEL_ENGINE", "127.0.0.1:7070"),
        "payments",
        ops=[charge, receipt],
        transports={"payments": payment_provider},
        concurrency=8,
    ).run()
