"""The store-service command line: flags, their environment variables, and the documented defaults."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from store_service.server import StoreConfig, parse_args
from tests.store.store_process import store_command


def test_every_flag_defaults_from_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_STORE_LISTEN", "127.0.0.1:9999")
    monkeypatch.setenv("KEEL_STORE_DATA_DIR", "/var/lib/keel")
    monkeypatch.setenv("KEEL_STORE_DURABILITY", "normal")
    monkeypatch.setenv("KEEL_STORE_BACKEND", "sqlite")
    monkeypatch.setenv("KEEL_STORE_GRACE", "2.5")
    monkeypatch.setenv("KEEL_STORE_LOG_LEVEL", "debug")
    args = parse_args([])
    assert (args.listen, args.data_dir, args.durability, args.backend, args.grace, args.log_level) == (
        "127.0.0.1:9999",
        "/var/lib/keel",
        "normal",
        "sqlite",
        2.5,
        "debug",
    )
    assert parse_args(["--listen", "127.0.0.1:1"]).listen == "127.0.0.1:1"  # a flag wins


def test_defaults_match_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ["LISTEN", "DATA_DIR", "DURABILITY", "BACKEND", "GRACE", "LOG_LEVEL", "DSN"]:
        monkeypatch.delenv(f"KEEL_STORE_{name}", raising=False)
    args = parse_args([])
    assert (args.listen, args.data_dir, args.durability, args.backend) == (
        "127.0.0.1:7071",
        "keel-data",
        "full",
        "sqlite",
    )
    config = StoreConfig()
    assert (config.listen, str(config.data_dir), config.durability, config.backend) == (
        "127.0.0.1:7071",
        "keel-data",
        "full",
        "sqlite",
    )


def test_help_documents_env_vars_and_the_durability_trade() -> None:
    result = subprocess.run([*store_command(), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for name in ["KEEL_STORE_LISTEN", "KEEL_STORE_DATA_DIR", "KEEL_STORE_DURABILITY", "KEEL_STORE_LOG_LEVEL"]:
        assert name in text
    assert "power loss" in text and "fsync" in text


def test_bad_durability_from_environment_fails_to_start(tmp_path: Path) -> None:
    result = subprocess.run(
        [*store_command(), "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"KEEL_STORE_DURABILITY": "fast", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert "durability" in result.stderr
    assert result.stdout == ""


def test_max_artifact_bytes_defaults_to_one_gib_from_flag_or_environment(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("KEEL_STORE_MAX_ARTIFACT_BYTES", raising=False)
    assert parse_args([]).max_artifact_bytes == StoreConfig().max_artifact_bytes == 1024**3
    monkeypatch.setenv("KEEL_STORE_MAX_ARTIFACT_BYTES", "0")
    assert parse_args([]).max_artifact_bytes == 0  # no cap
    assert parse_args(["--max-artifact-bytes", "1048576"]).max_artifact_bytes == 1048576  # a flag wins
    for bad in ["-1", "1GiB"]:
        with pytest.raises(SystemExit):
            parse_args(["--max-artifact-bytes", bad])
        assert "--max-artifact-bytes" in capsys.readouterr().err
    monkeypatch.setenv("KEEL_STORE_MAX_ARTIFACT_BYTES", "lots")
    with pytest.raises(SystemExit):
        parse_args([])
    assert "'lots' is not a whole number of bytes" in capsys.readouterr().err
