"""The engine at work: the kernel and the parts it wires together, over the EventLog port.

- `kernel`: `Engine` (start with one path to the first append, resume; wires the parts), `StartOutcome`;
- `driving`: each RunDriver as its run's task, and what its end means; `awaiting`: awaiting runs;
- `driver`: `RunDriver`, which executes `next_action` and appends what happened (write-behind);
- `run_io`: an op's I/O, whose answers become facts of the run before the op sees them;
- `children`: child runs (SpawnChild/AwaitChild and `machine.child_run.*`);
- `terminalize`: moving a run to a terminal status once, and the failure ledger;
- `leases`, `holders`, `heartbeat`: which engine drives which run, and its liveness record;
- `recovery`: the scan that takes over runs nobody drives;
- `views`: runs as GetRun, ListRuns and WatchRun show them;
- `registry`, `reader`, `environment`: what those parts share.
"""
