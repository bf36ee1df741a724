"""The ``blixfs`` command line.

Every command takes ``--home DIR`` (or ``$BLIXFS_HOME``) so several nodes can
run on one machine. Errors are one line that says what to do, exit status 1;
usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from blixfs.daemon import PUBLISH_INTERVAL, ask_daemon
from blixfs.entry import Kind
from blixfs.errors import FsError
from blixfs.gc import DEFAULT_GRACE_SECONDS, collect
from blixfs.manifest import DEFAULT_CHUNK_SIZE
from blixfs.members import Role, member_report, parse_node_id
from blixfs.net.transport import NodeAddr
from blixfs.node import HomeLocked, JoinError, Node, default_home
from blixfs.replica import NamespaceKeys
from blixfs.ticket import Ticket, TicketError

log = logging.getLogger("blixfs")
IMAGE_COLUMNS = ("name", "version", "os", "arch", "tags", "uploaded_by")
CHUNK_SIZES = {f"{n}K": n * 1024 for n in (64, 128, 256, 512, 1024)}


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose if verbose else logging.INFO
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def _count(n: int, one: str, many: str) -> str:
    """``n`` and the noun for it: '1 file', '2 files', '0 directories'."""
    return f"{n} {one if n == 1 else many}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "BLIXFS"})
@click.option("--home", type=click.Path(file_okay=False, path_type=Path), envvar="BLIXFS_HOME",
              help="State directory of this node [env BLIXFS_HOME; default $XDG_DATA_HOME/blixfs].")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="blixfs")
@click.pass_context
def main(ctx: click.Context, home: Path | None, verbose: int) -> None:
    """blixfs: a peer-to-peer filesystem for VM images.

    \b
    Quick start:
      blixfs mount /mnt/images          # serve the namespace at /mnt/images until Ctrl-C
      cp ubuntu.qcow2 /mnt/images/
      blixfs status
    """
    _setup_logging(verbose)
    ctx.obj = {"home": (home or default_home()).expanduser().absolute()}


def _open_node(ctx: click.Context, *, lock: bool) -> Node:
    home: Path = ctx.obj["home"]
    try:
        return Node.open(home, lock=lock)
    except HomeLocked as exc:
        raise click.ClickException(str(exc)) from None
    except PermissionError as exc:
        raise click.ClickException(f"cannot use home {home}: {exc.strerror}; choose another --home") from None
    except ValueError as exc:
        raise click.ClickException(f"home {home} is damaged: {exc}") from None


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
@click.option("--direct-io/--no-direct-io", default=False, show_default=True,
              help="Bypass the kernel page cache for every open (O_DIRECT opens always bypass it).")
@click.option("--allow-other/--no-allow-other", default=None,
              help="Let other users (e.g. qemu's) use the mount [default: on when run as root].")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None,
              help="Serve Prometheus metrics on 127.0.0.1:PORT.")
@click.option("--chunk-size", type=click.Choice(list(CHUNK_SIZES)), default=None,
              help=f"Chunk size of files created by this node [default: {DEFAULT_CHUNK_SIZE // 1024}K]; "
                   "existing files keep theirs. See docs/chunking.md.")
@click.option("--cache-size", metavar="SIZE", default=None,
              help="Byte budget of the chunk cache, e.g. 20G [default: 10G, kept once set]. Fetched chunks "
                   "beyond it are evicted, least recently used first; pinned images and data written here never.")
@click.option("--fetch-timeout", type=click.FloatRange(0.5, 3600), default=20.0, show_default=True,
              metavar="SECONDS", help="How long a read waits for peers to serve a chunk before failing with EIO.")
@click.option("--copies", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Replication factor of files without user.blixfs.copies: how many nodes hold each whole.")
@click.option("--gc-interval", type=click.FloatRange(1), default=600.0, show_default=True, metavar="SECONDS",
              help="How often unreferenced chunks are collected.")
@click.option("--gc-grace", type=click.FloatRange(0), default=DEFAULT_GRACE_SECONDS, show_default=True,
              metavar="SECONDS", help="Unreferenced chunks used more recently than this are kept.")
@click.option("--peer-expiry", type=click.FloatRange(10), default=3600.0, show_default=True, metavar="SECONDS",
              help="Peers unreachable and unseen this long leave the peer list.")
@click.option("--publish-interval", type=click.FloatRange(0.1, 86400), default=PUBLISH_INTERVAL, show_default=True,
              metavar="SECONDS", help="How long a file kept open (a running VM's image) may hold fsync'd writes that "
                                      "peers do not see yet; closing it or `blixfs commit` publishes at once.")
@click.option("--mdns/--no-mdns", default=True, show_default=True,
              help="Find nodes of this namespace on the LAN (mDNS), on the interfaces of --listen.")
@click.option("--mdns-interface", "mdns_interfaces", multiple=True, metavar="NAME|IP",
              help="Announce and listen on this interface only (repeatable) [default: those of --listen; "
                   "none for 127.0.0.1].")
@click.option("--internet/--offline", default=False, show_default=True,
              help="Internet mode: iroh's n0 relays and DNS discovery, so nodes behind NAT reach each other "
                   "(use with --listen 0.0.0.0:PORT). Offline (default): direct addresses only.")
@click.option("--listen", metavar="IP:PORT", default=None,
              help="Where peers reach this node [default: 127.0.0.1 and a port chosen once and kept, "
                   "so tickets stay valid]. Use 0.0.0.0:PORT to serve other hosts.")
@click.option("--dashboard", "dashboard", metavar="[ADDR:]PORT", default=None,
              help="Serve the dashboard (overview, transfers, topology, images; JSON under /api/) on "
                   "ADDR:PORT [ADDR default 127.0.0.1]. `blixfs dashboard` prints its address.")
@click.option("--max-upload", metavar="RATE", default=None,
              help="Serve peers at most RATE bytes/s, e.g. 20M, 500K, 1G (decimal units; default: no limit). "
                   "Demand reads are served first. Changeable while running: blixfs limit.")
@click.option("--max-background", metavar="RATE", default=None,
              help="Fetch at most RATE bytes/s for anything but reads a guest waits for (trace prefetch, "
                   "read-ahead, pulls, replication); demand reads are exempt. Changeable: blixfs limit.")
@click.option("--dashboard-public", is_flag=True,
              help="Allow --dashboard on an address that is not loopback (it shows this node's peers, "
                   "files and traffic, never keys or tickets, to whoever reaches it).")
@click.pass_context
def mount(ctx: click.Context, mountpoint: Path, direct_io: bool, allow_other: bool | None,
          dashboard: str | None, dashboard_public: bool, metrics_port: int | None, chunk_size: str | None,
          cache_size: str | None, fetch_timeout: float, copies: int, gc_interval: float, gc_grace: float,
          peer_expiry: float, publish_interval: float, mdns: bool,
          mdns_interfaces: tuple[str, ...],
          internet: bool, listen: str | None, max_upload: str | None, max_background: str | None) -> None:
    """Mount the namespace at MOUNTPOINT and serve it in the foreground until Ctrl-C or SIGTERM.

    The node syncs with the peers it joined through tickets. A stale mount left at
    MOUNTPOINT by a daemon that was killed is cleaned up first.
    """
    from blixfs.chunkstore import raise_fd_limit
    from blixfs.dashboard.server import DashboardError, parse_listen
    from mount.runner import MountError, run_mount  # pyfuse3 only where a mount is made

    raise_fd_limit()  # before the store opens: it keeps chunk files open for range reads
    rates = {"max_upload": _rate_option(max_upload, "--max-upload"),
             "max_background": _rate_option(max_background, "--max-background")}

    try:
        dashboard_at = parse_listen(dashboard, public=dashboard_public) if dashboard is not None else None
    except DashboardError as exc:
        raise click.BadParameter(str(exc), param_hint="--dashboard") from None
    node = _open_node(ctx, lock=True)
    try:
        if listen is not None:
            node.set_listen_addr(listen)
        if cache_size is not None:
            node.set_cache_size(_parse_size(cache_size))
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr="127.0.0.1")
        keys = node.replica.keys
        log.info("node %s, namespace %s (%s), home %s", node.node_id.hex(), keys.id.hex(),
                 "read-write" if keys.writable else "read-only", node.home)
        vfs = node.vfs(chunk_size=CHUNK_SIZES[chunk_size] if chunk_size else DEFAULT_CHUNK_SIZE)
        run_mount(node, vfs, mountpoint.expanduser().absolute(), direct_io=direct_io, allow_other=allow_other,
                  fetch_timeout=fetch_timeout, copies=copies, gc_interval=gc_interval, gc_grace=gc_grace,
                  internet=internet, mdns=mdns, mdns_interfaces=list(mdns_interfaces) or None,
                  peer_expiry=peer_expiry, publish_interval=publish_interval, dashboard=dashboard_at, **rates)
    except MountError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        node.close()


@main.command()
@click.option("--write", is_flag=True, help="Grant write capability (the namespace secret: share it with care).")
@click.option("--id-only", is_flag=True, help="Leave this node's addresses out: nodes on the same LAN find each "
                                              "other by mDNS (or iroh's DNS discovery in --internet mode).")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the ticket to this file (mode 0600) instead of standard output: a write ticket "
                   "is a secret, and a file keeps it out of terminals and logs. Give it to `blixfs join "
                   "--ticket-file`.")
@click.pass_context
def share(ctx: click.Context, write: bool, id_only: bool, output: Path | None) -> None:
    """Print a ticket for this node's namespace, alone on the last line of standard output.

    Without --write the ticket grants read capability only. Another node joins with
    `blixfs join TICKET` (or `blixfs join --ticket-file FILE` for a write ticket).
    """
    node = _open_node(ctx, lock=False)
    try:
        keys = node.replica.keys
        if write and not keys.writable:
            raise click.ClickException("this node holds a read-only capability: it cannot share write access")
        addr, live = _own_addr(node)
        if id_only:
            addr = NodeAddr(addr.node_id)
        ticket = Ticket(NamespaceKeys(keys.id, keys.secret if write else None), addr)
        click.echo(f"namespace {keys.id.hex()} ({'read-write' if write else 'read-only'} ticket), "
                   f"node {addr}" + ("" if live else " (not running: mount it so the ticket can be used)"))
        _emit_ticket(ticket, output)
    finally:
        node.close()


def _own_addr(node: Node) -> tuple[NodeAddr, bool]:
    """This node's address (the running daemon's, else the kept listen address) and whether it runs."""
    live = ask_daemon(node.home, {"op": "addr"})
    if live and live.get("ok"):
        return NodeAddr.parse(live["addr"]), True
    return NodeAddr(node.node_id.hex(), (node.listen_addr(),)), False


def _emit_ticket(ticket: Ticket, output: Path | None) -> None:
    """The ticket on the last line of standard output, or in ``output`` created with mode 0600
    (an existing file is truncated and set to 0600 before the secret is written)."""
    text = ticket.encode()
    if output is None:
        click.echo(text)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(text + "\n")
    except OSError as exc:
        raise click.ClickException(f"cannot write the ticket to {output}: {exc.strerror}") from None
    click.echo(f"ticket written to {output} (mode 0600)")


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def _read_ticket(ticket: str | None, ticket_file: Path | None) -> str:
    """The ticket text from the argument, ``-`` or no argument (standard input, when it is not a
    terminal) or --ticket-file; a usage error otherwise."""
    if ticket is not None and ticket_file is not None:
        raise click.UsageError("give the ticket either as an argument or with --ticket-file, not both")
    try:
        if ticket_file is not None:
            return ticket_file.read_text()
    except OSError as exc:
        raise click.ClickException(f"cannot read {ticket_file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise click.ClickException(f"{ticket_file} is not a ticket") from None
    if ticket == "-" or (ticket is None and not _stdin_is_terminal()):
        return sys.stdin.readline()
    if ticket is None:
        raise click.UsageError("no ticket: give TICKET, --ticket-file FILE, or pipe it in (blixfs join - < FILE)")
    return ticket


@main.command()
@click.argument("ticket", required=False)
@click.option("--ticket-file", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Read the ticket from this file (e.g. written by `blixfs share --write --output`).")
@click.pass_context
def join(ctx: click.Context, ticket: str | None, ticket_file: Path | None) -> None:
    """Join the namespace of TICKET (from `blixfs share`) and sync with the node that shared it.

    TICKET may be given as an argument, as `-` or left out to read it from standard input
    (when that is not a terminal), or with --ticket-file FILE. A write ticket holds the
    namespace secret: on the command line it is visible to every user of this machine
    (the process list, /proc/PID/cmdline) and stays in the shell's history, so pass a write
    ticket through a file or standard input.

    A fresh home adopts the ticket's namespace; a running daemon starts syncing at once,
    otherwise the next `blixfs mount` does. A ticket bound to another node (from `blixfs
    allow`) is refused.
    """
    text = _read_ticket(ticket, ticket_file).strip()
    try:
        parsed = Ticket.decode(text)
    except TicketError as exc:
        raise click.ClickException(f"bad ticket: {exc}") from None
    home: Path = ctx.obj["home"]
    reply = ask_daemon(home, {"op": "join", "ticket": text})
    if reply is not None:
        if not reply.get("ok"):
            raise click.ClickException(str(reply.get("error")))
        click.echo(reply["message"])
        return
    node = _open_node(ctx, lock=True)
    try:
        click.echo(node.join(parsed))
    except JoinError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        node.close()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def members(ctx: click.Context, as_json: bool) -> None:
    """List the namespace's members: node id, role (read, write, admin, or revoked), who set it.

    A namespace without a list is open: any node that knows its id syncs, any node with its
    secret writes. `blixfs allow THIS-NODE --role admin` closes it.
    """
    node = _open_node(ctx, lock=False)
    try:
        listed = node.replica.members.members()
    finally:
        node.close()
    rows = [member_report(m.record) for m in listed]
    if as_json:
        click.echo(json.dumps({"closed": bool(rows), "members": rows}, indent=2))
        return
    if not rows:
        click.echo("open namespace: no member list (blixfs allow THIS-NODE --role admin closes it)")
        return
    for r in rows:
        click.echo(f"{r['node']}  {r['role']:7}  set by {str(r['set_by'])[:16]}")


def _change_member(ctx: click.Context, node_id: str, role: Role | None) -> dict[str, Any]:
    """Grant or revoke through the running daemon (it signs and tells its peers at once), or
    on the home when no daemon runs (peers learn it at the next mount)."""
    try:
        nid = parse_node_id(node_id)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NODE") from None
    request: dict[str, Any] = {"op": "allow" if role is not None else "revoke", "node": nid.hex()}
    if role is not None:
        request["role"] = role.label
    reply = ask_daemon(ctx.obj["home"], request)
    if reply is not None:
        if not reply.get("ok"):
            raise click.ClickException(str(reply.get("error")))
        member: dict[str, Any] = reply["member"]
        return member
    node = _open_node(ctx, lock=True)
    try:
        return member_report(node.replica.set_member(nid, role))
    except FsError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        node.close()


@main.command()
@click.argument("node_id", metavar="NODE")
@click.option("--role", type=click.Choice(["read", "write", "admin"]), required=True,
              help="read: sync and fetch; write: also write and ask others to hold copies; admin: also "
                   "change this list.")
@click.option("--ticket/--no-ticket", default=True, show_default=True,
              help="Print a ticket bound to NODE (only NODE can join with it): a write ticket for write "
                   "and admin, a read-only one for read.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write that ticket to this file (mode 0600) instead of standard output.")
@click.pass_context
def allow(ctx: click.Context, node_id: str, role: str, ticket: bool, output: Path | None) -> None:
    """Add NODE (its 64-hex node id, from `blixfs status` on it) to the member list with a role.

    This node must be an admin of the list, or the namespace must be open and NODE this
    node itself: `blixfs allow THIS-NODE --role admin` closes an open namespace. In a
    closed namespace only listed nodes sync, fetch, serve and hold copies, and only write
    and admin members' entries are accepted.
    """
    parsed = Role.parse(role)
    report = _change_member(ctx, node_id, parsed)
    click.echo(f"{report['node']} is now {report['role']}")
    if not ticket:
        return
    node = _open_node(ctx, lock=False)
    try:
        keys = node.replica.keys
        write = parsed >= Role.WRITE and keys.writable
        addr, _ = _own_addr(node)
        bound = Ticket(NamespaceKeys(keys.id, keys.secret if write else None), addr, bound=parse_node_id(node_id))
    finally:
        node.close()
    click.echo(f"{'read-write' if write else 'read-only'} ticket for node {report['node'][:16]} only:")
    _emit_ticket(bound, output)


@main.command()
@click.argument("node_id", metavar="NODE")
@click.pass_context
def revoke(ctx: click.Context, node_id: str) -> None:
    """Remove NODE from the member list: every member that learns it stops syncing with NODE,
    serving it, fetching from it and holding copies for it, and refuses entries NODE writes
    from then on (NODE may still hold the namespace secret: it is refused by its node id).
    The last admin cannot be revoked."""
    report = _change_member(ctx, node_id, None)
    click.echo(f"{report['node']} is revoked")


def _namespace_path(path: str) -> str:
    """A path inside a blixfs mount (absolute) or a namespace path, as a namespace path."""
    if os.path.isabs(path) and os.path.exists(path):
        real = os.path.realpath(path)
        root = real
        while os.path.dirname(root) != root and os.stat(os.path.dirname(root)).st_dev == os.stat(real).st_dev:
            root = os.path.dirname(root)
        return os.path.relpath(real, root) if real != root else ""
    return path.strip("/")


def _rate_option(text: str | None, name: str) -> int | None:
    """A RATE option's bytes/s (None: no limit), or a usage error naming the option."""
    from blixfs.limits import RateError, parse_rate

    try:
        return parse_rate(text)
    except RateError as exc:
        raise click.BadParameter(str(exc), param_hint=name) from None


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "")
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 512M or 20G") from None
    if value <= 0:
        raise click.BadParameter("the size must be positive")
    return value


