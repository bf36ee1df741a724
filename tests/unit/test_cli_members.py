"""`blixfs members`, `allow`, `revoke` on offline homes, and tickets bound to one node."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from blixfs.cli import main
from blixfs.members import Role
from blixfs.node import Node
from blixfs.ticket import Ticket


def node_id(home: Path) -> str:
    node = Node.open(home, lock=False)
    try:
        return node.node_id.hex()
    finally:
        node.close()


def run(home: Path, *args: str, input: str | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["--home", str(home), *args], input=input)
    return result.exit_code, result.output


def test_allow_revoke_members_and_a_bound_ticket(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    aid, bid = node_id(a), node_id(b)
    code, out = run(a, "members")
    assert code == 0 and "open namespace" in out
    code, out = run(a, "allow", bid, "--role", "write")  # an open namespace is closed by its first admin only
    assert code == 1 and "first member record" in out
    code, out = run(a, "allow", aid, "--role", "admin", "--no-ticket")
    assert code == 0 and f"{aid} is now admin" in out
    code, out = run(a, "allow", bid, "--role", "write")
    assert code == 0
    ticket = out.strip().splitlines()[-1]
    parsed = Ticket.decode(ticket)
    assert parsed.bound == bytes.fromhex(bid) and parsed.keys.writable
    # Only b can join with it.
    code, out = run(c, "join", "-", input=ticket)
    assert code == 1 and "made for node" in out
    code, out = run(b, "join", "-", input=ticket)
    assert code == 0, out
    code, out = run(a, "revoke", bid)
    assert code == 0 and "revoked" in out
    code, out = run(a, "members", "--json")
    listed = json.loads(out)
    assert listed["closed"] and {m["node"]: m["role"] for m in listed["members"]} == {aid: "admin", bid: "revoked"}
    code, out = run(a, "revoke", aid)  # the last admin stays
    assert code == 1 and "without an admin" in out
    code, out = run(a, "allow", "nonsense", "--role", "read")
    assert code == 2
    node = Node.open(a, lock=False)
    try:
        assert node.replica.members.role(bytes.fromhex(aid)) is Role.ADMIN
    finally:
        node.close()


def test_allow_read_prints_a_read_only_ticket(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    aid, bid = node_id(a), node_id(b)
    assert run(a, "allow", aid, "--role", "admin", "--no-ticket")[0] == 0
    code, out = run(a, "allow", bid, "--role", "read", "--output", str(tmp_path / "t"))
    assert code == 0 and "blixfs" not in out.splitlines()[-1].replace(str(tmp_path), "")
    parsed = Ticket.decode((tmp_path / "t").read_text())
    assert not parsed.keys.writable and parsed.bound == bytes.fromhex(bid)
