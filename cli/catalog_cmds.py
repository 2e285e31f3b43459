"""Catalog commands: init, db, base, register, list, show, log, tag, untag, lineage, diff, verify, gc, export.

Thin wrappers over :class:`adapterhub.workspace.Workspace` and the small library modules ``adapterhub.interop.peft``,
``adapterhub.views.diff`` and ``adapterhub.views.lineage``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click

from .common import (
    Ctx,
    check_known,
    echo,
    echo_err,
    handle_errors,
    json_option,
    output,
    pass_ctx,
    phase_progress,
    print_json,
    progress,
    safe_doc,
)
from .options import values_dtype_option
from .paramtypes import ADAPTER_NAME, BASE_NAME, METRIC, METRIC_LIST, REF, TAG

if TYPE_CHECKING:  # the workspace module is imported by the commands that open one
    from adapterhub.workspace import VersionInfo, Workspace

KINDS = ("expert", "merge", "unlearning")
RELATIONS = ("finetuned_from", "merged_from", "unlearns", "imported_from")
LINEAGE_FORMATS = ("text", "json", "mermaid", "dot")


class ArgvCommand(click.Command):
    """A command that remembers its raw arguments, so repeated options can be paired by position."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["adapterhub.argv"] = list(args)
        return super().parse_args(ctx, args)


def _fmt_density(d: float | None) -> str:
    return "" if d is None else f"{100 * d:.3g}%"


def _version_row(v: VersionInfo) -> list[Any]:
    return [f"{v.ref} (deprecated)" if v.deprecated_at is not None else v.ref, v.kind, v.task, v.base, _fmt_density(v.density), v.nnz, v.dtype, ",".join(v.tags),
            v.content_hash[:12], v.created_at.strftime("%Y-%m-%d %H:%M") if v.created_at else ""]


_VERSION_COLUMNS = ["ref", "kind", "task", "base", "density", "nnz", "dtype", "tags", "hash", "created"]


@click.command("init")
@json_option
@pass_ctx
@handle_errors
def init_cmd(c: Ctx, as_json: bool) -> None:
    """Create the home directory and catalog (migrated to the latest schema).

    Example: adapterhub --home ./hub init
    """
    from adapterhub.catalog import db

    ws = c.ws
    doc = {"home": str(ws.home), "db": ws.engine.url.render_as_string(hide_password=True),
           "revision": db.current_revision(ws.engine)}
    if as_json:
        print_json(doc)
    else:
        echo(f"initialised {doc['home']} (catalog {doc['db']}, schema {doc['revision']})")


@click.group("db")
def db_group() -> None:
    """Catalog database schema (Alembic migrations)."""


def _raw_ws(c: Ctx) -> Workspace:
    """The Workspace without migrating the catalog (the ``db`` commands inspect or migrate it themselves)."""
    from adapterhub.workspace import Workspace

    return Workspace.open(c.home, c.db_url, migrate=False, lock_timeout=c.lock_timeout, store_url=c.store_url)


@db_group.command("upgrade")
@click.option("--revision", default="head", show_default=True, help="Target Alembic revision.")
@pass_ctx
@handle_errors
def db_upgrade(c: Ctx, revision: str) -> None:
    """Apply catalog migrations up to REVISION (default: the latest).

    Example: adapterhub --db postgresql://user@host/hub db upgrade
    """
    from adapterhub.catalog import db

    ws = _raw_ws(c)
    try:
        before = db.current_revision(ws.engine)
        db.upgrade(ws.engine, revision, blob_reader=ws.blob_or_none)  # 0006 recomputes mask hashes from blobs
        after = db.current_revision(ws.engine)
    finally:
        ws.close()
    echo(f"catalog schema: {before or 'empty'} -> {after}")


