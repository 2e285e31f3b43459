"""The ``adapterhub`` command: global options and the command groups of each capability."""
from __future__ import annotations

import click

from . import catalog_cmds, compose_cmds, hub_cmds, train_cmds, unlearn_cmds
from .common import Ctx

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.option("--home", envvar="ADAPTERHUB_HOME", type=click.Path(file_okay=False), default=None,
              help="Home directory (store, catalog, deployments). Env: ADAPTERHUB_HOME. Default: ~/.adapterhub")
@click.option("--db", "db_url", envvar="ADAPTERHUB_DB_URL", default=None, metavar="URL",
              help="Catalog database URL (sqlite:///... or postgresql://...). Env: ADAPTERHUB_DB_URL. "
                   "Default: SQLite in the home directory.")
@click.version_option(package_name="adapterhub")
@click.pass_context
def cli(ctx: click.Context, home: str | None, db_url: str | None) -> None:
    """adapterhub: store, version, share, merge and apply sparse adapters.

    Example: adapterhub base add minilm minilm && adapterhub train --base minilm --task rt-sentiment
    """
    c = Ctx(home, db_url)
    ctx.obj = c
    ctx.call_on_close(c.close)


for _module in (catalog_cmds, train_cmds, compose_cmds, hub_cmds, unlearn_cmds):
    _module.register(cli)


def main() -> None:
    cli(prog_name="adapterhub")


if __name__ == "__main__":
    main()
