"""``adapterhub merge`` and ``adapterhub deploy ...``: thin commands over adapterhub.merging.methods and
adapterhub.apply.deployments. Only the commands that patch weights (apply, revert, rollback) import that module,
and torch with it; the others use its torch-free parts (adapterhub.apply.deploy_ownership, deploy_folders)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import click

from .common import (
    Ctx,
    LazyChoice,
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
)
from .options import values_dtype_option
from .paramtypes import ADAPTER_NAME, BASE_NAME, DEPLOYMENT_NAME, REF, FiniteFloat, WeightsType

if TYPE_CHECKING:
    from adapterhub.catalog.deployments import DeploymentInfo


def _method_names() -> list[str]:
    from adapterhub.merging import method_names

    return method_names()


def _two_or_more(ctx: click.Context, param: click.Parameter, refs: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse a single REF while parsing (REFS is eager: before ``--method`` loads its torch registry)."""
    if len(refs) == 1 and not ctx.resilient_parsing:
        raise click.BadParameter("merge needs at least two REFs", ctx, param)
    return refs


@click.command("merge")
@click.argument("refs", nargs=-1, required=True, type=REF, is_eager=True, callback=_two_or_more)
@click.option("--method", "-m", type=LazyChoice(_method_names), required=True, help="Merge method.")
@click.option("--weights", type=WeightsType(), default=None, help="One weight per REF, comma-separated.")
@click.option("--lambda", "lam", type=float, default=None, help="Scaling lambda (task-arithmetic, ties, dare-*, breadcrumbs).")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=None,
              help="Fraction kept per expert (ties, breadcrumbs: of its entries; dare-*: keep probability).")
@click.option("--seed", type=int, default=None, help="Seed of the DARE random drop.")
@click.option("--name", required=True, type=ADAPTER_NAME, is_eager=True, help="Name of the merged adapter.")
@values_dtype_option("Dtype of the merged values (recorded in the card); default: the experts' promoted dtype.")
@json_option
@pass_ctx
@handle_errors
def merge_cmd(c: Ctx, refs: tuple[str, ...], method: str, weights: list[float] | None, lam: float | None,
              density: float | None, seed: int | None, name: str, values_dtype: str | None, as_json: bool) -> None:
    """Merge experts in sparse space into a new `merge` version with merged_from lineage.

    Example: adapterhub merge rt-sentiment@2 sms-spam trec --method uniform-sparse --name multi
    """
    if len(refs) < 2:
        raise click.UsageError("merge needs at least two REFs")
    if weights is not None and len(weights) != len(refs):
        raise click.UsageError(f"--weights has {len(weights)} values for {len(refs)} REFs")
    check_known(c, refs)
    from adapterhub.merging import merge

    with progress("merging") as prog:
        task = prog.add_task("merging", total=None, info="")

        def tick(done: int, total: int) -> None:
            prog.update(task, total=total, completed=done)

        info = merge(c.ws, list(refs), method, weights=weights, lam=lam, density=density, seed=seed, name=name,
                     progress=tick, values_dtype=values_dtype)
    doc = info.to_json()
    doc["merged_from"] = list(refs)
    output(doc, as_json, ["ref", "kind", "method", "nnz", "content hash"],
           [[info.ref, info.kind, method, info.nnz, info.content_hash[:16]]], title="merged")


@click.group("deploy")
def deploy_group() -> None:
    """Materialised model folders with adapters applied and reverted exactly, in place on disk."""


@deploy_group.command("create")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@click.option("--base", required=True, type=BASE_NAME, is_eager=True, help="Registered base model name.")
@click.option("--path", "path", type=click.Path(file_okay=False), default=None,
              help="Target folder (default: <home>/deployments/NAME).")
@json_option
@pass_ctx
@handle_errors
def deploy_create(c: Ctx, name: str, base: str, path: str | None, as_json: bool) -> None:
    """Create deployment NAME: a Hugging Face folder copied from base B.

    Example: adapterhub deploy create prod --base minilm
    """
    from adapterhub.apply import deploy_folders

    with phase_progress(as_json, "deployment") as prog:
        info = deploy_folders.create(c.ws, name, base, path, progress=prog)
    _show(info, as_json)


def _show(info: DeploymentInfo, as_json: bool) -> None:
    """Print one deployment (a note on stderr first when the command recovered it)."""
    if info.recovered:
        echo_err(f"recovered deployment {info.name} from an interrupted operation")
    from adapterhub.apply.state import short_root

    output(info.to_json(), as_json, ["deployment", "base", "stack", "state", "path"],
           [[info.name, info.base, " > ".join(f"{l['ref']}x{l['scale']:g}" if l["scale"] != 1 else l["ref"]
                                               for l in info.stack) or "-",
             short_root(info.state, 16), str(info.path)]])


@deploy_group.command("list")
@json_option
@pass_ctx
@handle_errors
def deploy_list(c: Ctx, as_json: bool) -> None:
    """List deployments.

    Example: adapterhub deploy list --json
    """
    from adapterhub.apply import deploy_ownership
    from adapterhub.apply.state import short_root

    infos = deploy_ownership.list_deployments(c.ws)
    output([i.to_json() for i in infos], as_json, ["deployment", "base", "stack", "events", "state", "path"],
           [[i.name, i.base, " > ".join(l["ref"] for l in i.stack) or "-", i.events, short_root(i.state, 16), str(i.path)]
            for i in infos])


@deploy_group.command("apply")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@click.argument("ref", type=REF, is_eager=True)
@click.option("--scale", type=FiniteFloat(), default=1.0, show_default=True,
              help="Multiply the adapter's values (a finite number).")