@db_group.command("current")
@json_option
@pass_ctx
@handle_errors
def db_current(c: Ctx, as_json: bool) -> None:
    """Show the catalog's schema revision and the latest one available.

    Example: adapterhub db current --json
    """
    from adapterhub.catalog import db

    ws = _raw_ws(c)
    try:
        cur = db.current_revision(ws.engine)
        url = ws.engine.url.render_as_string(hide_password=True)
    finally:
        ws.close()
    head = db.head_revision()
    doc = {"current": cur, "head": head, "up_to_date": cur == head, "db": url}
    if as_json:
        print_json(doc)
    else:
        echo(f"{cur or '(empty)'}{' (head)' if cur == head else f' (head is {head})'}")


@click.group("base")
def base_group() -> None:
    """Base models adapters are trained on."""


@base_group.command("add")
@click.argument("name", type=BASE_NAME, is_eager=True)
@click.argument("source")
@click.option("--revision", default=None, help="Hub revision (for Hub ids).")
@json_option
@pass_ctx
@handle_errors
def base_add(c: Ctx, name: str, source: str, revision: str | None, as_json: bool) -> None:
    """Register base model NAME from SOURCE: a local Hugging Face folder, 'minilm', 'smollm2' or 'digits-cnn'.

    'digits-cnn' is adapterhub's own small image CNN for the digits task (built from seed 0).

    Example: adapterhub base add minilm minilm
    """
    with phase_progress(as_json, "base") as prog:  # a 16 GB base is read and hashed for seconds
        info = c.ws.add_base(name, source, revision, progress=prog)
    if as_json:
        print_json(info.to_json())
    else:
        echo(f"{info.name}: {info.architecture or '?'}, {info.num_params or 0:,} params, "
                   f"fingerprint {info.fingerprint[:12]}")


@base_group.command("list")
@json_option
@pass_ctx
@handle_errors
def base_list(c: Ctx, as_json: bool) -> None:
    """List registered base models.

    Example: adapterhub base list --json
    """
    bases = c.ws.list_bases()
    output([b.to_json() for b in bases], as_json, ["name", "source", "architecture", "params", "fingerprint"],
           ([b.name, b.source, b.architecture, f"{b.num_params or 0:,}", b.fingerprint[:12]] for b in bases))


@base_group.command("rehash")
@click.argument("name", type=BASE_NAME, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def base_rehash(c: Ctx, name: str, as_json: bool) -> None:
    """Give base NAME a BLAKE3 state root if its root is sha256 (measured before catalog revision 0008).

    The base's folder is measured again (its identity fingerprint checked in the same pass); new deployments
    of NAME then hash with BLAKE3. Deployments made before keep their sha256 roots: remove and create one
    again to move it.

    Example: adapterhub base rehash minilm
    """
    from adapterhub.apply import deploy_folders
    from adapterhub.apply.state import short_root

    doc = deploy_folders.rehash_base(c.ws, name)
    if as_json:
        print_json(doc)
        return
    if doc["changed"]:
        echo(f"{doc['base']}: state root {short_root(doc['state_root'], 16)} (was {short_root(doc['previous'], 16)}); "
             f"new deployments hash with {doc['scheme']}")
    elif doc["previous"] is None:
        echo(f"{doc['base']}: not measured yet; its first deploy create measures it with {doc['scheme']}")
    else:
        echo(f"{doc['base']}: state root {short_root(doc['state_root'], 16)} is already {doc['scheme']}")
    kept = sorted(n for n, sch in doc["deployments"].items() if sch != doc["scheme"])
    if kept:
        echo(f"deployments keeping their {', '.join(sorted({doc['deployments'][n] for n in kept}))} roots: "
             f"{', '.join(kept)}")


@click.command("register", cls=ArgvCommand)
@click.argument("file", type=click.Path(exists=True))
@click.option("--name", required=True, type=ADAPTER_NAME, is_eager=True, help="Adapter name (new or existing).")
@click.option("--task", required=True, help="Task the adapter solves.")
@click.option("--base", "base", required=True, type=BASE_NAME, is_eager=True, help="Base model name.")
@click.option("--kind", type=click.Choice(KINDS), default="expert", show_default=True, help="Adapter kind.")
@click.option("--parent", "parents", multiple=True, type=REF, is_eager=True, help="Parent version (repeatable).")
@click.option("--relation", "relations", multiple=True, type=click.Choice(RELATIONS),
              help="Relation of the preceding --parent (default finetuned_from).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Accept NaN/inf values (refused by default; the file's card cannot switch this on).")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="PEFT LoRA folders: fraction of each ΔW = B·A·scale kept, by magnitude (required for LoRA).")
