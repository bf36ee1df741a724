"""The dashboard in a real browser: three real nodes, an image moved between them, and what
Debian's headless Chromium (driven by selenium through chromedriver) shows of it.

A writes an image; B reads it whole (a transfer from A) and C reads its first MiB (a
partial holder). B serves the dashboard; the test opens each page and asserts on what the
page shows: three nodes in the topology, the transfer with its bytes, the image's holders.
A screenshot of each page is saved under the test's tmp dir and, when BLIXFS_ARTIFACTS is
set, there too. Then B restarts: its transfer history and per-image counts are still there.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import MountedNode, visible, wait_for
from tests.helpers import MiB, sha256
from tests.multinode.test_fetch import write_random
from tests.multinode.test_replication import joined, ticket

pytestmark = pytest.mark.mounted
Factory = Callable[..., MountedNode]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SIZE = 8 * MiB


def api(node: MountedNode) -> dict[str, Any]:
    """The dashboard's JSON of every page, as `blixfs status --json` gives it."""
    pages: dict[str, Any] = json.loads(node.cli("status", "--json").stdout)["dashboard"]
    return pages


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("chromium and chromium-driver missing: run scripts/install.sh")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    """Save the whole page (the window grown to the page's height) as ``name``.png."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, max(1000, min(int(height) + 40, 4000)))
    out = tmp_path / f"dashboard-{name}.png"
    driver.save_screenshot(str(out))
    artifacts = os.environ.get("BLIXFS_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(artifacts) / out.name)
    driver.set_window_size(1400, 1000)
    return out


def open_page(driver: Any, url: str, page: str, ready: Callable[[Any], bool]) -> None:
    """Show ``page`` and wait (polling the page, generous deadline) until ``ready(driver)``."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{url}/#{page}")
    WebDriverWait(driver, 60, poll_frequency=0.2).until(
        lambda d: d.find_element("id", "main").get_attribute("data-page") == page and ready(d),
        message=f"the {page} page never showed what was expected")


def test_three_nodes_an_image_moved_and_what_the_dashboard_shows(make_node: Factory, browser: Any,
                                                                 tmp_path: Path) -> None:
    a = make_node("a", "--copies", "1")  # no replication: B's copy comes from its read only
    b = make_node("b", "--dashboard", "0", start=False)  # any free loopback port: `blixfs dashboard` says which
    b.cli("join", ticket(a))
    b.start()
    c = joined(make_node, "c", a)
    digest = write_random(a.mnt / "ubuntu.img", SIZE)
    wait_for(lambda: visible(b, "ubuntu.img", SIZE) and visible(c, "ubuntu.img", SIZE), 60, "the image on b and c")
    assert sha256(b.mnt / "ubuntu.img") == digest  # B reads it whole: a transfer from A
    with open(c.mnt / "ubuntu.img", "rb") as f:
        f.read(MiB)  # C holds part of it

    ids = {n.home.name: json.loads(n.cli("status", "--json").stdout)["node_id"] for n in (a, b, c)}

    def b_knows_everything() -> bool:
        pages = api(b)
        holders = {h["id"]: h["fraction"] for h in pages["images"]["images"][0]["holders"]} \
            if pages["images"]["images"] else {}
        return ({n["id"] for n in pages["topology"]["nodes"]} >= set(ids.values())
                and holders.get(ids["home-a"]) == 1.0 and holders.get(ids["home-b"]) == 1.0
                and 0 < holders.get(ids["home-c"], 0) < 1.0
                and any(t["path"] == "ubuntu.img" for t in pages["transfers"]["history"]))

    wait_for(b_knows_everything, 90, "b's dashboard JSON to show 3 nodes, the holders and the finished transfer",
             interval=0.5)
    url = b.cli("dashboard").stdout.strip()
    assert url.startswith("http://127.0.0.1:")

    # Topology: three nodes; with the image chosen, A and B hold it whole, C in part.
    def topology_ready(d: Any) -> bool:
        nodes = d.find_elements("css selector", "svg.graph g.node")
        holds = {n.get_attribute("data-id"): float(n.get_attribute("data-holds")) for n in nodes}
        return (len(nodes) == 3 and holds.get(ids["home-a"]) == 1.0 and holds.get(ids["home-b"]) == 1.0
                and 0 < holds.get(ids["home-c"], 0) < 1.0)

    open_page(browser, url, "topology", topology_ready)
    assert browser.find_element("css selector", "g.node.self").get_attribute("data-id") == ids["home-b"]
    text = browser.find_element("id", "main").text
    assert "holds it whole" in text and "(this node)" in text
    shots = [screenshot(browser, tmp_path, "topology")]

    # Transfers: the finished transfer of the image, with its 8 MiB, from A.
    def transfer_ready(d: Any) -> bool:
        rows = d.find_elements("css selector", 'tr[data-path="ubuntu.img"] td.hist-bytes')
        return any(r.text == "8.0 MiB" for r in rows)

    open_page(browser, url, "transfers", transfer_ready)
    main = browser.find_element("id", "main").text
    assert ids["home-a"][:12] in main  # the peer it came from
    shots.append(screenshot(browser, tmp_path, "transfers"))

    # Images: the image's holders, with copies held.
    def images_ready(d: Any) -> bool:
        chips = d.find_elements("css selector", 'tr[data-path="ubuntu.img"] td.holders .chip')
        return {ch.get_attribute("data-id") for ch in chips} == set(ids.values())

    open_page(browser, url, "images", images_ready)
    row = browser.find_element("css selector", 'tr[data-path="ubuntu.img"]')
    assert row.find_element("css selector", "td.copies").text.startswith("2 / ")
    assert "8.0 MiB" in row.text
    shots.append(screenshot(browser, tmp_path, "images"))

    open_page(browser, url, "overview",
              lambda d: "read-write" in d.find_element("id", "main").text)
    assert ids["home-b"][:12] in browser.find_element("id", "main").text
    shots.append(screenshot(browser, tmp_path, "overview"))
    assert all(p.stat().st_size > 10_000 for p in shots)

    # No secret on any page: the namespace id only by its prefix, no ticket.
    namespace = json.loads(b.cli("status", "--json").stdout)["namespace"]["id"]
    for page in ("overview", "transfers", "topology", "images"):
        browser.get(f"{url}/api/{page}")
        assert namespace not in browser.page_source

    # The history and the per-image counts outlive a restart of B.
    b.stop()
    b.start()
    pages = api(b)
    assert any(t["path"] == "ubuntu.img" and t["bytes"] == SIZE for t in pages["transfers"]["history"])
    top = {i["path"]: i for i in pages["transfers"]["top_images"]}
    assert top["ubuntu.img"]["bytes_read"] >= SIZE and top["ubuntu.img"]["fetched"] == SIZE
