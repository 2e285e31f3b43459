"""The web view of a catalog: a Starlette app over one :class:`Workspace` (``adapterhub ui`` serves it).

Server-rendered HTML (Jinja2, autoescaped; no JavaScript at all), inline SVG pictures drawn in Python
(:mod:`adapterhub.ui.svg`), one stylesheet shipped in the package. Pages: catalog ``/``, version
``/v/REF``, compare ``/compare?ref=A&ref=B``, deployments ``/deployments[/NAME]``, ``/bases``, ``/hub``.
The JSON API under ``/api/`` serves the CLI's ``--json`` documents, built by the same library calls.

Read-only unless ``allow_writes``: then tag, untag and deploy apply/revert/rollback are POST forms carrying
the server's CSRF token, and go through the same library calls (and locks) as the CLI. Safety settings
and their middleware: :mod:`adapterhub.ui.security`.
"""
from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..errors import AdapterHubError, CatalogError, DeploymentError, RefError
from . import pages
from .safe import attr_value, finalize
from .security import TOKEN_COOKIE, SecurityMiddleware, UiSettings

if TYPE_CHECKING:  # pragma: no cover
    from ..workspace import Workspace

HERE = Path(__file__).resolve().parent
MAX_FORM_BYTES = 16 * 1024


def version_href(ref: str) -> str:
    """The address of a version's page."""
    return "/v/" + quote(ref, safe="@~")


def _json_default(o: Any) -> Any:
    return str(o)


def _json(doc: Any, status: int = 200) -> Response:
    """One JSON document, as the CLI's ``--json`` prints it (strings exactly as stored: JSON escapes controls)."""
    body = json.dumps(doc, default=_json_default, sort_keys=True, indent=2)  # exactly as print_json does
    return Response(body, status_code=status, media_type="application/json")


