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

from blixfs.manifest import DEFAULT_CHUNK_SIZE
from blixfs.node import HomeLocked, Node, default_home

log = logging.getLogger("blixfs")
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
@click.pass_context
def mount(ctx: click.Context, mountpoint: Path, direct_io: bool, allow_other: bool | None,
          metrics_port: int | None, chunk_size: str | None) -> None:
    """Mount the namespace at MOUNTPOINT and serve it in the foreground until Ctrl-C or SIGTERM.

    A stale mount left at MOUNTPOINT by a daemon that was killed is cleaned up first.
    """
    from mount.runner import MountError, run_mount  # pyfuse3 only where a mount is made

    node = _open_node(ctx, lock=True)
    try:
        if metrics_port is not None:
            from prometheus_client import start_http_server

            start_http_server(metrics_port, addr="127.0.0.1")
        log.info("node %s, home %s", node.node_id.hex(), node.home)
        vfs = node.vfs(chunk_size=CHUNK_SIZES[chunk_size] if chunk_size else DEFAULT_CHUNK_SIZE)
        run_mount(vfs, mountpoint.expanduser().absolute(), direct_io=direct_io, allow_other=allow_other)
    except MountError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        node.close()


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
    """Show this node's store size, chunks and files."""
    node = _open_node(ctx, lock=False)
    try:
        info: dict[str, Any] = node.status()
    finally:
        node.close()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    st, ns = info["store"], info["namespace"]
    click.echo(f"node       {info['node_id']}")
    click.echo(f"home       {info['home']}")
    click.echo(f"store      {st['chunks']} chunks, {_human(st['bytes'])}")
    click.echo(f"namespace  {ns['files']} files ({_human(ns['file_bytes'])}), {ns['directories']} directories, "
               f"{ns['symlinks']} symlinks")


if __name__ == "__main__":
    sys.exit(main())
