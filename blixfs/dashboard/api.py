"""The dashboard's JSON: one function per page, shared by ``/api/<page>`` and ``blixfs status --json``.

`DashboardApi(runtime)` builds ``overview``, ``transfers``, ``topology`` and ``images``
from the running daemon's state (`blixfs.daemon.Runtime`: peer book, holdings,
replicator, fetcher, chunk server, `blixfs.analytics.Analytics`). Synchronous, on the
trio thread, no network and no waiting; bounded whatever the namespace holds: the file
list is read from the namespace at most once every `FILES_TTL` seconds and at most
`MAX_FILES` files are listed, at most `MAX_ROWS` rows in every other list.

Never in it: keys, tickets, capabilities. The namespace is shown by a short prefix of
its id (the full id lets anyone sync an open namespace: it is a read capability there),
its capability by kind only ("read-write" / "read-only"). Node ids and addresses are
public (every peer sees them) and are shown.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from blixfs.entry import IMAGE_META_KEYS, Entry, Kind

if TYPE_CHECKING:
    from blixfs.daemon import Runtime

PAGES = ("overview", "transfers", "topology", "images")
FILES_TTL = 5.0
MAX_FILES = 500
MAX_ROWS = 50
NAMESPACE_PREFIX = 16  # hex digits of the namespace id shown


def _holding(record_complete: set[bytes], partial: dict[bytes, bytearray], mid: bytes, chunks: int | None) -> float:
    """Fraction of version ``mid`` a holdings record says it holds (0.0: none)."""
    if mid in record_complete:
        return 1.0
    bits = partial.get(mid)
    if bits is None:
        return 0.0
    held = int.from_bytes(bits, "big").bit_count()  # C speed: a 1 TiB image's bitmap is 512 KiB
    total = chunks if chunks else len(bits) * 8
    return round(min(1.0, held / max(total, 1)), 3)


class DashboardApi:
    """See the module docstring."""

    def __init__(self, runtime: Runtime) -> None:
        self.rt = runtime
        self._files: list[Entry] = []
        self._files_total = 0
        self._files_at = -FILES_TTL

    def page(self, name: str) -> dict[str, Any]:
        """The JSON of page ``name`` (one of `PAGES`); KeyError for another name."""
        builders = {"overview": self.overview, "transfers": self.transfers, "topology": self.topology,
                    "images": self.images}
        return builders[name]()

    def all(self) -> dict[str, Any]:
        return {name: self.page(name) for name in PAGES}

    # ------------------------------------------------------------------ shared parts

    def files(self) -> list[Entry]:
        """Live files of the namespace (at most `MAX_FILES`, by path), re-read every `FILES_TTL` s."""
        now = time.monotonic()
        if now - self._files_at >= FILES_TTL:
            files: list[Entry] = []
            total = 0
            for e in self.rt.node.namespace.entries():
                if e.deleted or e.kind is not Kind.FILE:
                    continue
                total += 1
                if len(files) < MAX_FILES:
                    files.append(e)
            self._files, self._files_total, self._files_at = sorted(files, key=lambda e: e.path), total, now
        return self._files

    def _chunks(self, mid: bytes) -> int | None:
        m = self.rt.content.cached_manifest(mid)
        return len(m.ids) if m is not None else None

    def holders(self, e: Entry) -> list[dict[str, Any]]:
        """Every node the holdings say holds ``e``'s version, whole (1.0) or in part, this node first."""
        if e.manifest is None:
            return []
        chunks = self._chunks(e.manifest)
        found: list[tuple[bool, float, str]] = []
        for node_id, record in self.rt.holdings.nodes.items():
            frac = _holding(record.complete, record.partial, e.manifest, chunks)
            if frac > 0:
                found.append((node_id != self.rt.holdings.self_id, -frac, node_id))
        return [{"id": node_id, "self": not other, "fraction": -neg}
                for other, neg, node_id in sorted(found)[:MAX_ROWS]]

    # ------------------------------------------------------------------ pages

    def overview(self) -> dict[str, Any]:
        rt = self.rt
        node, store = rt.node, rt.node.chunks
        keys = node.replica.keys
        budget = node.cache_size()
        used = store.total_bytes
        peers = rt.peers_report()
        states: dict[str, int] = {}
        for p in peers:
            states[p["state"]] = states.get(p["state"], 0) + 1
        replication = rt.replicator.report() if rt.replicator is not None else []
        not_durable = [r for r in replication if r["state"] != "durable"]
        a = rt.analytics
        reads = misses = 0
        if a is not None:
            for img in a.images.values():
                reads += img.chunk_reads
                misses += img.misses
        warnings: list[dict[str, str]] = []
        if used > budget:
            warnings.append({"kind": "over-budget", "text": f"the store holds {used} bytes, over its cache budget "
                                                            f"of {budget} bytes"})
        for p in peers:
            if p["state"] == "unreachable" and p["found_by"] != "exchange":
                warnings.append({"kind": "unreachable", "peer": p["id"],
                                 "text": f"peer {p['id'][:16]} is unreachable" + (f": {p['reason']}" if p["reason"]
                                                                                  else "")})
        for r in not_durable:
            warnings.append({"kind": "not-durable", "path": str(r["path"]),
                             "text": f"{r['path']} is {r['state']}: {r['copies']} of {r['want']} copies"})
        replicas = rt.replicator.replica_bytes() if rt.replicator is not None else 0
        replica_budget = rt.replicator.replica_budget() if rt.replicator is not None else 0
        return {
            "node": {"id": node.node_id.hex(), "addr": str(rt.transport.addr()), "dashboard": rt.dashboard},
            "namespace": {"id_prefix": keys.id.hex()[:NAMESPACE_PREFIX],
                          "capability": "read-write" if keys.writable else "read-only",
                          "files": self._files_total if self._files_at > 0 else len(self.files()),
                          "closed": bool(node.replica.members.members())},
            "store": {"bytes": used, "budget": budget, "replica_bytes": replicas, "replica_budget": replica_budget},
            "cache": {"chunk_reads": reads, "misses": misses,
                      "hit_ratio": round(1 - misses / reads, 4) if reads else None},
            "totals": dict(a.totals) if a is not None else {},
            "rates": a.rates() if a is not None else [],
            "peers": {"total": len(peers), "states": states},
            "replication": {s: sum(1 for r in replication if r["state"] == s)
                            for s in ("local-only", "replicating", "durable")},
            "warnings": warnings[:MAX_ROWS],
        }

    def transfers(self) -> dict[str, Any]:
        rt, a = self.rt, self.rt.analytics
        now = time.time()
        sizes = {e.path: e for e in self.files()}
        live = []
        by_peer: dict[str, dict[str, float]] = {}
        if a is not None:
            for t in sorted(a.live.values(), key=lambda t: -t.bytes)[:MAX_ROWS]:
                rate = t.rate(now)
                e = sizes.get(t.path) or rt.node.namespace.get(t.path)
                size = e.size if e is not None else None
                frac = (_holding(rt.holdings.own.complete, rt.holdings.own.partial, e.manifest,
                                 self._chunks(e.manifest)) if e is not None and e.manifest is not None else None)
                left = ((1 - frac) * size / rate if frac is not None and size and rate > 0 else None)
                live.append({"path": t.path, "bytes": t.bytes, "chunks": t.chunks, "rate": round(rate, 1),
                             "size": size, "held_fraction": frac, "seconds_left": round(left, 1) if left else None,
                             "ahead_bytes": t.ahead_bytes, "started": round(t.started, 3),
                             "peers": dict(sorted(t.peers.items(), key=lambda kv: -kv[1])[:MAX_ROWS])})
                share = rate / t.bytes if t.bytes else 0.0
                for peer, nbytes in t.peers.items():
                    row = by_peer.setdefault(peer, {"bytes": 0, "rate": 0.0})
                    row["bytes"] += nbytes
                    row["rate"] += nbytes * share
        images = sorted(a.images.items(), key=lambda kv: -(kv[1].fetched + kv[1].bytes_read))[:MAX_ROWS] if a else []
        peers = sorted(a.peers.items(), key=lambda kv: -(kv[1].fetched + kv[1].served))[:MAX_ROWS] if a else []
        ahead = sum(i.ahead for i in a.images.values()) if a else 0
        used = sum(i.ahead_used for i in a.images.values()) if a else 0
        wasted = sum(i.ahead_wasted for i in a.images.values()) if a else 0
        return {
            "live": live,
            "live_peers": [{"id": p, "bytes": int(v["bytes"]), "rate": round(v["rate"], 1)}
                           for p, v in sorted(by_peer.items(), key=lambda kv: -kv[1]["bytes"])][:MAX_ROWS],
            "history": list(reversed(a.history))[:MAX_ROWS] if a else [],
            "top_images": [{"path": k, **v.as_dict()} for k, v in images],
            "top_peers": [{"id": k, "fetched": v.fetched, "served": v.served, "last": v.last} for k, v in peers],
            "totals": dict(a.totals) if a else {},
            "since_start": {"fetched": rt.fetcher.bytes_fetched, "served": rt.server.bytes_served},
            "read_ahead": {"fetched": ahead, "used": used, "wasted": wasted,
                           "efficiency": round(used / ahead, 4) if ahead else None},
        }

    def topology(self) -> dict[str, Any]:
        rt = self.rt
        me = rt.node.node_id.hex()
        own = rt.holdings.own
        nodes = [{"id": me, "role": "self", "state": "self", "rtt_ms": None, "addrs": list(rt.transport.addr().addrs),
                  "holds_complete": len(own.complete), "holds_partial": len(own.partial), "session": "-"}]
        links = []
        for p in rt.peers_report()[:MAX_FILES]:
            # Reached or met directly: a peer. Only heard of in relayed holdings: a peer of a peer.
            direct = p["found_by"] != "exchange" or p["last_seen_s"] is not None or p["session"] != "none"
            nodes.append({"id": p["id"], "role": "peer" if direct else "peer-of-peer", "state": p["state"],
                          "rtt_ms": p["rtt_ms"], "loss": p["loss"], "addrs": p["addrs"], "session": p["session"],
                          "found_by": p["found_by"], "holds_complete": p["holds_complete"],
                          "holds_partial": p["holds_partial"], "bytes_received": p["bytes_received"]})
            links.append({"from": me, "to": p["id"], "state": p["state"] if direct else "hearsay",
                          "rtt_ms": p["rtt_ms"], "session": p["session"]})
        images = []
        for e in self.files():
            images.append({"path": e.path, "size": e.size, "holders": self.holders(e)})
        return {"self": me, "nodes": nodes, "links": links, "images": images}

    def images(self) -> dict[str, Any]:
        rt, a = self.rt, self.rt.analytics
        states = {r["path"]: r for r in (rt.replicator.report() if rt.replicator is not None else [])}
        rows = []
        for e in self.files():
            holders = self.holders(e)
            rep = states.get(e.path)
            want = rt.replicator.copies(e) if rt.replicator is not None else None
            access = a.images.get(e.path) if a is not None else None
            rows.append({
                "path": e.path, "size": e.size, "modified": e.timestamp_ns / 1e9,
                "author": e.author.hex(), "meta": {k: v for k, v in sorted(e.meta.items()) if k in IMAGE_META_KEYS},
                "copies_wanted": want, "copies_held": sum(1 for h in holders if h["fraction"] >= 1.0),
                "state": rep["state"] if rep is not None else None, "holders": holders,
                "access": access.as_dict() if access is not None else None,
            })
        return {"images": rows, "total": self._files_total, "shown": len(rows)}
