"""The web view in a real browser: Playwright for Python driving the system's Chromium headless (Debian's
``chromium`` package; Playwright's own browser download is not used), against ``adapterhub ui``'s app served
by uvicorn on 127.0.0.1.

Skipped when Playwright or Chromium is missing, unless ADAPTERHUB_REQUIRE_BROWSER=1 (CI sets it: .ci/run
installs Chromium), which turns that into a failure. Screenshots go to a temporary folder, or to
ADAPTERHUB_UI_SCREENSHOTS (``make ui-screenshots`` points it at docs/img).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from ui_util import HOSTILE, build_catalog

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def _missing(reason: str):
    if os.environ.get("ADAPTERHUB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"a browser is required (ADAPTERHUB_REQUIRE_BROWSER=1) but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        _missing(f"{e.name} is not installed (pip install playwright uvicorn)")
    exe = next((p for p in CHROMIUM_PATHS if os.access(p, os.X_OK)), None) or shutil.which("chromium")
    if exe is None:
        _missing("chromium is not installed (apt-get install chromium)")
    return exe


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir, chromium):
    """The app over a small catalog, served by uvicorn in a thread; yields (base URL, refs)."""
    import uvicorn

    from adapterhub.ui.app import create_app
    from adapterhub.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("uibrowser"))
    refs = build_catalog(ws, tiny_bert_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(ws), host="127.0.0.1", port=port, log_level="warning",
                                        access_log=False))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not th.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", refs
    srv.should_exit = True
    th.join(timeout=10)
    ws.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("ADAPTERHUB_UI_SCREENSHOTS")
    p = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    p.mkdir(parents=True, exist_ok=True)
    return p


@pytest.fixture
def page(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            ctx = browser.new_context(viewport={"width": 1360, "height": 900})
            pg = ctx.new_page()
            pg.dialogs = []  # type: ignore[attr-defined]
            pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))  # type: ignore[attr-defined]
            yield pg
        finally:
            browser.close()


def test_browse_filter_lineage_compare_deployment(server, page, shots):
    url, r = server
    page.goto(url + "/")
    assert page.title() == "catalog · adapterhub"
    assert page.locator("#versions tbody tr").count() == 7
    page.screenshot(path=str(shots / "ui-catalog.png"), full_page=True)

    # filter by task
    page.select_option("#f-task", "sentiment")
    page.click("#f-apply")
    page.wait_for_url("**/?task=sentiment**")
    refs = page.locator("#versions a.ref").all_inner_texts()
    assert refs == [r["child"], r["forget"], r["mix"], r["b1"], r["a2"], r["a1"]]

    # a merge's page: the lineage SVG has the right nodes and edges
    page.click(f"#versions a.ref:text-is('{r['mix']}')")
    page.wait_for_url(f"**/v/{r['mix']}")
    svg = page.locator("#lineage svg.lineage")
    nodes = set(svg.locator(".node").evaluate_all("els => els.map(e => e.getAttribute('data-ref'))"))
    assert nodes == {r["a1"], r["a2"], r["b1"], r["mix"], r["forget"], r["child"]}
    edges = set(tuple(x) for x in svg.locator("g.edge").evaluate_all(
        "els => els.map(e => [e.dataset.child, e.dataset.parent, e.querySelector('text').textContent])"))
    assert edges == {(r["mix"], r["a2"], "merged_from w=0.7"), (r["mix"], r["b1"], "merged_from w=0.3"),
                     (r["a2"], r["a1"], "finetuned_from"), (r["forget"], r["mix"], "unlearns"),
                     (r["child"], r["mix"], "finetuned_from")}
    # the parents sit above the merge, its children below
    box = {n: svg.locator(f".node[data-ref='{n}'] rect").bounding_box() for n in nodes}
    assert box[r["a2"]]["y"] < box[r["mix"]]["y"] < box[r["child"]]["y"]
    assert box[r["a1"]]["y"] < box[r["a2"]]["y"] and box[r["b1"]]["y"] == box[r["a2"]]["y"]
    assert page.locator("#density-chart svg.bars g.bar").count() == 4
    assert page.locator("#card h1").inner_text() == "mix v1"
    page.screenshot(path=str(shots / "ui-version.png"), full_page=True)

    # clicking a parent node navigates to its page
    svg.locator(f"a.node[data-ref='{r['a2']}']").click()
    page.wait_for_url(f"**/v/{r['a2']}")
    assert page.locator("#title").inner_text().startswith(r["a2"])
    assert page.locator("#hub a").get_attribute("href") == "https://huggingface.co/alice/alpha/tree/v2"

    # compare two experts from the catalog's check boxes
    page.goto(url + "/")
    page.check(f"input[name=ref][value='{r['a2']}']")
    page.check(f"input[name=ref][value='{r['b1']}']")
    page.click("#compare-button")
    page.wait_for_url("**/compare?**")
    assert page.locator("#heatmap g.cell").count() == 4
    assert page.locator("table.diff").count() == 1
    assert page.locator("#compare-metrics tr").count() >= 2
    page.screenshot(path=str(shots / "ui-compare.png"), full_page=True)

    # a deployment's history
    page.click("header >> text=Deployments")
    page.click("#deployments a:text-is('prod')")
    page.wait_for_url("**/deployments/prod")
    assert page.locator("#history tr.event").count() == 3
    assert page.locator("#verify .ok").inner_text() == "ok"
    assert page.locator("table.unlearning td.forget").inner_text() == "class:1"
    page.screenshot(path=str(shots / "ui-deployment.png"), full_page=True)
    assert page.dialogs == []  # type: ignore[attr-defined]


def test_hostile_strings_show_as_text(server, page, shots):
    url, r = server
    page.goto(url + f"/v/{r['evil']}")
    shown = page.locator("#meta td.task").inner_text()
    assert shown == HOSTILE.replace("\x1b", "\\x1b")
    assert page.evaluate("document.scripts.length") == 0
    assert page.locator("#meta td.task *").count() == 0  # no element was made of it
    page.goto(url + "/")
    cell = page.locator("#versions td.task").filter(has_text="alert").first
    assert cell.inner_text() == HOSTILE.replace("\x1b", "\\x1b")
    # filtering by the hostile task (the form sends it back exactly as stored) finds its version
    page.select_option("#f-task", HOSTILE)
    page.click("#f-apply")
    assert page.locator("#versions a.ref").all_inner_texts() == [r["evil"]]
    page.screenshot(path=str(shots / "ui-hostile.png"), full_page=True)
    assert page.dialogs == []  # type: ignore[attr-defined]