@json_option
@pass_ctx
@handle_errors
def deploy_apply(c: Ctx, name: str, ref: str, scale: float, as_json: bool) -> None:
    """Apply adapter REF on top of deployment NAME (patched in place, crash-safe).

    Example: adapterhub deploy apply prod rt-sentiment@2 --scale 0.5
    """
    check_known(c, [ref], deployment=name)
    from adapterhub.apply import deployments

    with phase_progress(as_json, "deployment") as prog:
        info = deployments.apply(c.ws, name, ref, scale, progress=prog)
    _show(info, as_json)


@deploy_group.command("revert")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@click.argument("ref", required=False, type=REF, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def deploy_revert(c: Ctx, name: str, ref: str | None, as_json: bool) -> None:
    """Revert the top adapter, or REF wherever it is in the stack (those above are re-applied).

    Example: adapterhub deploy revert prod rt-sentiment@2
    """
    check_known(c, [ref] if ref is not None else [], deployment=name)
    from adapterhub.apply import deployments

    with phase_progress(as_json, "deployment") as prog:
        info = deployments.revert(c.ws, name, ref, progress=prog)
    _show(info, as_json)


@deploy_group.command("rm")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@click.option("--keep-files", is_flag=True,
              help="Keep the model files (a plain Hugging Face folder in the last state); delete only adapterhub's "
                   "control folder and the catalog's record.")
@json_option
@pass_ctx
@handle_errors
def deploy_rm(c: Ctx, name: str, keep_files: bool, as_json: bool) -> None:
    """Remove deployment NAME: its record and history, and its folder (all of it, unless --keep-files).

    Only the home that created it may remove it, and only while no other command works on it. The versions
    in its stack and history can then be removed with `adapterhub rm`.

    Example: adapterhub deploy rm staging
    """
    from adapterhub.apply import deploy_folders

    r = deploy_folders.remove(c.ws, name, keep_files=keep_files)
    if as_json:
        print_json(r.to_json())
        return
    what = {"deleted": f"deleted {r.info.path}", "kept": f"its model files stay in {r.info.path}",
            "already gone": f"its folder {r.info.path} was already gone"}[r.folder]
    echo(f"removed deployment {r.info.name} ({what})")


@deploy_group.command("rollback")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@click.option("--to", "to", type=click.IntRange(min=0), required=True, help="Event number (see `deploy history`).")
@click.option("--verify", "verify", is_flag=True,
              help="Measure: hash every weight byte before and after (slower; the event records a measured state).")
@json_option
@pass_ctx
@handle_errors
def deploy_rollback(c: Ctx, name: str, to: int, verify: bool, as_json: bool) -> None:
    """Restore deployment NAME exactly to its state after event EVENT.

    Example: adapterhub deploy rollback prod --to 3 --verify
    """
    check_known(c, deployment=name)
    from adapterhub.apply import deployments

    with phase_progress(as_json, "deployment") as prog:
        info = deployments.rollback(c.ws, name, to, verify=verify, progress=prog)
    _show(info, as_json)


@deploy_group.command("history")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def deploy_history(c: Ctx, name: str, as_json: bool) -> None:
    """Events of deployment NAME: event, action, adapter ref and hash, forget spec, state root, time.

    A state marked * was derived from the previous one and the chunks the operation touched; the others were
    measured (every weight byte hashed: create, --verify). --json has both as "state_root" and "measured".

    Example: adapterhub deploy history prod --json
    """
    from adapterhub.apply import deploy_ownership
    from adapterhub.apply.state import short_root

    evs = deploy_ownership.history(c.ws, name)
    output([e.to_json() for e in evs], as_json,
           ["event", "action", "ref", "adapter hash", "forget", "scale", "state", "stack", "time"],
           [[e.seq, e.action, e.ref or (f"to {e.details['to']}" if "to" in e.details else ""),
             (e.content_hash or "")[:12], e.forget or "", "" if e.scale is None else f"{e.scale:g}",
             short_root(e.state) + ("" if e.measured else "*"), " > ".join(l["ref"] for l in e.stack) or "-",
             _when(e.created_at)] for e in evs],
           no_wrap=("adapter hash", "state", "ref", "forget", "time"))


def _when(t: object) -> str:
    """A history time for the table, to the second (``--json`` has the full ISO time)."""
    import datetime as dt

    return t.strftime("%Y-%m-%d %H:%M:%S") if isinstance(t, dt.datetime) else str(t)


@deploy_group.command("verify")
@click.argument("name", type=DEPLOYMENT_NAME, is_eager=True)
@json_option
@pass_ctx
@handle_errors
def deploy_verify(c: Ctx, name: str, as_json: bool) -> None:
    """Check NAME: weights match the recorded state, undo records intact (exit 1 if not).

    Example: adapterhub deploy verify prod
    """
    from adapterhub.apply import deploy_folders
    from adapterhub.apply.state import short_root

    with phase_progress(as_json, "deployment") as prog:
        r = deploy_folders.verify(c.ws, name, progress=prog)
    if as_json:
        print_json(r)
    else:
        output(r, False, ["deployment", "ok", "expected", "actual"],
               [[r["name"], "yes" if r["ok"] else "NO", short_root(r["expected"], 16),
                 short_root(str(r["actual"]), 16)]])
    if not r["ok"]:
        why = deploy_folders.why_not_ok(r)
        if r.get("pending_recovery") and not r.get("problems"):  # the library does not name commands
            why += "; run `adapterhub verify --repair`"
        raise click.ClickException(f"deployment {name} does not verify: {why}")


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (merge_cmd, deploy_group)
