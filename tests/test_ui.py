"""The web view (adapterhub.ui) through Starlette's TestClient: every page and API route, the safety
settings (Host allow-list, token, CSP, CSRF, read-only by default), hostile catalog strings, SQLite and
PostgreSQL. The browser-driven checks are in tests/test_ui_browser.py."""
from __future__ import annotations

import json
import os
import re
import stat
from urllib.parse import quote

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from click.testing import CliRunner
from starlette.testclient import TestClient

from adapterhub.cli.main import cli
from adapterhub.errors import UiError
from adapterhub.ui.app import create_app
from adapterhub.ui.pages import render_markdown
from adapterhub.ui.security import CSP, UiSettings, settings_for, write_token_file
from adapterhub.ui.svg import layout_lineage, lineage_svg
from adapterhub.workspace import Workspace
from ui_util import HOSTILE, build_catalog

ORIGIN = "http://127.0.0.1:8765"


@pytest.fixture(scope="module")
def cat(tmp_path_factory, tiny_bert_dir):
    home = tmp_path_factory.mktemp("uihome")
    ws = Workspace.open(home)
    refs = build_catalog(ws, tiny_bert_dir)
    yield ws, refs
    ws.close()


def client(ws, settings=None, **kw):
    return TestClient(create_app(ws, settings), base_url=ORIGIN, **kw)


