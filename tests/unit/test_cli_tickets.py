"""Tickets kept out of argv: `blixfs join` reads them from a file or standard input, `blixfs
share --output` writes them to a 0600 file (click's CliRunner, offline homes)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from blixfs.cli import main
from blixfs.node import Node


def share(runner: CliRunner, home: Path, *args: str) -> str:
    result = runner.invoke(main, ["--home", str(home), "share", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def namespace_of(home: Path) -> tuple[bytes, bool]:
    node = Node.open(home, lock=False)
    try:
        return node.replica.keys.id, node.replica.keys.writable
    finally:
        node.close()


def test_share_output_writes_a_0600_file_and_join_reads_it(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "ticket"
    out.write_text("old")
    os.chmod(out, 0o644)  # an existing file is made private before the secret goes in
    last = share(runner, tmp_path / "a", "--write", "--output", str(out))
    assert last == f"ticket written to {out} (mode 0600)"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    text = out.read_text()
    assert text.startswith("blixfs") and "blixfs" not in last.replace(str(out), "")
    result = runner.invoke(main, ["--home", str(tmp_path / "b"), "join", "--ticket-file", str(out)])
    assert result.exit_code == 0, result.output
    assert namespace_of(tmp_path / "b") == (namespace_of(tmp_path / "a")[0], True)


@pytest.mark.parametrize("how", [["-"], []])
def test_join_reads_the_ticket_from_standard_input(tmp_path: Path, how: list[str]) -> None:
    runner = CliRunner()  # its standard input is not a terminal
    ticket = share(runner, tmp_path / "a", "--write")
    result = runner.invoke(main, ["--home", str(tmp_path / "b"), "join", *how], input=ticket + "\n")
    assert result.exit_code == 0, result.output
    assert namespace_of(tmp_path / "b") == (namespace_of(tmp_path / "a")[0], True)


def test_join_without_a_ticket_on_a_terminal_is_a_usage_error(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("blixfs.cli._stdin_is_terminal", lambda: True)
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "b"), "join"])
    assert result.exit_code == 2 and "no ticket" in result.output


def test_join_refuses_an_argument_and_a_file(tmp_path: Path) -> None:
    f = tmp_path / "t"
    f.write_text("blixfsx")
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "b"), "join", "blixfsx", "--ticket-file", str(f)])
    assert result.exit_code == 2


def test_help_warns_about_write_tickets_on_the_command_line() -> None:
    runner = CliRunner()
    help_text = " ".join(runner.invoke(main, ["join", "--help"]).output.split())
    assert "--ticket-file" in help_text and "process list" in help_text
    assert "--output" in runner.invoke(main, ["share", "--help"]).output
