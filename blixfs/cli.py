"""The ``blixfs`` command line.

Every command takes ``--home DIR`` (or ``$BLIXFS_HOME``) so several nodes can
run on one machine. Errors are one line that says what to do, exit status 1;
usage errors exit 2 (click's convention).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import click

from blixfs.daemon import ask_daemon
from blixfs.entry import Kind
from blixfs.manifest import DEFAULT_CHUNK_SIZE
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
@click.option("--listen", metavar="IP:PORT", default=None,
              help="Where peers reach this node [default: 127.0.0.1 and a port chosen once and kept, "
                   "so tickets stay valid]. Use 0.0.0.0:PORT to serve other hosts.")
@click.pass_context
def mount(ctx: click.Context, mountpoint: Path, direct_io: bool, allow_other: bool | None,
          metrics_port: int | None, chunk_size: str | None, listen: str | None) -> None:
    """Mount the namespace at MOUNTPOINT and serve it in the foreground until Ctrl-C or SIGTERM.

    The node syncs with the peers it joined through tickets. A stale mount left at
    MOUNTPOINT by a daemon that was killed is cleaned up first.
    """
    from mount.runner import MountError, run_mount  # pyfuse3 only where a mount is made

    node = _open_node(ctx, lock=True)
    try:
        if listen is not None:
            node.set_listen_addr(listen)
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr="127.0.0.1")
        keys = node.replica.keys
        log.info("node %s, namespace %s (%s), home %s", node.node_id.hex(), keys.id.hex(),
                 "read-write" if keys.writable else "read-only", node.home)
        vfs = node.vfs(chunk_size=CHUNK_SIZES[chunk_size] if chunk_size else DEFAULT_CHUNK_SIZE)
        run_mount(node, vfs, mountpoint.expanduser().absolute(), direct_io=direct_io, allow_other=allow_other)
    except MountError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        node.close()


@main.command()
@click.option("--write", is_flag=True, help="Grant write capability (the namespace secret: share it with care).")
@click.pass_context
def share(ctx: click.Context, write: bool) -> None:
    """Print a ticket for this node's namespace, alone on the last line of standard output.

    Without --write the ticket grants read capability only. Another node joins with
    `blixfs join TICKET`.
    """
    node = _open_node(ctx, lock=False)
    try:
        keys = node.replica.keys
        if write and not keys.writable:
            raise click.ClickException("this node holds a read-only capability: it cannot share write access")
        live = ask_daemon(node.home, {"op": "addr"})
        addr = NodeAddr.parse(live["addr"]) if live and live.get("ok") else NodeAddr(
            node.node_id.hex(), (node.listen_addr(),))
        ticket = Ticket(NamespaceKeys(keys.id, keys.secret if write else None), addr)
        click.echo(f"namespace {keys.id.hex()} ({'read-write' if write else 'read-only'} ticket), "
                   f"node {addr}" + ("" if live else " (not running: mount it so the ticket can be used)"))
        click.echo(ticket.encode())
    finally:
        node.close()


@main.command()
@click.argument("ticket")
@click.pass_context
def join(ctx: click.Context, ticket: str) -> None:
    """Join the namespace of TICKET (from `blixfs share`) and sync with the node that shared it.

    A fresh home adopts the ticket's namespace; a running daemon starts syncing at once,
    otherwise the next `blixfs mount` does.
    """
    try:
        parsed = Ticket.decode(ticket)
    except TicketError as exc:
        raise click.ClickException(f"bad ticket: {exc}") from None
    home: Path = ctx.obj["home"]
    reply = ask_daemon(home, {"op": "join", "ticket": ticket})
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
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    st, ns = info["store"], info["namespace"]
    click.echo(f"node       {info['node_id']}")
    click.echo(f"home       {info['home']}")
    click.echo(f"namespace  {ns['id']} ({ns['capability']})")
    click.echo(f"           {ns['files']} files ({_human(ns['file_bytes'])}), {ns['directories']} directories, "
               f"{ns['symlinks']} symlinks")
    click.echo(f"store      {st['chunks']} chunks, {_human(st['bytes'])}")
    daemon = info.get("daemon")
    if daemon is None:
        click.echo("daemon     not running")
    else:
        click.echo(f"daemon     listening on {daemon['addr']}")
        for s in daemon["sessions"]:
            click.echo(f"  peer {s['peer'][:16]}  {'synced' if s['synced'] else 'syncing'}  "
                       f"received {s['received']}  sent {s['sent']}  refused {s['refused']}")


if __name__ == "__main__":
    sys.exit(main())
