"""`blixfs commit` without a daemon, and the control op's request check."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from blixfs.cli import main
from blixfs.daemon import _invalid


def test_commit_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(tmp_path / "home"), "commit", "vm.img"])
    assert result.exit_code != 0
    assert "no daemon is running" in result.output and "blixfs mount" in result.output


def test_commit_help_explains_when_peers_see_writes() -> None:
    result = CliRunner().invoke(main, ["commit", "--help"])
    assert result.exit_code == 0 and "--publish-interval" in result.output


def test_the_commit_request_is_checked() -> None:
    assert _invalid({"op": "commit", "path": "vm.img"}) is None
    assert _invalid({"op": "commit", "path": 3}) == "path must be str"
