"""Hugging Face Hub commands: ``push``, ``pull`` and ``hub versions`` (thin wrappers over adapterhub.hub.client)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import click

from .common import (
    Ctx,
    echo,
    echo_err,
    handle_errors,
    json_option,
    library_message,
    output,
    pass_ctx,
    print_json,
    rich_safe,
)
from .paramtypes import ADAPTER_NAME, REF


class _UsageError(click.ClickException):
    """A bad option value, reported as one ``Error: ...`` line with exit code 2."""

    exit_code = 2


def _endpoint_option(fn: Any) -> Any:
    return click.option("--endpoint", metavar="URL", default=None,
                        help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co).")(fn)


@contextlib.contextmanager
def _status(quiet: bool) -> Iterator[Any]:
    """A rich spinner on stderr showing the library's stage messages (transfers show their own bars)."""
    if quiet or not sys.stderr.isatty():
        yield lambda msg: None
        return
    from rich.console import Console

    console = Console(file=sys.stderr)
    with console.status("contacting the Hub") as status:
        yield lambda msg: status.update(rich_safe(msg))


@click.command("push")
@click.argument("ref", type=REF, is_eager=True)
@click.option("--repo", metavar="OWNER/NAME", default=None,
              help="Hub repo (default: <your user>/<adapter name>).")
@click.option("--private", is_flag=True, help="Create the repo as private (if it does not exist yet).")
@click.option("--branch", default="main", show_default=True, help="Branch to commit to.")
@click.option("--card-only", is_flag=True,
              help="Only refresh the card (adapterhub.json, README.md) of a version already pushed; no weights.")
@click.option("--tags", "mirror_tags", is_flag=True,
              help="Mirror the adapter's local tags on the Hub as tag-NAME (prod -> tag-prod), for its "
                   "versions pushed to this repo; a tag-NAME at one of them whose local tag is gone is deleted.")
@_endpoint_option
@json_option
@pass_ctx
@handle_errors
def push_cmd(c: Ctx, ref: str, repo: str | None, private: bool, branch: str, card_only: bool, mirror_tags: bool,
             endpoint: str | None, as_json: bool) -> None:
    """Push one version to the Hugging Face Hub: one commit tagged v{N}.

    The commit holds adapter.safetensors, adapterhub.json (hash, base, mask, metrics, lineage) and a
    README.md model card. Pushing a version that is already there uploads no weights; when its card
    changed (new metrics, a parent pushed since), the card alone is committed to the branch
    (--card-only does only that). The token comes from HF_TOKEN or `hf auth login`.

    Example: adapterhub push rt-sentiment@2 --repo alice/rt-sentiment --tags
    """
    from adapterhub.hub.client import push

    with _status(as_json) as status:
        res = push(c.ws, ref, repo=repo, private=private, branch=branch, endpoint=endpoint, progress=status,
                   card_only=card_only, mirror_tags=mirror_tags)
    if as_json:
        print_json(res.to_json())
    else:
        echo(res.message)
        if res.hub_tags:
            echo(f"Hub tags: {', '.join(res.hub_tags)}")
        if res.hub_tags_deleted:
            echo(f"Hub tags deleted (no longer tagged locally): {', '.join(res.hub_tags_deleted)}")
        echo(f"{res.url}/tree/{res.tag}")


@click.command("pull")
@click.argument("spec", metavar="REPO[@REV]")
@click.option("--name", type=ADAPTER_NAME, is_eager=True, default=None,
              help="Local adapter name (default: OWNER--NAME from the repo id, never the card's name). "
                   "Adds a version to an existing adapter only when named here and on the same base.")
@click.option("--with-parents", is_flag=True, help="Also pull missing ancestors (merges, fine-tunes).")
@click.option("--timeout", "timeout", envvar="ADAPTERHUB_PULL_TIMEOUT", default=None, metavar="SECONDS",
              help="Give up when the whole pull takes longer. Env: ADAPTERHUB_PULL_TIMEOUT. Default: 600.")
@click.option("--max-bytes", "max_bytes", envvar="ADAPTERHUB_PULL_MAX_BYTES", default=None, metavar="SIZE",
              help="Largest weights file to download (e.g. 500M, 4GiB). Env: ADAPTERHUB_PULL_MAX_BYTES. "
                   "Default: 4GiB.")
@_endpoint_option
@json_option
@pass_ctx
@handle_errors
def pull_cmd(c: Ctx, spec: str, name: str | None, with_parents: bool, timeout: str | None,
             max_bytes: str | None, endpoint: str | None, as_json: bool) -> None:
    """Pull a version from the Hub into the catalog (REV: a tag such as v3, a branch or a commit).

    The weights' sha256 is checked against the card before anything is registered; the version is
    recorded with an imported_from edge (repo, revision, commit). Pulling twice is a no-op. All or
    nothing: the version, its parents and a missing base are downloaded and checked first, then
    registered in one transaction; on any error the catalog is unchanged.

    Example: adapterhub pull alice/rt-sentiment@v2 --with-parents
    """
    from adapterhub.errors import HubError
    from adapterhub.hub.client import iter_pull_results, pull, pull_limits

    try:  # the user's own settings: a bad value is a usage error (exit 2, one line), checked first
        limits = pull_limits(timeout, max_bytes)
    except HubError as e:
        raise _UsageError(library_message(e)) from None
    with _status(as_json) as status:
        res = pull(c.ws, spec, name=name, with_parents=with_parents, endpoint=endpoint, progress=status,
                   limits=limits)
    if as_json:
        print_json(res.to_json())
        return
    for r in iter_pull_results(res):
        if r is not res:
            echo_err(f"parent: {r.message}")
    echo(res.message)


@click.group("hub")
def hub_group() -> None:
    """Look at adapters on the Hugging Face Hub."""


@hub_group.command("versions")
@click.argument("repo", metavar="OWNER/NAME")
@_endpoint_option
@json_option
@pass_ctx
@handle_errors
def versions_cmd(c: Ctx, repo: str, endpoint: str | None, as_json: bool) -> None:
    """List the versions (v{N} tags) of a Hub repo with the content hash each one holds.

    Example: adapterhub hub versions alice/rt-sentiment --json
    """
    from adapterhub.hub.client import hub_versions

    rows = hub_versions(repo, endpoint=endpoint)
    output({"repo": repo, "versions": [r.to_json() for r in rows]}, as_json,
           ["tag", "commit", "sha256", "name", "kind", "task"],
           ([r.tag, r.commit[:12], (r.content_hash or f"({r.error})")[:16], r.name, r.kind, r.task] for r in rows),
           title=repo)


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (push_cmd, pull_cmd, hub_group)
