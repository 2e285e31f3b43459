"""The ``adapterhub`` command: global options and the command groups of each capability."""
from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import click

from . import catalog_cmds, compose_cmds, demo_cmds, fed_cmds, hub_cmds, train_cmds, ui_cmds, unlearn_cmds
from .common import Ctx, parse_lock_timeout

# commands that load models: transformers' own per-load progress bars would interleave with ours
MODEL_COMMANDS = {"train", "eval", "demo", "fed", "unlearn"}
CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
# A command's process is short, and most of what it allocates lives until it exits: the modules it imports (torch
# alone, a few hundred thousand objects). Python's collector, at its default threshold (a pass every 700 new
# container objects, and now and then a full pass over everything), spends 0.15-0.2 s of a 2 s ``deploy apply``
# looking at them again and again (docs/benchmarks.md). The command collects every GC_THRESHOLD new container
# objects instead: a few passes per command, and a bounded amount of garbage in long-running ones (ui, fed, train).
GC_THRESHOLD = 100_000


@contextlib.contextmanager
def _passwords_redacted() -> Iterator[None]:
    """click's own usage errors quote what was typed ("Invalid value for 'NAME': ...", "Got unexpected extra
    argument (...)"): the password of any URL in them is replaced before click shows them."""
    from adapterhub.textsafe import redact_urls

    try:
        yield
    except click.ClickException as e:
        e.message = redact_urls(e.message)  # type: ignore[misc] # declared Final; only its shown text changes
        raise


class RootGroup(click.Group):
    """The ``adapterhub`` group: every usage error of the command line, its subcommands' included (they are
    parsed inside the root's ``invoke``), is shown without URL passwords."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        with _passwords_redacted():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _passwords_redacted():
            return super().invoke(ctx)


@click.group(cls=RootGroup, context_settings=CONTEXT_SETTINGS)
@click.option("--home", envvar="ADAPTERHUB_HOME", type=click.Path(), default=None,
              help="Home directory (store, catalog, deployments). Env: ADAPTERHUB_HOME. Default: ~/.adapterhub")
@click.option("--db", "db_url", envvar="ADAPTERHUB_DB_URL", default=None, metavar="URL",
              help="Catalog database URL (sqlite:///... or postgresql://...). Env: ADAPTERHUB_DB_URL. "
                   "Default: SQLite in the home directory.")
@click.option("--lock-timeout", envvar="ADAPTERHUB_LOCK_TIMEOUT", metavar="SECONDS", default=None,
              help="Seconds to wait for another process's catalog lock before giving up "
                   "(a note is printed after 2 s). Env: ADAPTERHUB_LOCK_TIMEOUT. Default: 60.")
@click.option("--store", "store_url", envvar="ADAPTERHUB_STORE_URL", default=None, metavar="URL",
              help="Blob store shared by a team (s3://bucket/prefix; endpoint: AWS_ENDPOINT_URL) or a folder. "
                   "Env: ADAPTERHUB_STORE_URL. Default: <home>/blobs/sha256.")
@click.version_option(package_name="adapterhub")
@click.pass_context
def cli(ctx: click.Context, home: str | None, db_url: str | None, lock_timeout: str | None,
        store_url: str | None) -> None:
    """adapterhub: store, version, share, merge and apply sparse adapters.

    Example: adapterhub base add minilm minilm && adapterhub train --base minilm --task rt-sentiment
    """
    if ctx.invoked_subcommand in MODEL_COMMANDS:
        _quiet_libraries()
    c = Ctx(home, db_url, parse_lock_timeout(lock_timeout), store_url=store_url)
    ctx.obj = c
    ctx.call_on_close(c.close)


# Every command module defines its commands and groups at module level and lists them in COMMANDS;
# this is the one place they are attached (click lists them by name, so the order here does not show).
for _module in (catalog_cmds, train_cmds, compose_cmds, hub_cmds, unlearn_cmds, demo_cmds, ui_cmds):
    for _command in _module.COMMANDS:
        cli.add_command(_command)
fed_cmds.attach(unlearn_cmds.fed_group)  # `fed node`: a site joining a Flower federation


def _quiet_libraries() -> None:
    """Our progress bars only: silence transformers' per-load bars and info logs."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        from transformers.utils import logging as tlog

        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except Exception:  # noqa: BLE001 - transformers missing or changed: bars are cosmetic
        pass


def main() -> None:
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
    cli(prog_name="adapterhub")


if __name__ == "__main__":
    main()