@main.command()
@click.argument("path")
@click.option("--priority", type=click.Choice(["demand", "trace", "ahead", "background"]), default="background",
              show_default=True, help="Transfer class of the pull's fetches: background goes after every read a "
                                      "guest waits for and under --max-background; demand competes with them.")
@click.option("--trace", "trace", is_flag=True,
              help="Fetch only the chunks of PATH's access trace (what its boots read), in trace order: warms a "
                   "host before VMs are scheduled there.")
@click.pass_context
def pull(ctx: click.Context, path: str, priority: str, trace: bool) -> None:
    """Fetch a whole image from peers now (prefetch), with a progress bar.

    PATH is a file in the mount (e.g. /mnt/images/ubuntu.qcow2) or a namespace path.
    The daemon must be running (blixfs mount).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

    rel = _namespace_path(path)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), transient=True) as bar:
        task = bar.add_task(rel, total=None)

        def on_progress(update: dict[str, Any]) -> None:
            bar.update(task, completed=update["done"], total=update["total"])

        request: dict[str, Any] = {"op": "pull", "path": rel, "priority": priority}
        if trace:
            request["trace"] = True
        reply = ask_daemon(ctx.obj["home"], request, timeout=None, on_progress=on_progress)
    if reply is None:
        raise click.ClickException("no daemon is running for this home: start it with blixfs mount DIR")
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    seconds = max(reply["seconds"], 1e-6)
    peers = ", ".join(f"{p} ({_human(b)})" for p, b in reply["peers"].items()) or "none (already held here)"
    what = f" (trace: {reply['chunks']} chunks)" if "chunks" in reply else ""
    click.echo(f"pulled {reply['path']}{what}: {_human(reply['bytes'])} fetched of {_human(reply['total'])} in "
               f"{reply['seconds']:.2f} s ({_human(reply['bytes'] / seconds)}/s) from {peers}")


@main.command()
@click.option("--max-upload", metavar="RATE", default=None,
              help="Serve peers at most RATE bytes/s (20M, 500K, 1G; off: no limit).")
@click.option("--max-background", metavar="RATE", default=None,
              help="Fetch at most RATE bytes/s for anything but demand reads (off: no limit).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def limit(ctx: click.Context, max_upload: str | None, max_background: str | None, as_json: bool) -> None:
    """Show or change the running daemon's bandwidth limits.

    Without options, prints them. RATE is bytes per second with decimal units (20M is
    20,000,000 bytes/s); "off" removes a limit. A limit not given is left as it is. The
    change lasts until the daemon stops (blixfs mount --max-upload/--max-background set
    them at start).
    """
    from blixfs.limits import format_rate

    request: dict[str, Any] = {"op": "limits"}
    for name, text, option in (("max_upload", max_upload, "--max-upload"),
                               ("max_background", max_background, "--max-background")):
        if text is not None:
            request[name] = _rate_option(text, option) or 0
    reply = ask_daemon(ctx.obj["home"], request)
    if reply is None:
        raise click.ClickException("no daemon is running for this home: start it with blixfs mount DIR")
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    if as_json:
        click.echo(json.dumps({"max_upload": reply["max_upload"], "max_background": reply["max_background"]}))
        return
    click.echo(f"max-upload      {format_rate(reply['max_upload'])}" + ("/s" if reply["max_upload"] else ""))
    click.echo(f"max-background  {format_rate(reply['max_background'])}" + ("/s" if reply["max_background"] else ""))


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def trace(ctx: click.Context, path: str, as_json: bool) -> None:
    """Show PATH's access trace: the chunks its boots read first, in the order a cold node
    fetches them (merged from every writer's record, mapped onto the current version).

    The daemon must be running (blixfs mount).
    """
    rel = _namespace_path(path)
    reply = ask_daemon(ctx.obj["home"], {"op": "trace", "path": rel}, timeout=None)
    if reply is None:
        raise click.ClickException("no daemon is running for this home: start it with blixfs mount DIR")
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    if as_json:
        click.echo(json.dumps({k: v for k, v in reply.items() if k != "ok"}, indent=2))
        return
    chunks = reply["chunks"]
    size = len(chunks) * int(reply.get("chunk_size", 0))
    head = " ".join(str(i) for i in chunks[:16]) + (" ..." if len(chunks) > 16 else "")
    click.echo(f"{reply['path']}: {reply['records']} records, {len(chunks)} chunks (~{_human(size)})"
               + (f" in order: {head}" if chunks else ""))


@main.command()
@click.argument("path")
@click.pass_context
def commit(ctx: click.Context, path: str) -> None:
    """Publish PATH's latest writes to peers now, durably.

    A file kept open (a running VM's image) is made durable by each fsync through this
    node's journal, and published (made visible to peers as a new version) when it is
    closed and every --publish-interval. This publishes it now, e.g. before another
    node starts from the image. PATH is a file in the mount or a namespace path; the
    daemon must be running (blixfs mount).
    """
    rel = _namespace_path(path)
    reply = ask_daemon(ctx.obj["home"], {"op": "commit", "path": rel}, timeout=None)
    if reply is None:
        raise click.ClickException("no daemon is running for this home: start it with blixfs mount DIR")
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    if reply["published"]:
        click.echo(f"published {rel}")
    else:
        click.echo(f"{rel}: nothing to publish (no writes since its last version)")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh every second until Ctrl-C.")
@click.pass_context
def peers(ctx: click.Context, as_json: bool, watch: bool) -> None:
    """Show peers: state (connected/degraded/unreachable, why), RTT, loss, last seen, how found,
    figures measured on transfers, and what they hold."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    def fetch() -> list[dict[str, Any]]:
        reply = ask_daemon(ctx.obj["home"], {"op": "peers"})
        if reply is None:
            raise click.ClickException("no daemon is running for this home: start it with blixfs mount DIR")
        rows: list[dict[str, Any]] = reply["peers"]
        return rows

    def table(rows: list[dict[str, Any]]) -> Table:
        t = Table("peer", "address", "state", "rtt", "loss", "last seen", "found by", "session", "chunk latency",
                  "throughput", "received", "in flight", "failures", "holds", box=None)
        for r in rows:
            state = r["state"] + (f" ({r['reason'][:40]})" if r["reason"] else "")
            t.add_row(r["id"][:16], ",".join(r["addrs"]) or "-", state,
                      f"{r['rtt_ms']} ms" if r["rtt_ms"] is not None else "-", f"{r['loss']:.1%}",
                      f"{r['last_seen_s']} s ago" if r["last_seen_s"] is not None else "never", r["found_by"],
                      r["session"],
                      f"{r['latency_ms']} ms" if r["latency_ms"] is not None else "-",
                      f"{r['throughput_mbs']} MB/s" if r["throughput_mbs"] is not None else "-",
                      _human(r["bytes_received"]), str(r["inflight"]),
                      f"{r['failures']}" + (f" (penalised {r['penalised_s']} s)" if r["penalised_s"] else ""),
                      f"{r['holds_complete']} whole, {r['holds_partial']} part")
        return t

    if as_json:
        click.echo(json.dumps(fetch(), indent=2))
        return
    if not watch:
        Console(width=None if sys.stdout.isatty() else 220).print(table(fetch()))
        return
    import time

    with Live(table(fetch()), refresh_per_second=2) as live:
        try:
            while True:
                time.sleep(1)
                live.update(table(fetch()))
        except KeyboardInterrupt:
            pass


@main.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False))
@click.option("--copies", type=click.IntRange(1, 16), required=True, help="How many nodes must hold it whole.")
def replicate(path: str, copies: int) -> None:
    """Set how many nodes must hold PATH (a file in a blixfs mount) whole; replication follows.

    The same as: setfattr -n user.blixfs.copies -v N PATH. Watch it with blixfs status.
    """
    try:
        os.setxattr(path, "user.blixfs.copies", str(copies).encode())
    except OSError as exc:
        raise click.ClickException(f"cannot set copies on {path}: {exc.strerror} (is it in a blixfs mount?)") from None
    click.echo(f"{path}: {copies} copies wanted")