@click.option("--block-size", type=click.IntRange(min=1), default=None,
              help="PEFT LoRA folders: keep b x b blocks by norm instead of single entries.")
@values_dtype_option("Store the values in this dtype (recorded in the card); default: as in FILE.")
@json_option
@click.pass_context
@handle_errors
def register_cmd(ctx: click.Context, file: str, name: str, task: str, base: str, kind: str,
                 parents: tuple[str, ...], relations: tuple[str, ...], allow_nonfinite: bool,
                 density: float | None, block_size: int | None, values_dtype: str | None, as_json: bool) -> None:
    """Add FILE (an adapterhub .safetensors file, a PEFT SHiRA folder or a PEFT LoRA folder) as the next version of NAME.

    A LoRA folder needs --density: ΔW is kept sparse and the card records each tensor's relative
    reconstruction error. Prints the new ref.
    Example: adapterhub register rt.safetensors --name rt-sentiment --task rt --base minilm
    """
    from adapterhub.catalog.records import Parent
    from adapterhub.interop.modules import is_peft_folder

    pairs = _pair_parents(ctx, parents, relations)
    c: Ctx = ctx.obj
    ws = c.ws
    if (density is not None or block_size is not None) and not is_peft_folder(file):
        raise click.UsageError("--density and --block-size apply only to PEFT LoRA folders", ctx)
    if block_size is not None and density is None:
        raise click.UsageError("--block-size needs --density", ctx)
    # Workspace.register(path) is the one reader of files and folders: our own file is validated on views of its
    # bytes and stored as it is when canonical (no torch); a PEFT folder is imported with its provenance edge
    plist = [Parent(ref, rel) for ref, rel in pairs]
    info = ws.register(file, name=name, task=task, base=base, kind=kind, parents=plist,
                       allow_nonfinite=allow_nonfinite, density=density, block_size=block_size,
                       values_dtype=values_dtype)
    if not info.created:
        echo_err(f"same content is already {info.ref}; nothing added")
    if as_json:
        doc = info.to_json()
        doc["created"] = info.created
        doc["source_format"] = info.source_format
        print_json(doc)
    else:
        echo(info.ref)


def _pair_parents(ctx: click.Context, parents: tuple[str, ...], relations: tuple[str, ...]) -> list[tuple[str, str]]:
    """Pair each --relation with the --parent before it on the command line."""
    if len(relations) > len(parents):
        raise click.UsageError("--relation must follow a --parent", ctx)
    # click collects repeated options separately; recover their order from the raw arguments.
    order = [a.split("=", 1)[0] for a in (ctx.meta.get("adapterhub.argv") or []) if a.split("=", 1)[0] in ("--parent", "--relation")]
    rels: list[str] = ["finetuned_from"] * len(parents)
    if order:
        pi, ri = -1, 0
        for opt in order:
            if opt == "--parent":
                pi += 1
            else:
                if pi < 0:
                    raise click.UsageError("--relation must follow a --parent", ctx)
                rels[pi] = relations[ri]
                ri += 1
    else:
        rels[: len(relations)] = list(relations)
    return list(zip(parents, rels, strict=True))


@click.command("list")
@click.option("--task", default=None, help="Only versions of this task.")
@click.option("--base", type=BASE_NAME, is_eager=True, default=None, help="Only adapters of this base model.")
@click.option("--kind", type=click.Choice(KINDS), default=None, help="Only adapters of this kind.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many (newest first).")
@click.option("--all", "show_all", is_flag=True, help="Include deprecated versions (see `adapterhub deprecate`).")
@click.option("--sort", "sort", type=METRIC, default=None, metavar="METRIC",
              help="Order by this metric's current figure, ascending (versions without it last).")
