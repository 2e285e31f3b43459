"""``adapterhub demo``: the main job end to end on the offline defaults."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import click

from .common import Ctx, echo, handle_errors, json_option, pass_ctx, print_json, print_table, rich_safe


@click.command("demo")
@click.option("--steps", type=click.IntRange(1), default=100, show_default=True, help="Training steps per expert.")
@click.option("--density", type=click.FloatRange(0, 1, min_open=True), default=0.05, show_default=True,
              help="Density of each sparse expert.")
@click.option("--eval-examples", type=click.IntRange(1), default=200, show_default=True,
              help="Test examples per evaluation.")
@click.option("--base-source", default="minilm", show_default=True,
              help="Base model: 'minilm' (shipped) or a local Hugging Face folder.")
@click.option("--fresh/--reuse", default=True, show_default=True,
              help="Refuse to run in a home that already has a catalog (--fresh) or reuse it.")
@json_option
@pass_ctx
@handle_errors
def demo_cmd(c: Ctx, steps: int, density: float, eval_examples: int, base_source: str, fresh: bool,
             as_json: bool) -> None:
    """Train four sparse experts, merge them, deploy, unlearn a class with FUSED, revert exactly.

    Everything runs offline on the CPU in a few minutes and leaves a real catalog in the home
    directory; the summary is printed and written to <home>/demo/summary.json and summary.png.

    Example: adapterhub --home ./demo-home demo
    """
    from adapterhub.demo import DemoConfig, browse_command, run_demo, summary_rows

    home = Path(c.home) if c.home else None
    if fresh and home is not None and (home / "catalog.db").exists():
        raise click.UsageError(f"{home} already holds a catalog; pass another --home or --reuse")
    cfg = DemoConfig(base_source=base_source, steps=steps, density=density, eval_examples=eval_examples)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        def bar(desc: str) -> Callable[[int, int], None]:
            tid = prog.add_task(rich_safe(desc), total=None)

            def cb(done: int, total: int) -> None:
                prog.update(tid, completed=done, total=total)
            return cb

        report = run_demo(c.ws, cfg, step=lambda t: console.print(f"[bold]•[/] {rich_safe(t)}"), progress=bar)
    if as_json:
        print_json(report.to_json())
        return
    print_table(["what", "ref", "figure", "value"], summary_rows(report), title="adapterhub demo summary")
    echo(f"report: {Path(report.home) / 'demo' / 'summary.json'} and summary.png")
    echo(f"browse the catalog: {browse_command(report)}  (then open http://127.0.0.1:8765/)")


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (demo_cmd,)
