"""``adapterhub ui``: serve the web view of the catalog (adapterhub.ui) with uvicorn."""
from __future__ import annotations

import click

from .common import Ctx, echo, echo_err, handle_errors, pass_ctx


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind. Anything but this machine (loopback) needs a token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port to bind.")
@click.option("--token", envvar="ADAPTERHUB_UI_TOKEN", default=None, metavar="TOKEN",
              help="Token every request must carry (Authorization: Bearer, or the login form). Env: "
                   "ADAPTERHUB_UI_TOKEN. Default on a non-loopback --host: a new one, written to <home>/ui-token "
                   "(readable by you only).")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Another host name accepted in the Host header (repeatable), e.g. the machine's DNS name.")
@click.option("--allow-writes", is_flag=True,
              help="Offer tag, untag and deploy apply/revert/rollback as forms (POST with a CSRF token).")
@click.option("--lineage-depth", type=click.IntRange(1, 50), default=4, show_default=True,
              help="Levels of ancestors and of descendants the lineage picture draws.")
@pass_ctx
@handle_errors
def ui_cmd(c: Ctx, host: str, port: int, token: str | None, allow_hosts: tuple[str, ...], allow_writes: bool,
           lineage_depth: int) -> None:
    """Browse the catalog in a web browser: versions, lineage, metrics, comparisons, deployments.

    Local and offline: served on 127.0.0.1 by default, read-only unless --allow-writes, no CDN.
    Stop it with Ctrl-C.

    Example: adapterhub ui --port 8765   (then open http://127.0.0.1:8765/)
    """
    try:
        import uvicorn

        from adapterhub.ui.app import create_app
    except ImportError as e:
        raise click.ClickException(f"the web view needs the ui extra (pip install 'adapterhub[ui]'): {e.name} "
                                   "is missing") from None
    from adapterhub.ui.security import is_loopback, settings_for, write_token_file

    ws = c.ws
    if token is not None and len(token) < 16:
        raise click.UsageError("--token must be at least 16 characters")
    if token is None and not is_loopback(host):
        path = ws.home / "ui-token"
        token = write_token_file(path)
        echo_err(f"token written to {path} (readable by you only); the login page asks for it")
    settings = settings_for(host, token=token, allow_writes=allow_writes, extra_hosts=allow_hosts)
    app = create_app(ws, settings, lineage_depth=lineage_depth)
    shown = f"[{host}]" if ":" in host else host
    echo(f"adapterhub ui: http://{shown}:{port}/ ({'read-write' if allow_writes else 'read-only'}; Ctrl-C stops)")
    # access_log off: request lines are nobody's business (and never carry a token: it travels in a header
    # or a cookie, never in the URL)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, server_header=False)


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (ui_cmd,)