@click.option("--desc", "descending", is_flag=True, help="With --sort: highest first.")
@click.option("--columns", type=METRIC_LIST, default=None, metavar="A,B,...",
              help="Add these metrics' current figures as columns (comma-separated).")
@json_option
@pass_ctx
@handle_errors
def list_cmd(c: Ctx, task: str | None, base: str | None, kind: str | None, limit: int | None, show_all: bool,
             sort: str | None, descending: bool, columns: list[str] | None, as_json: bool) -> None:
    """List adapter versions, newest first (or by a metric with --sort).

    A metric's current figure is its latest full-split row (see `adapterhub metrics`).

    Example: adapterhub list --task rt-sentiment --sort test_accuracy --desc --columns test_accuracy,test_n
    """
    if descending and sort is None:
        raise click.UsageError("--desc needs --sort METRIC")
    extra = list(dict.fromkeys([*([sort] if sort else []), *(columns or [])]))
    vs = c.ws.list_versions(task=task, base=base, kind=kind, limit=limit, include_deprecated=show_all, sort=sort,
                            descending=descending, columns=extra)
    output([v.to_json() for v in vs], as_json, _VERSION_COLUMNS + extra,
           ([*_version_row(v), *(_fmt_metric((v.metrics or {}).get(m)) for m in extra)] for v in vs))


