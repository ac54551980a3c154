"""Fixtures every test package shares: where the PostgreSQL server is, and whether it must be there."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os

import pytest

PG_DSN = os.environ.get("KEEL_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
_pg_skips: list[str] = []


def _postgres_reachable() -> str | None:
    """None when PG_DSN accepts a connection, else why not."""
    try:
        import asyncpg
    except ImportError as error:  # pragma: no cover - asyncpg is a dependency
        return f"asyncpg is not installed: {error}"

    async def probe() -> None:
        connection = await asyncpg.connect(PG_DSN, timeout=3)
        await connection.close()

    def run_probe() -> str | None:
        try:
            asyncio.run(probe())
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        return None

    # The fixture may first be requested from inside a running event loop (an async fixture), where
    # asyncio.run is refused; a thread has no loop of its own.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(run_probe).result()


@functools.cache
def _postgres_problem() -> str | None:
    return _postgres_reachable()


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    """The DSN of a reachable PostgreSQL; skips loudly without one, and fails in CI instead."""
    problem = _postgres_problem()
    if problem is None:
        return PG_DSN
    message = f"PostgreSQL at {PG_DSN} is unreachable ({problem}); set KEEL_TEST_PG_DSN"
    if IN_CI:
        pytest.fail(f"{message} -- in CI the PostgreSQL tests must run", pytrace=False)
    _pg_skips.append(message)
    pytest.skip(f"SKIPPED POSTGRES: {message}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly, at the end of the run, that PostgreSQL tests were skipped."""
    if _pg_skips:
        terminalreporter.write_sep("!", "PostgreSQL tests were SKIPPED", red=True, bold=True)
        terminalreporter.write_line(_pg_skips[0])
        terminalreporter.write_line(f"{len(_pg_skips)} test(s) did not run against PostgreSQL.")