@main.command()
@click.argument("path")
@click.pass_context
def pin(ctx: click.Context, path: str) -> None:
    """Never evict PATH's content from this node's cache (use blixfs pull to fetch it first)."""
    node = _open_node(ctx, lock=False)
    try:
        rel = _namespace_path(path)
        if node.namespace.get(rel) is None:
            raise click.ClickException(f"no entry {rel!r} in the namespace")
        click.echo(f"pinned {rel}" if node.set_pinned(rel, True) else f"{rel} was already pinned")
    finally:
        node.close()


@main.command()
@click.argument("path")
@click.pass_context
def unpin(ctx: click.Context, path: str) -> None:
    """Let PATH's content be evicted again (least recently used first)."""
    node = _open_node(ctx, lock=False)
    try:
        rel = _namespace_path(path)
        click.echo(f"unpinned {rel}" if node.set_pinned(rel, False) else f"{rel} was not pinned")
    finally:
        node.close()


@main.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be freed.")
@click.option("--grace", metavar="SECONDS", type=click.FloatRange(0), default=DEFAULT_GRACE_SECONDS,
              show_default=True, help="Keep unreferenced chunks used more recently than this.")
@click.pass_context
def gc(ctx: click.Context, dry_run: bool, grace: float) -> None:
    """Free chunks no live file or kept conflict version references (overwritten and deleted images).

    Runs in the daemon when it is up (it fetches the manifests of live files it lacks, and
    keeps what open files use); otherwise on the stopped node.
    """
    request = {"op": "gc", "dry_run": dry_run, "grace": grace}
    reply = ask_daemon(ctx.obj["home"], request, timeout=None)
    if reply is None:
        node = _open_node(ctx, lock=True)
        try:
            reply = {"ok": True, **collect(node.namespace, node.chunks, grace_seconds=grace,
                                           dry_run=dry_run).as_dict()}
        finally:
            node.close()
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    if reply["missing_manifests"]:
        raise click.ClickException(
            f"nothing freed: the manifests of {len(reply['missing_manifests'])} live files are not held here "
            f"(e.g. {reply['missing_manifests'][0]}); run gc while the node is mounted so it can fetch them")
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {reply['freed_chunks']} chunks ({_human(reply['freed_bytes'])}); "
               f"{reply['live_chunks']} chunks are referenced, {reply['kept_recent']} unreferenced ones are "
               f"younger than the grace period")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def namespaces(ctx: click.Context, as_json: bool) -> None:
    """List the namespaces this node holds, with its capability for each."""
    node = _open_node(ctx, lock=False)
    try:
        info = node.status()["namespace"]
        rows = [{"id": info["id"], "capability": info["capability"], "files": info["files"],
                 "peers": [str(p) for p in node.peers()]}]
    finally:
        node.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        click.echo(f"{row['id']}  {row['capability']:5}  {row['files']} files  {len(row['peers'])} peers")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def images(ctx: click.Context, as_json: bool) -> None:
    """List the files of the namespace with their image metadata (user.blixfs.* xattrs)."""
    node = _open_node(ctx, lock=False)
    try:
        files = [e for e in node.namespace.entries() if not e.deleted and e.kind is Kind.FILE]
    finally:
        node.close()
    if as_json:
        click.echo(json.dumps([{"path": e.path, "size": e.size, **{k: e.meta.get(k, "") for k in IMAGE_COLUMNS}}
                               for e in files], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("path", "size", *IMAGE_COLUMNS, box=None)
    for e in files:
        table.add_row(e.path, _human(e.size), *(e.meta.get(k, "") for k in IMAGE_COLUMNS))
    Console().print(table)


@main.command()
@click.pass_context
def dashboard(ctx: click.Context) -> None:
    """Print the address of the running daemon's dashboard (started with mount --dashboard)."""
    reply = ask_daemon(ctx.obj["home"], {"op": "dashboard"})
    if reply is None:
        raise click.ClickException("no daemon is running for this home: start it with "
                                   "blixfs mount DIR --dashboard 8080")
    if not reply.get("ok"):
        raise click.ClickException(str(reply.get("error")))
    if not reply.get("url"):
        raise click.ClickException("the daemon serves no dashboard: mount with --dashboard [ADDR:]PORT")
    click.echo(reply["url"])


@main.command()
@click.argument("mountpoint", type=click.Path(file_okay=False, path_type=Path))
def unmount(mountpoint: Path) -> None:
    """Unmount a blixfs mount (also one whose daemon died)."""
    import subprocess

    from mount.runner import unmount_command

    result = subprocess.run(unmount_command(mountpoint), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise click.ClickException(f"could not unmount {mountpoint}: {result.stderr.strip()}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show this node's store, namespace, and (when the daemon runs) its peers."""
    node = _open_node(ctx, lock=False)
    try:
        info: dict[str, Any] = node.status()
    finally:
        node.close()
    live = ask_daemon(ctx.obj["home"], {"op": "status"})
    info["daemon"] = live if live and live.get("ok") else None
    if as_json and info["daemon"] is not None:
        # The dashboard's JSON, built by the same functions as its /api/ pages.
        pages = ask_daemon(ctx.obj["home"], {"op": "api", "page": "all"})
        info["dashboard"] = pages["page"] if pages and pages.get("ok") else None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    st, ns = info["store"], info["namespace"]
    click.echo(f"node       {info['node_id']}")
    click.echo(f"home       {info['home']}")
    click.echo(f"namespace  {ns['id']} ({ns['capability']})")
    click.echo(f"           {_count(ns['files'], 'file', 'files')} ({_human(ns['file_bytes'])}), "
               f"{_count(ns['directories'], 'directory', 'directories')}, "
               f"{_count(ns['symlinks'], 'symlink', 'symlinks')}")
    click.echo(f"store      {st['chunks']} chunks, {_human(st['bytes'])} (cache budget {_human(st['cache_budget'])}"
               f"{', pinned: ' + ', '.join(st['pinned']) if st['pinned'] else ''})")
    daemon = info.get("daemon")
    if daemon is None:
        click.echo("daemon     not running")
    else:
        click.echo(f"daemon     listening on {daemon['addr']}")
        f, sv = daemon["fetched"], daemon["served"]
        click.echo(f"transfers  fetched {f['chunks']} chunks ({_human(f['bytes'])}), {f['in_flight']} in flight; "
                   f"served {sv['requests']} requests ({_human(sv['bytes'])})")
        lim = daemon.get("limits")
        if lim is not None:
            from blixfs.limits import format_rate

            click.echo(f"limits     upload {format_rate(lim['max_upload'])}, background "
                       f"{format_rate(lim['max_background'])} (bytes/s); {lim['fetch_queue']} fetches and "
                       f"{lim['serve_queue']} requests to serve waiting their turn")
        for r in daemon["replication"]:
            targets = ", ".join(f"{p} {int(v * 100)}%" for p, v in r["targets"].items())
            click.echo(f"  {r['state']:11} {r['path']}  {r['copies']}/{r['want']} copies" +
                       (f"  (replicating to {targets})" if targets else ""))
        for t in daemon["files"]:
            click.echo(f"  file {t['path']}  {_human(t['bytes'])} in {t['chunks']} chunks at {t['rate_mbs']} MB/s"
                       + (f" (idle {t['idle_s']} s)" if t["idle_s"] > 2 else ""))
        for p in daemon["peer_rates"]:
            click.echo(f"  from {p['id'][:16]}  {p['throughput_mbs']} MB/s, latency {p['latency_ms']} ms, "
                       f"{_human(p['bytes_received'])} received")
        for s in daemon["sessions"]:
            click.echo(f"  peer {s['peer'][:16]}  {'synced' if s['synced'] else 'syncing'}  "
                       f"received {s['received']}  sent {s['sent']}  refused {s['refused']}")


if __name__ == "__main__":
    sys.exit(main())