def _fmt_metric(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@click.command("metrics")
@click.argument("ref", type=REF, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def metrics_cmd(c: Ctx, ref: str, as_json: bool) -> None:
    """The metric history of version REF, oldest first: every evaluation and training figure, never overwritten.

    `shown` marks the row `show`/`list` present (the latest full-split row per metric of the version
    itself); rows with source deployment:NAME are a deployment's figures, history only.

    Example: adapterhub metrics rt-sentiment@1 --json
    """
    from adapterhub.views.documents import metrics_document

    doc = metrics_document(c.ws, ref)
    output(doc, as_json, ["name", "value", "split", "n", "full", "source", "scorer", "data", "time", "shown"],
           ([r["name"], _fmt_metric(r["value"]), r["split"] or "", "" if r["n"] is None else r["n"],
             "yes" if r["full"] else "subset", r["source"], r["scorer"] or "", (r["dataset_hash"] or "")[:12],
             (r["created_at"] or "")[:19].replace("T", " "), "*" if r["shown"] else ""]
            for r in doc["history"]), title=f"metrics of {doc['ref']}", no_wrap=("scorer", "data", "time"))


@click.command("show")
@click.argument("ref", type=REF, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def show_cmd(c: Ctx, ref: str, as_json: bool) -> None:
    """Show everything the catalog knows about one version, with its direct parents.

    A deprecated version is flagged (a `deprecated` row, `"deprecated": true` and `deprecated_at` in --json).

    Example: adapterhub show rt-sentiment@prod
    """
    from adapterhub.views.documents import show_document

    doc = show_document(c.ws, ref)
    if as_json:
        print_json(doc)
        return
    info = c.ws.resolve(doc["ref"])
    rows = [("ref", info.ref), ("kind", info.kind), ("task", info.task), ("base", f"{info.base} ({info.base_fingerprint[:12]})"),
            ("content hash", info.content_hash), ("size", f"{info.size_bytes:,} bytes"),
            ("mask", f"{info.mask_method or '?'}, {info.granularity or '?'}"
                     + (f" b={info.block_size}" if info.block_size else "") + f", density {_fmt_density(info.density)}"),
            ("nnz", f"{info.nnz:,} ({info.dtype})"), ("targets", _short_list(info.target_modules)),
            ("tags", ", ".join(info.tags)), ("metrics", _kv(info.metrics)),
            ("created", doc["created_at"]),
            ("parents", "; ".join(f"{p['relation']} {p['parent'] or (p['params'] or {}).get('format', 'external')}"
                                  for p in doc["parents"]))]
    if info.hub_repo:
        rows.append(("hub", f"{info.hub_repo}@{info.hub_commit or ''} {info.hub_tag or ''}".strip()))
    title = info.ref
    if info.deprecated_at is not None:
        rows.insert(1, ("deprecated", f"since {doc['deprecated_at']}: hidden from `list` (shown by `list --all`), "
                                      f"still resolvable; `adapterhub deprecate --undo {info.ref}` reinstates it"))
        title = f"{info.ref} (deprecated)"
    output(doc, False, ["field", "value"], rows, title=title)


@click.command("log")
@click.argument("name", type=ADAPTER_NAME, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def log_cmd(c: Ctx, name: str, as_json: bool) -> None:
    """All versions of adapter NAME, oldest first.

    Example: adapterhub log rt-sentiment
    """
    vs = c.ws.log(name)
    output([v.to_json() for v in vs], as_json, _VERSION_COLUMNS, (_version_row(v) for v in vs))


@click.command("tag")
@click.argument("ref", type=REF, is_eager=True)
@click.argument("tag", type=TAG, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def tag_cmd(c: Ctx, ref: str, tag: str, as_json: bool) -> None:
    """Point TAG of the adapter at REF (moves it if it exists).

    Example: adapterhub tag rt-sentiment@3 prod
    """
    info = c.ws.tag(ref, tag)
    if as_json:
        print_json({"tag": f"{info.name}@{tag}", "ref": info.ref})
    else:
        echo(f"{info.name}@{tag} -> {info.ref}")


@click.command("untag")
@click.argument("name", type=ADAPTER_NAME, is_eager=True)
@click.argument("tag", type=TAG, is_eager=True)
@pass_ctx
@handle_errors
def untag_cmd(c: Ctx, name: str, tag: str) -> None:
    """Remove TAG from adapter NAME.

    Example: adapterhub untag rt-sentiment candidate
    """
    c.ws.untag(name, tag)
    echo(f"removed {name}@{tag}")


@click.command("lineage")
@click.argument("ref", type=REF, is_eager=True)
@click.option("--ancestors", "direction", flag_value="ancestors", default=True, help="Walk to parents (default).")
@click.option("--descendants", "direction", flag_value="descendants", help="Walk to children.")
@click.option("--format", "fmt_", type=click.Choice(LINEAGE_FORMATS), default="text", show_default=True,
              help="Output format.")
@click.option("--json", "as_json", is_flag=True, help="Same as --format json.")
@pass_ctx
@handle_errors
def lineage_cmd(c: Ctx, ref: str, direction: str, fmt_: str, as_json: bool) -> None:
    """All ancestors (or descendants) of REF, as a tree, JSON, Mermaid or Graphviz DOT.

    Example: adapterhub lineage merged-qa --format mermaid
    """
    from adapterhub.views.lineage import render

    if as_json and fmt_ not in ("text", "json"):
        raise click.UsageError("--json conflicts with --format " + fmt_)
    fmt_ = "json" if as_json else fmt_
    info = c.ws.resolve(ref)
    edges = c.ws.lineage(info.ref, direction=direction)
    if fmt_ == "json":  # one JSON document, strings exactly as stored (JSON escapes controls)
        click.echo(render(info.ref, edges, direction=direction, fmt=fmt_))
    else:  # labels come from catalog rows (and Hub cards): made terminal-safe before rendering
        echo(render(info.ref, safe_doc(edges), direction=direction, fmt=fmt_))


@click.command("diff")
@click.argument("ref_a", metavar="REF", type=REF, is_eager=True)
@click.argument("ref_b", metavar="REF", type=REF, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def diff_cmd(c: Ctx, ref_a: str, ref_b: str, as_json: bool) -> None:
    """Compare two versions per parameter: mask overlap (intersection, Jaccard) and value statistics.

    Example: adapterhub diff rt-sentiment@1 rt-sentiment@2
    """
    check_known(c, [ref_a, ref_b])
    from adapterhub.views.diff import diff_versions

    with phase_progress(as_json, "diff") as prog:  # an 8B adapter's 224 tensors take seconds
        d = diff_versions(c.ws, ref_a, ref_b, progress=prog)
    doc = d.to_json()

    def f(x: float | None) -> str:
        return "" if x is None else f"{x:.4g}"

    rows = [[p.name, p.nnz_a, p.nnz_b, p.intersection, f(p.jaccard), f(p.cosine), f(p.sign_agreement),
             f(p.mean_abs_diff)] for p in d.params]
    rows.append(["TOTAL", doc["total"]["nnz_a"], doc["total"]["nnz_b"], d.intersection, f(d.jaccard), "", "", ""])
    output(doc, as_json, ["param", "nnz A", "nnz B", "both", "jaccard", "cosine", "same sign", "mean |A-B|"],
           rows, title=f"{d.a} vs {d.b}")


@click.command("verify")
@click.argument("refs", nargs=-1, type=REF, is_eager=True)
@click.option("--repair", is_flag=True,
              help="First recover interrupted deployments and remove orphan blobs and temp files (adapterhub.repair).")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="With --repair: keep orphan blobs touched less than this long ago (safe next to writers).")
@json_option
@click.pass_context
@handle_errors
def verify_cmd(ctx: click.Context, refs: tuple[str, ...], repair: bool, grace_s: float, as_json: bool) -> None:
    """Re-hash the blobs of REFs (default: every version) and check catalog <-> store. Exit 1 on problems.

    Example: adapterhub verify            (after a crash: adapterhub verify --repair)
    """
    c: Ctx = ctx.obj
    if repair:
        if refs:
            raise click.UsageError("--repair works on the whole home; give no REF", ctx)
        from adapterhub.repair import repair as run_repair

        rep = run_repair(c.ws, grace_s=grace_s)
        if as_json:
            print_json(rep.to_json())
        else:
            for d in rep.recovered_deployments:
                echo(f"recovered deployment {d}")
            if rep.removed_blobs or rep.temp_files_removed:
                echo(f"removed {len(rep.removed_blobs)} orphan blob(s) ({rep.freed_bytes:,} bytes), "
                           f"{rep.temp_files_removed} temp file(s)")
            if rep.kept_recent_orphans:
                echo_err(f"kept {len(rep.kept_recent_orphans)} recent orphan blob(s) (--grace)")
            for p in rep.deployment_problems + rep.problems:
                echo(f"PROBLEM {p}")
            echo(f"checked {rep.checked} version(s): " + ("ok" if rep.ok else
                       f"{len(rep.problems) + len(rep.deployment_problems)} problem(s)"))
        if not rep.ok:
            ctx.exit(1)
        return
    with progress("verify") as bar:
        task = bar.add_task("verify", total=None, info="")
        from adapterhub.repair import verify as verify_home

        res = verify_home(c.ws, list(refs), on_progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        print_json(res)
    else:
        for p in res["problems"]:
            echo(f"PROBLEM {p}")
        if res["orphans"]:
            echo_err(f"{len(res['orphans'])} unreferenced blob(s); `adapterhub gc` removes them")
        echo(f"checked {res['checked']} version(s): "
                   + (f"{len(res['problems'])} problem(s)" if res["problems"] else "ok"))
    if res["problems"]:
        ctx.exit(1)


@click.command("gc")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option("--grace", "grace_s", type=click.FloatRange(min=0), default=0.0, show_default=True, metavar="SECONDS",
              help="Keep orphan blobs younger than this (gc already waits for in-flight registrations).")
@json_option
@pass_ctx
@handle_errors
def gc_cmd(c: Ctx, dry_run: bool, grace_s: float, as_json: bool) -> None:
    """Remove blobs no version references, and temp files of interrupted writes.

    Example: adapterhub gc --dry-run
    """
    from adapterhub.repair import gc as gc_home

    r = gc_home(c.ws, dry_run=dry_run, grace_s=grace_s)
    doc = {"removed": r.removed, "freed_bytes": r.freed_bytes, "temp_files_removed": r.temp_files_removed,
           "empty_folders_removed": r.empty_folders_removed, "kept_recent": r.kept_recent, "dry_run": dry_run}
    if as_json:
        print_json(doc)
    else:
        verb = "would remove" if dry_run else "removed"
        echo(f"{verb} {len(r.removed)} blob(s), {r.freed_bytes:,} bytes; {r.temp_files_removed} temp file(s)"
             + (f"; {r.empty_folders_removed} empty store folder(s)" if r.empty_folders_removed else ""))


@click.command("export")
@click.argument("ref", type=REF, is_eager=True)
@click.argument("out", type=click.Path())
@click.option("--format", "to", type=click.Choice(["safetensors", "peft"]), default="safetensors",
              show_default=True, help="safetensors: the adapter file; peft: a PEFT SHiRA adapter folder.")
@click.option("--drop-extras", is_flag=True,
              help="peft: leave out our dense extras (trained heads), written otherwise to adapterhub_extras.safetensors.")
@json_option
@pass_ctx
@handle_errors
def export_cmd(c: Ctx, ref: str, out: str, to: str, drop_extras: bool, as_json: bool) -> None:
    """Write REF to OUT as our .safetensors file or as a PEFT SHiRA folder (PeftModel.from_pretrained loads it).

    Example: adapterhub export rt-sentiment@prod ./rt-peft --format peft
    """
    from adapterhub.interop.export import export_version

    with phase_progress(as_json, "export") as prog:
        doc = export_version(c.ws, ref, out, to=to, drop_extras=drop_extras, progress=prog)
    if doc.get("dropped_extras"):
        echo_err(f"left out {len(doc['dropped_extras'])} extra(s): {', '.join(doc['dropped_extras'])}")
    if as_json:
        print_json(doc)
    else:
        echo(f"{doc['ref']} -> {doc['path']}" + (f" (+ {doc['extras_file']})" if doc.get("extras_file") else ""))


def _short_list(x: Any, n: int = 4) -> str:
    if not isinstance(x, list):
        return "" if x is None else str(x)
    return ", ".join(map(str, x[:n])) + (f" (+{len(x) - n} more)" if len(x) > n else "")


def _kv(d: Any) -> str:
    if not isinstance(d, dict) or not d:
        return ""
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(d.items()))


# The root group (cli/main.py) adds these; groups carry their own subcommands.
@click.command("deprecate")
@click.argument("ref", type=REF, is_eager=True)
@click.option("--undo", is_flag=True, help="Reinstate a deprecated version.")
@json_option
@pass_ctx
@handle_errors
def deprecate_cmd(c: Ctx, ref: str, undo: bool, as_json: bool) -> None:
    """Retire version REF: it stays resolvable by ref and hash, but `list` hides it (unless --all).

    Example: adapterhub deprecate rt-sentiment@1
    """
    info = c.ws.deprecate(ref, undo=undo)
    if as_json:
        print_json({"ref": info.ref, "content_hash": info.content_hash, "deprecated": not undo})
        return
    echo(f"{'reinstated' if undo else 'deprecated'} {info.ref}")


@click.command("rm")
@click.argument("ref", type=REF, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def rm_cmd(c: Ctx, ref: str, as_json: bool) -> None:
    """Remove version REF from the catalog (its file stays in the store until `gc`).

    Refused, naming what needs it, while a deployment's stack or history, a lineage edge (as the
    parent) or a tag refers to the version; `deprecate` is the normal way to retire one.

    Example: adapterhub rm rt-sentiment@1
    """
    info = c.ws.remove(ref)
    if as_json:
        print_json({"removed": info.ref, "content_hash": info.content_hash})
        return
    echo(f"removed {info.ref} (its file is freed by `adapterhub gc`)")


COMMANDS: tuple[click.Command, ...] = (init_cmd, db_group, base_group, register_cmd, list_cmd, show_cmd, log_cmd, tag_cmd,
                                      untag_cmd, lineage_cmd, diff_cmd, verify_cmd, gc_cmd, export_cmd,
                                      deprecate_cmd, rm_cmd, metrics_cmd)
