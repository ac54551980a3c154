"""The engine at work: the kernel and the parts it wires together, over the EventLog port.

- `kernel`: `Engine` (start, resume, await; the one start path), `StartOutcome`;
- `driver`: `RunDriver`, which executes `next_action` and appends what happened (write-behind);
- `children`: child runs (SpawnChild/AwaitChild and `machine.child_run.*`);
- `terminalize`: moving a run to a terminal status once, and the failure ledger;
- `leases`, `holders`, `heartbeat`: which engine drives which run, and its liveness record;
- `recovery`: the scan that takes over runs nobody drives;
- `views`: runs as GetRun, ListRuns and WatchRun show them;
- `registry`, `reader`: what those parts share.
"""