def cli_json(ws, *args):
    r = CliRunner().invoke(cli, ["--home", str(ws.home), *args, "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


PAGES = ["/", "/?task=sentiment", "/?kind=merge", "/v/mix@1", "/v/forget@1", "/v/alpha@prod",
         "/compare?ref=alpha@2&ref=beta@1", "/deployments", "/deployments/prod", "/bases", "/hub", "/card/mix@1"]


@pytest.mark.parametrize("url", PAGES)
def test_every_page_renders_with_the_security_headers(cat, url):
    ws, _ = cat
    r = client(ws).get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-security-policy"] == CSP
    assert "script-src" not in CSP and "default-src 'none'" in CSP  # no script at all, nothing from outside
    assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
    assert "<script" not in r.text.lower()


def _refs_in(html: str) -> list[str]:
    return re.findall(r'<a class="ref" href="/v/[^"]+">([^<]+)</a>', html)


def test_catalog_filters_sort_and_pages(cat):
    ws, r = cat
    c = client(ws)
    # newest first, like `list`
    assert _refs_in(c.get("/?task=sentiment").text) == [r["child"], r["forget"], r["mix"], r["b1"], r["a2"], r["a1"]]
    assert _refs_in(c.get("/?kind=merge").text) == [r["mix"]]
    assert _refs_in(c.get("/?tag=prod").text) == [r["a2"]]
    assert _refs_in(c.get("/?q=alph").text) == [r["a2"], r["a1"]]
    assert _refs_in(c.get("/?q=ALPH").text) == [r["a2"], r["a1"]]  # any case, SQLite and PostgreSQL alike
    assert _refs_in(c.get("/?q=%25").text) == []  # LIKE wildcards are matched literally
    assert _refs_in(c.get("/?base=tiny&kind=unlearning").text) == [r["forget"]]
    # sortable metric column: current figures (alpha@2's latest full row is 0.87), versions without it last
    html = c.get("/?sort=test_accuracy&desc=1&task=sentiment").text
    assert _refs_in(html) == [r["a2"], r["a1"], r["mix"], r["b1"], r["child"], r["forget"]]
    assert "0.87" in html and 'class="num metric-col"' in html
    asc = _refs_in(c.get("/?sort=test_accuracy&task=sentiment").text)
    assert asc[:4] == [r["b1"], r["mix"], r["a1"], r["a2"]]
    # pages of 25: 7 versions on one page; ?page=2 is empty
    assert "page 1 of 1" in c.get("/?per_page=25").text
    assert _refs_in(c.get("/?per_page=25&page=2").text) == []
    assert c.get("/?per_page=7").status_code == 400 and c.get("/?page=x").status_code == 400
    assert c.get("/?kind=bogus").status_code == 400


def test_deprecated_versions_only_on_request(cat):
    ws, r = cat
    c = client(ws)
    ws.deprecate(r["child"])
    try:
        assert r["child"] not in _refs_in(c.get("/").text)
        html = c.get("/?all=1").text
        assert r["child"] in _refs_in(html) and f'{r["child"]}</a> <span class="note">deprecated</span>' in html
        assert "deprecated too" in html and "7 versions" in html and "6 versions" in c.get("/").text
        assert [v["ref"] for v in c.get("/api/versions?all=1").json()] == [v["ref"] for v in cli_json(ws, "list", "--all")]
    finally:
        ws.deprecate(r["child"], undo=True)


def test_api_pages_walk_the_list_order(cat):
    ws, _ = cat
    # the API's limit/offset pages, put together, are `list --json` (same order, nothing twice or missing)
    everything = [v["ref"] for v in cli_json(ws, "list")]
    c = client(ws)
    got = [v["ref"] for off in range(0, len(everything), 3)
           for v in c.get(f"/api/versions?limit=3&offset={off}").json()]
    assert got == everything


def test_version_page_lineage_svg_mask_metrics_card(cat):
    ws, r = cat
    html = client(ws).get(f"/v/{r['mix']}").text
    nodes = set(re.findall(r'class="node[^"]*" data-ref="([^"]+)"', html))
    assert nodes == {r["a1"], r["a2"], r["b1"], r["mix"], r["forget"], r["child"]}
    edges = set(re.findall(r'<g class="edge" data-child="([^"]+)" data-parent="([^"]+)" data-relation="([^"]+)">'
                           r'<line[^>]*/><text[^>]*>([^<]+)</text>', html))
    assert edges == {(r["mix"], r["a2"], "merged_from", "merged_from w=0.7"),
                     (r["mix"], r["b1"], "merged_from", "merged_from w=0.3"),
                     (r["a2"], r["a1"], "finetuned_from", "finetuned_from"),
                     (r["forget"], r["mix"], "unlearns", "unlearns"),
                     (r["child"], r["mix"], "finetuned_from", "finetuned_from")}
    # every other node links to its page; the root does not link to itself
    assert '<a href="/v/alpha@2" class="node" data-ref="alpha@2">' in html
    assert 'class="node root" data-ref="mix@1"' in html
    # per-tensor density from the file's shapes: make_adapter keeps round(0.1 * numel) entries
    info = ws.resolve(r["mix"])
    for name, nnz in info.nnz_per_param.items():
        assert f'<td class="mono">{name}</td>' in html and f"{100 * nnz / 1024:.4g}%" in html or "64×32" in html
    assert "32×32" in html and "10%" in html
    # card preview: the README push writes, rendered (headings, tables), front matter dropped
    assert '<div class="card-preview" id="card"><h1>mix v1</h1>' in html and "base_model_relation" not in html
    assert "merged_from" in html and "<table>" in html
    # metric history with the shown row marked
    hist = client(ws).get(f"/v/{r['a2']}").text
    assert re.search(r"<td>test_accuracy</td><td class=\"num\">0.86</td>.*?<td></td></tr>", hist)
    assert re.search(r"<td>test_accuracy</td><td class=\"num\">0.87</td>.*?<td>exact</td>.*?<td>\*</td></tr>", hist)
    # Hub coordinates link out; tags shown
    assert 'href="https://huggingface.co/alice/alpha/tree/v2" rel="noopener noreferrer"' in hist
    assert '<span class="tag">prod</span>' in hist
    dl = client(ws).get(f"/download/{r['mix']}")
    assert dl.content == ws.adapter_bytes(r["mix"]) and "attachment" in dl.headers["content-disposition"]


def test_lineage_layout_is_depth_and_width_limited():
    chain = [{"child": f"c@{i}", "parent": f"c@{i + 1}", "relation": "finetuned_from", "weight": None,
              "params": None, "depth": i} for i in range(1, 20)]
    lay = layout_lineage("c@1", chain, [], max_depth=4)
    assert sorted(lay.nodes) == ["c@1", "c@2", "c@3", "c@4", "c@5"] and lay.hidden_edges == 15
    assert [lay.nodes[f"c@{i}"].layer for i in range(1, 6)] == [0, -1, -2, -3, -4]
    wide = [{"child": "m@1", "parent": f"e{i}@1", "relation": "merged_from", "weight": 0.01, "params": None,
             "depth": 1} for i in range(40)]
    lay = layout_lineage("m@1", wide, [], max_per_layer=12)
    assert len([k for k in lay.nodes if lay.nodes[k].layer == -1]) == 12 and lay.hidden_nodes == 29
    assert len(lay.edges) == 11 and lay.hidden_edges == 29
    svg = lineage_svg("m@1", wide, [], href=lambda ref: "/v/" + ref)
    assert svg.count('<g class="edge"') == 11 and "+29 more" in svg and "29 more edge(s) not drawn" in svg


def test_lineage_query_depth_limit(cat):
    ws, r = cat
    assert {e["depth"] for e in ws.lineage(r["mix"])} == {1, 2}
    assert [(e["child"], e["parent"]) for e in ws.lineage(r["mix"], max_depth=1)] == [(r["mix"], r["a2"]),
                                                                                      (r["mix"], r["b1"])]
    with pytest.raises(Exception, match="max_depth"):
        ws.lineage(r["mix"], max_depth=0)


def test_compare_heatmap_is_the_diff(cat):
    ws, r = cat
    from adapterhub.views.diff import diff_versions

    html = client(ws).get(f"/compare?ref={r['a2']}&ref={r['b1']}&ref={r['mix']}").text
    cells = [float(x) for x in re.findall(r'<g class="cell" data-value="([0-9.]+)">', html)]
    pairs = [(r["a2"], r["b1"]), (r["a2"], r["mix"]), (r["b1"], r["mix"])]
    diffs = [diff_versions(ws, a, b) for a, b in pairs]
    tensors = sorted(p.name for p in diffs[0].params)
    want = [next(p.jaccard for p in d.params if p.name == t) for t in tensors for d in diffs]
    assert cells == pytest.approx(want, abs=1e-6)
    assert html.count('<table class="diff">') == 3
    assert f"{diffs[0].jaccard:.4g}" in html
    assert client(ws).get(f"/compare?ref={r['a2']}").status_code == 400
    assert client(ws).get(f"/compare?ref={r['a2']}&ref=nope@1").status_code == 404


def test_deployment_page_history_verify_unlearning(cat):
    ws, r = cat
    from adapterhub.apply import deployments

    html = client(ws).get("/deployments/prod").text
    events = deployments.history(ws, "prod")
    assert [e.action for e in events] == ["create", "apply", "apply"]
    fps = re.findall(r'<td class="mono fingerprint">(blake3:[0-9a-f]{16})(?: \(derived\))?</td>', html)
    assert fps == [e.state[:23] for e in events] and len(set(fps)) == 3
    assert '<span class="ok">ok</span>' in html
    # the unlearning version in the stack: forget spec and before/after figures, read from its metrics
    assert '<td colspan="2" class="forget">class:1</td>' in html
    assert "<th class=\"num\">before (global)</th>" in html
    for name, after, before in (("RA", "0.77", "0.79"), ("FA", "0.12", "0.81"), ("MIA", "0.51", "0.68")):
        assert f'<tr><td>{name}</td><td class="num">{after}</td><td class="num">{before}</td></tr>' in html
    assert client(ws).get("/deployments/nope").status_code == 404


def test_deployment_page_takes_the_stat_check_and_hashes_on_request(cat, monkeypatch):
    """Viewing a deployment does not read the model: the stat check suffices while the files are unchanged;
    ``?measure=1`` hashes every byte; a byte changed behind the catalog's back is still reported."""
    import os

    from adapterhub.apply import deploy_folders, deployments

    ws, _ = cat
    calls = []
    real = deploy_folders.measure_folder
    monkeypatch.setattr(deploy_folders, "measure_folder", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    html = client(ws).get("/deployments/prod").text
    assert '<span class="ok">ok</span>' in html and "stat check" in html and calls == []
    html = client(ws).get("/deployments/prod?measure=1").text
    assert '<span class="ok">ok</span>' in html and "every weight byte hashed" in html and calls == [1]
    f = next(deployments.get(ws, "prod").path.glob("*.safetensors"))
    st = f.stat()

    def flip() -> None:  # flip one byte of the last tensor's data, then put the mtime back
        with open(f, "r+b") as fh:
            fh.seek(st.st_size - 1)
            b = fh.read(1)
            fh.seek(st.st_size - 1)
            fh.write(bytes([b[0] ^ 1]))
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))

    flip()
    try:
        html = client(ws).get("/deployments/prod").text  # ctime changed: the stat check fails, bytes are hashed
        assert "NOT OK" in html and calls == [1, 1]
    finally:
        flip()  # the module's catalog is shared by the next tests
    assert deployments.verify(ws, "prod")["ok"]


@pytest.mark.parametrize("api,args", [
    ("/api/versions", ["list"]),
    ("/api/versions?task=sentiment&sort=test_accuracy&desc=1&limit=1000",
     ["list", "--task", "sentiment", "--sort", "test_accuracy", "--desc"]),
    ("/api/versions/mix@1", ["show", "mix@1"]),
    ("/api/versions/alpha@2/metrics", ["metrics", "alpha@2"]),
    ("/api/versions/mix@1/lineage", ["lineage", "mix@1"]),
    ("/api/versions/mix@1/lineage?direction=descendants", ["lineage", "mix@1", "--descendants"]),
    ("/api/diff?a=alpha@1&b=alpha@2", ["diff", "alpha@1", "alpha@2"]),
    ("/api/bases", ["base", "list"]),
    ("/api/deployments", ["deploy", "list"]),
    ("/api/deployments/prod/history", ["deploy", "history", "prod"]),
    ("/api/deployments/prod/verify", ["deploy", "verify", "prod"]),
])
def test_api_serves_the_cli_json_documents(cat, api, args):
    ws, _ = cat
    assert client(ws).get(api).json() == cli_json(ws, *args)


def test_api_errors_and_hub(cat):
    ws, r = cat
    c = client(ws)
    assert c.get("/api/versions/nope@1").status_code == 404 and "error" in c.get("/api/versions/nope@1").json()
    assert c.get("/api/versions?limit=0").status_code == 400
    assert [v["ref"] for v in c.get("/api/hub").json()] == [r["a2"]]
    assert "alice/alpha" in c.get("/hub").text


def test_host_header_allow_list(cat):
    ws, _ = cat
    c = client(ws)
    assert c.get("/", headers={"host": "evil.example:8765"}).status_code == 400
    assert c.get("/api/versions", headers={"host": "127.0.0.1.evil.example"}).status_code == 400
    r = c.get("/", headers={"host": "rebind.attacker.test"})
    assert r.status_code == 400 and r.headers["content-security-policy"] == CSP
    for h in ("127.0.0.1:8765", "localhost:8765", "[::1]:8765", "localhost"):
        assert c.get("/bases", headers={"host": h}).status_code == 200, h
    s = settings_for("192.168.1.5", token="t" * 32, allow_writes=False, extra_hosts=("box.lan",))
    assert s.host_allowed("192.168.1.5:8765") and s.host_allowed("box.lan") and not s.host_allowed("other.lan")


def test_token_required_off_loopback(cat, tmp_path):
    ws, _ = cat
    with pytest.raises(UiError, match="needs a token"):
        settings_for("0.0.0.0", token=None, allow_writes=False)
    token = write_token_file(tmp_path / "ui-token")
    assert stat.S_IMODE(os.stat(tmp_path / "ui-token").st_mode) == 0o600
    assert (tmp_path / "ui-token").read_text().strip() == token and len(token) >= 32
    c = client(ws, settings_for("0.0.0.0", token=token, allow_writes=False))
    r = c.get("/")
    assert r.status_code == 401 and 'action="/login"' in r.text and token not in r.text
    assert c.get("/api/versions").status_code == 401
    assert c.get("/api/versions", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/versions", headers={"authorization": f"Bearer {token}"}).status_code == 200
    assert c.post("/login", data={"token": "wrong"}).status_code == 401
    assert c.get("/").status_code == 401
    r = c.post("/login", data={"token": token}, follow_redirects=False)
    assert r.status_code == 303 and "httponly" in r.headers["set-cookie"].lower()
    assert "samesite=strict" in r.headers["set-cookie"].lower()
    assert c.get("/").status_code == 200  # the cookie


def test_writes_refused_unless_allowed(cat):
    ws, r = cat
    from catalog_util import home_snapshot

    c = client(ws)
    before = home_snapshot(ws.home)
    assert 'action="/actions/tag"' not in c.get(f"/v/{r['a1']}").text
    s = c.app.state.settings
    resp = c.post("/actions/tag", data={"csrf": s.csrf, "ref": r["a1"], "tag": "candidate"})
    assert resp.status_code == 403 and "read-only" in resp.text
    assert c.post("/actions/apply", data={"csrf": s.csrf, "name": "prod", "ref": r["a1"]}).status_code == 403
    assert c.get("/actions/tag").status_code == 405
    assert home_snapshot(ws.home) == before


def test_writes_with_csrf_go_through_the_library(cat):
    ws, r = cat
    from adapterhub.apply import deployments

    settings = UiSettings(allow_writes=True)
    c = client(ws, settings)
    page = c.get(f"/v/{r['a1']}").text
    assert f'name="csrf" value="{settings.csrf}"' in page
    for bad in ({}, {"csrf": "x" * 43}):
        resp = c.post("/actions/tag", data={**bad, "ref": r["a1"], "tag": "candidate"})
        assert resp.status_code == 403
    resp = c.post("/actions/tag", data={"csrf": settings.csrf, "ref": r["a1"], "tag": "candidate"},
                  headers={"origin": "http://evil.example"})
    assert resp.status_code == 403
    resp = c.post("/actions/tag", data={"csrf": settings.csrf, "ref": r["a1"], "tag": "candidate"},
                  headers={"sec-fetch-site": "cross-site"})
    assert resp.status_code == 403
    with pytest.raises(Exception, match="no tag"):
        ws.resolve("alpha@candidate")
    resp = c.post("/actions/tag", data={"csrf": settings.csrf, "ref": r["a1"], "tag": "candidate"},
                  headers={"origin": ORIGIN}, follow_redirects=False)
    assert resp.status_code == 303 and resp.headers["location"].startswith("/v/alpha@1?")
    assert ws.resolve("alpha@candidate").ref == r["a1"]
    bad = c.post("/actions/tag", data={"csrf": settings.csrf, "ref": r["a1"], "tag": "latest"})
    assert bad.status_code == 400 and "reserved" in bad.text
    assert c.post("/actions/untag", data={"csrf": settings.csrf, "name": "alpha", "tag": "candidate"},
                  follow_redirects=False).status_code == 303
    with pytest.raises(Exception, match="no tag"):
        ws.resolve("alpha@candidate")
    # deploy revert, apply, rollback: the library's events, exact states
    n0 = len(deployments.history(ws, "prod"))
    assert c.post("/actions/revert", data={"csrf": settings.csrf, "name": "prod"},
                  follow_redirects=False).status_code == 303
    assert [l["ref"] for l in deployments.get(ws, "prod").stack] == [r["mix"]]
    assert c.post("/actions/apply", data={"csrf": settings.csrf, "name": "prod", "ref": r["forget"], "scale": "1"},
                  follow_redirects=False).status_code == 303
    assert c.post("/actions/rollback", data={"csrf": settings.csrf, "name": "prod", "to": "0"},
                  follow_redirects=False).status_code == 303
    ev = deployments.history(ws, "prod")
    assert [e.action for e in ev[n0:]] == ["revert", "apply", "rollback"]
    assert ev[-1].state == ev[0].state and deployments.verify(ws, "prod")["ok"]
    assert c.post("/actions/apply", data={"csrf": settings.csrf, "name": "prod", "ref": "nope@1"}).status_code == 404
    # put the deployment back as the other tests expect it
    deployments.apply(ws, "prod", r["mix"])
    deployments.apply(ws, "prod", r["forget"])


SWEEP_VALUES = ["", "..", "%2e%2e%2f%2e%2e", "x" * 3000, "\x1b[31m", "名前", "a@b@c", "nope@99", "mix@0", "mix@1",
                "-1", "1e999", "nan", "9" * 30, "9" * 5000, "%00", "%s%n", "{}", "http://u:pw@h/x", "%ff%fe"]
SWEEP_PATHS = ["/v/{}", "/download/{}", "/card/{}", "/deployments/{}", "/api/versions/{}", "/api/versions/{}/metrics",
               "/api/versions/{}/lineage", "/api/deployments/{}/history", "/api/deployments/{}/verify"]
SWEEP_QUERIES = {"/": ["page", "per_page", "columns", "kind", "task", "base", "tag", "q", "sort", "desc", "all"],
                 "/api/versions": ["limit", "offset", "page", "per_page", "sort", "columns"],
                 "/compare": ["ref"], "/api/diff": ["a", "b"], "/deployments/prod": ["measure", "done"],
                 "/api/versions/mix@1/lineage": ["direction", "depth"], "/hub": ["q", "page"], "/api/hub": ["q"]}


def test_hostile_path_and_query_values_never_make_a_server_error(cat):
    """Every route with a path parameter, and every query key a page reads, given hostile values (huge and
    non-finite numbers, 5,000 digits, escapes, traversal, a REF at version 0): a page or a 4xx, never a 500."""
    ws, _ = cat
    c = client(ws, raise_server_exceptions=False)
    n = 0
    for path in SWEEP_PATHS:
        for v in SWEEP_VALUES:
            r = c.get(path.format(quote(v, safe="%@")))  # "%..." values stay percent-encodings as typed
            assert r.status_code < 500 and "Traceback" not in r.text, (path, v[:40], r.status_code, r.text[:300])
            n += 1
    for path, keys in SWEEP_QUERIES.items():
        for k in keys:
            for v in SWEEP_VALUES:
                r = c.get(path, params={k: v})
                assert r.status_code < 500 and "Traceback" not in r.text, (path, k, v[:40], r.status_code)
                n += 1
    assert n > 600


def test_hostile_strings_are_text(cat):
    ws, r = cat
    c = client(ws)
    for url in ("/", f"/v/{r['evil']}", f"/compare?ref={r['evil']}&ref={r['a1']}"):
        html = c.get(url).text
        assert "<script>alert" not in html and "\x1b" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;[red]x\\x1b[31m" in html, url
    # the filter value goes back as the catalog stores it (only HTML-escaped), so filtering by it works
    assert _refs_in(c.get("/", params={"task": HOSTILE}).text) == [r["evil"]]
    bad = c.get("/v/%3Cscript%3Ealert(1)%3C%2Fscript%3E%1B%5B31m")
    assert bad.status_code in (400, 404) and "<script>alert" not in bad.text and "\x1b" not in bad.text
    api = c.get(f"/api/versions/{r['evil']}").json()
    assert api["task"] == HOSTILE  # JSON: exactly as stored
    out = render_markdown("# t\n\n<script>alert(1)</script> <img src=x onerror=alert(1)>\n\n"
                          "[a](javascript:alert(1)) \x1b[31m")
    assert "<script" not in out and "<img" not in out and "href" not in out and "\x1b" not in out
    assert "&lt;script&gt;" in out and "\\x1b" in out


def test_ui_command_token_file_and_refusals(cat, monkeypatch, tmp_path):
    ws, _ = cat
    import uvicorn

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    home = tmp_path / "h"
    r = CliRunner().invoke(cli, ["--home", str(home), "ui", "--host", "0.0.0.0", "--port", "9999"])
    assert r.exit_code == 0, r.output
    token = (home / "ui-token").read_text().strip()
    assert token not in r.output and str(home / "ui-token") in r.stderr
    assert stat.S_IMODE(os.stat(home / "ui-token").st_mode) == 0o600
    assert seen["host"] == "0.0.0.0" and seen["port"] == 9999 and seen["access_log"] is False
    assert seen["app"].state.settings.token == token and not seen["app"].state.settings.allow_writes
    r = CliRunner().invoke(cli, ["--home", str(home), "ui"])
    assert r.exit_code == 0 and seen["host"] == "127.0.0.1" and seen["port"] == 8765
    assert seen["app"].state.settings.token is None
    r = CliRunner().invoke(cli, ["--home", str(home), "ui", "--token", "short"])
    assert r.exit_code == 2
    r = CliRunner().invoke(cli, ["--home", str(home), "ui", "--port", "70000"])
    assert r.exit_code == 2


@pytest.mark.postgres
def test_ui_on_postgres(pg_url, tmp_path, tiny_bert_dir):
    ws = Workspace.open(tmp_path / "pghome", pg_url)
    try:
        r = build_catalog(ws, tiny_bert_dir)
        c = client(ws)
        for url in PAGES:
            assert c.get(url).status_code == 200, url
        assert _refs_in(c.get("/?sort=test_accuracy&desc=1&task=sentiment").text)[:2] == [r["a2"], r["a1"]]
        assert _refs_in(c.get("/?q=ALPH").text) == [r["a2"], r["a1"]]
        assert _refs_in(c.get("/?tag=prod&per_page=25").text) == [r["a2"]]
        html = c.get(f"/v/{r['mix']}").text
        assert len(re.findall(r'<g class="edge"', html)) == 5
        assert c.get("/api/versions/mix@1").json()["parents"][0]["relation"] == "merged_from"
    finally:
        ws.close()


def test_ui_load_benchmark_smoke():
    """benchmarks/ui_load.py still runs (a tiny catalog; no timings asserted): it starts `adapterhub ui`."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "benchmarks/ui_load.py", "--n", "400", "--repeat", "2"], capture_output=True,
                       text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "| version page (lineage, card) |" in r.stdout and "| anchor: plain SQL SELECT of the 50 rows |" in r.stdout
