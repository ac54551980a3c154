"""A service that stops when the program that launched it dies, armed by the service itself (Linux).

`keel up` starts its store and engine with `LAUNCHER_PID_ENV` set to its own process id
(`launcher_env`); each service calls `stop_with_launcher` first thing, which watches the launcher
process through a pidfd and sends itself SIGTERM when it exits. So a killed `keel up` leaves no
orphans holding the ports and the database.

Not PR_SET_PDEATHSIG: that signal comes when the launcher's *thread* that started the service
exits, so a LocalCluster started from a worker thread would stop its services when that thread
ends. A pidfd becomes readable only when the whole process has exited; a daemon thread of the
service blocks on it (no polling).

The service arms it, not the launcher between fork and exec (subprocess's `preexec_fn`), because
a `preexec_fn` makes CPython fork() the launcher instead of vfork(), which runs gRPC's fork
handlers when the launcher has gRPC running (its health checks do). They start gRPC's threads
again in the child, one of which polls an epoll descriptor that subprocess's close_fds closes
before exec: that thread aborts the child ("epoll_wait error: Bad file descriptor", SIGABRT)
in a few starts out of a hundred; and now and then the handler that runs before the fork waits
forever in the launcher. Without a `preexec_fn` CPython uses vfork(), which runs no fork handler, and the
launcher runs no code between fork and exec.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading

# The launcher's process id, as the service must see it from os.getppid().
LAUNCHER_PID_ENV = "KEEL_LAUNCHER_PID"


def launcher_env() -> dict[str, str]:
    """Environment entries that make a service started by this process stop when this process dies."""
    return {LAUNCHER_PID_ENV: str(os.getpid())}


def stop_with_launcher() -> None:
    """Get SIGTERM when the launcher named in `LAUNCHER_PID_ENV` dies; nothing when it is not set.

    The variable is taken out of the environment, so this process's own children do not inherit
    it. Raises ValueError when it is not a process id. Outside Linux this does nothing.
    """
    value = os.environ.pop(LAUNCHER_PID_ENV, "")
    if not value:
        return
    if not value.isdigit():
        raise ValueError(f"{LAUNCHER_PID_ENV} must be the launcher's process id, not {value!r}")
    if sys.platform != "linux":
        return
    launcher = int(value)
    try:
        watched = os.pidfd_open(launcher)
    except ProcessLookupError:
        watched = None
    if watched is None or os.getppid() != launcher:
        # The launcher died before it was watched (this process was reparented, the pid maybe
        # reused): its exit will never be seen, so act on it now.
        os.kill(os.getpid(), signal.SIGTERM)
        return
    threading.Thread(target=_stop_when_gone, args=(watched,), name="keel-launcher-watch", daemon=True).start()


def _stop_when_gone(watched: int) -> None:
    select.select([watched], [], [])  # readable once the launcher process has exited
    os.kill(os.getpid(), signal.SIGTERM)


__all__ = ["LAUNCHER_PID_ENV", "launcher_env", "stop_with_launcher"]