def _fmt_num(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _short_root(root: Any, digits: int = 12) -> str:
    """A state root's tag and first hex digits (:func:`adapterhub.apply.state.short_root`)."""
    from ..apply.state import short_root

    return short_root(str(root or ""), digits)


def _when(t: Any) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if hasattr(t, "strftime") else ("" if t is None else str(t))


def _status_for(e: AdapterHubError) -> int:
    if isinstance(e, RefError) or (isinstance(e, DeploymentError) and str(e).startswith("unknown deployment")):
        return 404
    return 400


def create_app(ws: Workspace, settings: UiSettings | None = None, *, lineage_depth: int = 4) -> Starlette:
    """The web app over ``ws`` guarded by ``settings`` (default: loopback hosts only, no token, read-only).

    ``lineage_depth``: how many levels of ancestors and of descendants the lineage picture draws."""
    cfg = settings or UiSettings()
    env = Environment(loader=FileSystemLoader(str(HERE / "templates")), autoescape=select_autoescape(default=True),
                      finalize=finalize, trim_blocks=True, lstrip_blocks=True)
    # form values go back to the server as they are (only HTML-escaped): a control character made visible
    # there would no longer match the catalog string it stands for
    env.filters["val"] = attr_value
    env.globals.update(vhref=version_href, fmt=_fmt_num, when=_when, csrf=cfg.csrf, writes=cfg.allow_writes,
                       qs=lambda d: urlencode(d), quote=lambda s: quote(str(s), safe=""), auth=cfg.token is not None,
                       short_root=_short_root)

    def render(name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return HTMLResponse(env.get_template(name).render(**ctx), status_code=status)

    def error_page(e: Exception, status: int) -> HTMLResponse:
        return render("error.html", status=status, message=str(e), status_code=status)

    def page(fn: Callable[[Request], Response]) -> Callable[[Request], Response]:
        """A sync endpoint (Starlette runs it in its thread pool): library errors become a 4xx page."""
        @functools.wraps(fn)
        def wrapper(request: Request) -> Response:
            try:
                return fn(request)
            except AdapterHubError as e:
                return error_page(e, _status_for(e))
            except OSError as e:
                return error_page(Exception(f"{e.strerror or e.__class__.__name__}"), 500)
        return wrapper

    def api(fn: Callable[[Request], Any]) -> Callable[[Request], Response]:
        @functools.wraps(fn)
        def wrapper(request: Request) -> Response:
            try:
                return _json(fn(request))
            except AdapterHubError as e:
                return _json({"error": str(e)}, _status_for(e))
            except OSError as e:
                return _json({"error": e.strerror or e.__class__.__name__}, 500)
        return wrapper

    # -- pages ------------------------------------------------------------------------------------

    @page
    def catalog(request: Request) -> Response:
        q = pages.parse_query(request.query_params.get)
        return render("catalog.html", nav="catalog", **pages.catalog_page(ws, q))

    @page
    def version(request: Request) -> Response:
        ref = request.path_params["ref"]
        data = pages.version_page(ws, ref, href=version_href, max_depth=lineage_depth)
        return render("version.html", nav="catalog", message=request.query_params.get("done"), **data)

    @page
    def download(request: Request) -> Response:
        info = ws.resolve(request.path_params["ref"])
        data = ws.adapter_bytes(info)  # verified against the content hash by the store
        return Response(data, media_type="application/octet-stream", headers={
            "content-disposition": f'attachment; filename="{info.name}-v{info.number}.safetensors"'})

    @page
    def readme(request: Request) -> Response:
        return PlainTextResponse(pages.readme_text(ws, request.path_params["ref"]),
                                 media_type="text/markdown; charset=utf-8")

    @page
    def compare(request: Request) -> Response:
        refs = [r for r in request.query_params.getlist("ref") if r.strip()]
        if len(refs) < 2:
            raise CatalogError("choose two or more versions to compare (?ref=A&ref=B)")
        return render("compare.html", nav="catalog", **pages.compare_page(ws, refs))

    @page
    def deployments(request: Request) -> Response:
        return render("deployments.html", nav="deployments", **pages.deployments_page(ws))

    @page
    def deployment(request: Request) -> Response:
        data = pages.deployment_page(ws, request.path_params["name"],
                                     measure=request.query_params.get("measure") == "1")
        return render("deployment.html", nav="deployments", message=request.query_params.get("done"), **data)

    @page
    def bases(request: Request) -> Response:
        return render("bases.html", nav="bases", **pages.bases_page(ws))

    @page
    def hub(request: Request) -> Response:
        return render("hub.html", nav="hub", **pages.hub_page(ws))

    # -- JSON API: the CLI's --json documents -------------------------------------------------------

    @api
    def api_versions(request: Request) -> Any:  # list --json
        q = pages.parse_query(request.query_params.get)
        limit = request.query_params.get("limit")
        offset = request.query_params.get("offset")
        try:
            lim = int(limit) if limit else q.per_page
            off = int(offset) if offset else (q.page - 1) * q.per_page
        except ValueError:
            raise CatalogError("limit and offset must be whole numbers") from None
        if not 1 <= lim <= 1000 or off < 0:
            raise CatalogError("limit must be 1..1000 and offset at least 0")
        extra = list(dict.fromkeys([*([q.sort] if q.sort else []), *q.columns]))
        return [v.to_json() for v in ws.list_versions(**q.filters(), sort=q.sort, descending=q.descending,
                                                      columns=extra, limit=lim, offset=off)]

    @api
    def api_show(request: Request) -> Any:  # show --json
        from ..views.documents import show_document

        return show_document(ws, request.path_params["ref"])

    @api
    def api_metrics(request: Request) -> Any:  # metrics --json
        from ..views.documents import metrics_document

        return metrics_document(ws, request.path_params["ref"])

    @api
    def api_lineage(request: Request) -> Any:  # lineage --format json
        from ..views.lineage import lineage_document

        direction = request.query_params.get("direction", "ancestors")
        info = ws.resolve(request.path_params["ref"])
        return lineage_document(info.ref, direction, ws.lineage(info.ref, direction=direction))

    @api
    def api_diff(request: Request) -> Any:  # diff --json
        from ..views.diff import diff_versions

        a, b = request.query_params.get("a"), request.query_params.get("b")
        if not a or not b:
            raise CatalogError("diff needs ?a=REF&b=REF")
        return diff_versions(ws, a, b).to_json()

    @api
    def api_bases(request: Request) -> Any:  # base list --json
        return [b.to_json() for b in ws.list_bases()]

    @api
    def api_deployments(request: Request) -> Any:  # deploy list --json
        from ..apply import deployments as dep

        return [i.to_json() for i in dep.list_deployments(ws)]

    @api
    def api_history(request: Request) -> Any:  # deploy history --json
        from ..apply import deployments as dep

        return [e.to_json() for e in dep.history(ws, request.path_params["name"])]

    @api
    def api_verify(request: Request) -> Any:  # deploy verify --json
        from ..apply import deployments as dep

        return dep.verify(ws, request.path_params["name"])

    @api
    def api_hub(request: Request) -> Any:  # list --json of the pushed versions
        return [v.to_json() for v in ws.list_versions(on_hub=True)]

    # -- login and writes -------------------------------------------------------------------------

    async def form(request: Request) -> dict[str, str]:
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise CatalogError("form too large")
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            raise CatalogError("unreadable form") from None
        return {k: v[0] for k, v in parsed.items()}

    async def login(request: Request) -> Response:
        if request.method == "GET" or cfg.token is None:
            return RedirectResponse("/", status_code=303) if cfg.token is None else \
                HTMLResponse(login_page(), status_code=200)
        try:
            f = await form(request)
        except CatalogError as e:
            return PlainTextResponse(str(e), status_code=400)
        if not cfg.token_ok(f.get("token")):
            return HTMLResponse(login_page(failed=True), status_code=401)
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(TOKEN_COOKIE, cfg.token, httponly=True, samesite="strict", path="/")
        return resp

    def login_page(failed: bool = False) -> bytes:
        return env.get_template("login.html").render(failed=failed, nav=None).encode()

    def same_origin(request: Request) -> bool:
        """Browsers send Origin (or at least Sec-Fetch-Site) on a POST: it must be this server."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None
        host = origin.split("://", 1)[-1]
        return cfg.host_allowed(host) and host == request.headers.get("host")

    async def action(request: Request) -> Response:
        if not cfg.allow_writes:
            return PlainTextResponse("read-only: start `adapterhub ui --allow-writes` to change the catalog",
                                     status_code=403)
        try:
            f = await form(request)
        except CatalogError as e:
            return PlainTextResponse(str(e), status_code=400)
        if not cfg.csrf_ok(f.get("csrf")) or not same_origin(request):
            return PlainTextResponse("refused: missing or wrong CSRF token, or a cross-site request", status_code=403)
        what = request.path_params["what"]
        try:
            from starlette.concurrency import run_in_threadpool

            where = await run_in_threadpool(_do, what, f)
        except AdapterHubError as e:
            return error_page(e, 400 if _status_for(e) != 404 else 404)
        return RedirectResponse(where, status_code=303)

    def _do(what: str, f: dict[str, str]) -> str:
        """One write through the CLI's library call; returns the page to go back to."""
        if what == "tag":
            info = ws.tag(f.get("ref", ""), f.get("tag", ""))
            return version_href(info.ref) + "?" + urlencode({"done": f"tagged {info.name}@{f.get('tag')}"})
        if what == "untag":
            ws.untag(f.get("name", ""), f.get("tag", ""))
            back = f.get("back", "")
            return (version_href(back) if back else "/") + "?" + urlencode({"done": f"removed tag {f.get('tag')}"})
        from ..apply import deployments as dep

        name = f.get("name", "")
        if what == "apply":
            try:
                scale = float(f.get("scale") or "1")
            except ValueError:
                raise DeploymentError("scale must be a number") from None
            if not math.isfinite(scale):
                raise DeploymentError("scale must be a finite number")
            dep.apply(ws, name, f.get("ref", ""), scale)
        elif what == "revert":
            dep.revert(ws, name, f.get("ref") or None)
        elif what == "rollback":
            try:
                to = int(f.get("to", ""))
            except ValueError:
                raise DeploymentError("rollback needs an event number") from None
            dep.rollback(ws, name, to)
        else:
            raise CatalogError(f"unknown action {what[:40]!r}")
        return f"/deployments/{quote(name, safe='')}?" + urlencode({"done": f"{what} done"})

    routes = [
        Route("/", catalog),
        Route("/v/{ref}", version),
        Route("/download/{ref}", download),
        Route("/card/{ref}", readme),
        Route("/compare", compare),
        Route("/deployments", deployments),
        Route("/deployments/{name}", deployment),
        Route("/bases", bases),
        Route("/hub", hub),
        Route("/api/versions", api_versions),
        Route("/api/versions/{ref}", api_show),
        Route("/api/versions/{ref}/metrics", api_metrics),
        Route("/api/versions/{ref}/lineage", api_lineage),
        Route("/api/diff", api_diff),
        Route("/api/bases", api_bases),
        Route("/api/deployments", api_deployments),
        Route("/api/deployments/{name}/history", api_history),
        Route("/api/deployments/{name}/verify", api_verify),
        Route("/api/hub", api_hub),
        Route("/login", login, methods=["GET", "POST"]),
        Route("/actions/{what}", action, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(SecurityMiddleware, settings=cfg, login_page=login_page)
    app.state.settings = cfg
    return app


__all__ = ["create_app", "version_href"]
