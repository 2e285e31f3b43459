"""``adapterhub tasks``, ``adapterhub train`` and ``adapterhub eval``: thin commands over
:mod:`adapterhub.data.tasks`, :mod:`adapterhub.training.loop` and :mod:`adapterhub.evaluation.scoring`."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from adapterhub.training.config import TrainConfig

from .common import (
    Ctx,
    check_one_of,
    echo,
    echo_err,
    handle_errors,
    json_option,
    output,
    pass_ctx,
    print_json,
    progress,
)
from .options import config_options
from .paramtypes import ADAPTER_NAME, BASE_NAME, DATASET, DEPLOYMENT_NAME, REF, TASK


def _progress_cb(bar: Any, task_id: Any) -> Callable[[int, int, dict[str, Any]], None]:
    """The library's training progress callback, drawn on ``bar``'s task ``task_id``."""
    def cb(step: int, total: int, info: dict[str, Any]) -> None:
        bar.update(task_id, completed=step, total=total,
                   info=f"loss {info['loss']:.4f}  {info['steps_per_s']:.2f} steps/s  [{info['phase']}]")
    return cb


@click.command("tasks")
@click.option("--text2text", is_flag=True, help="List the text-to-text (prompt -> response) tasks instead.")
@json_option
def tasks_cmd(text2text: bool, as_json: bool) -> None:
    """List the built-in offline tasks with their labels and split sizes.

    Example: adapterhub tasks --text2text --json
    """
    if text2text:
        from adapterhub.data.text2text import list_text2text_tasks

        t2t = list_text2text_tasks()
        tdoc = [{"name": s.name, "description": s.description, "generative": s.generative,
                 "answers": list(s.verbal), "rows": dict(s.rows),
                 "files": [{"package": f.package, "path": f.relpath, "sha256": f.sha256} for f in s.files]}
                for s in t2t]
        trows = [(s.name, "generative" if s.generative else "verbalised", s.rows["train"], s.rows["validation"],
                  s.rows["test"], s.description) for s in t2t]
        output(tdoc, as_json, ["task", "kind", "train", "validation", "test", "description"], trows,
               title="built-in text-to-text tasks")
        return
    from adapterhub.data import list_tasks

    specs = list_tasks()
    doc = [{"name": s.name, "description": s.description, "labels": list(s.labels), "rows": dict(s.rows),
            "files": [{"package": f.package, "path": f.relpath, "sha256": f.sha256} for f in s.files]}
           for s in specs]
    rows = [(s.name, len(s.labels), s.rows["train"], s.rows["validation"], s.rows["test"], s.description)
            for s in specs]
    output(doc, as_json, ["task", "labels", "train", "validation", "test", "description"], rows,
           title="built-in tasks")


@click.command("train")
@click.option("--base", required=True, type=BASE_NAME, is_eager=True, help="Base model name (see `adapterhub base list`).")
@click.option("--task", type=TASK, is_eager=True, default=None, help="Built-in task (see `adapterhub tasks`).")
@click.option("--dataset", type=DATASET, is_eager=True, default=None, help="csv:PATH, jsonl:PATH or hf:ID instead of --task.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--name", type=ADAPTER_NAME, is_eager=True, default=None, help="Adapter name (default <task>-<mask>).")
@click.option("--prompt-column", default=None, metavar="COLUMN",
              help="Text-to-text dataset: the prompt column (default prompt); makes --dataset prompt -> response.")
@click.option("--response-column", default=None, metavar="COLUMN",
              help="Text-to-text dataset: the response column (default response).")
@click.option("--chat-template/--no-chat-template", default=None,
              help="Text-to-text: lay prompts out with the base tokenizer's chat template (default: when it has one).")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=4096), default=32, show_default=True,
              help="Text-to-text: generation budget of the validation Rouge-L (recorded in the card).")
@check_one_of("task", "dataset")
@config_options(TrainConfig, into="cfg")
@json_option
@pass_ctx
@handle_errors
def train_cmd(c: Ctx, base: str, task: str | None, dataset: str | None, text_column: str, label_column: str,
              name: str | None, prompt_column: str | None, response_column: str | None, chat_template: bool | None,
              max_new_tokens: int, cfg: TrainConfig, as_json: bool) -> None:
    """Train a sparse adapter and register it as a new version; prints its ref.

    A text-to-text task (t2t-*, see `adapterhub tasks --text2text`) or a dataset with --prompt-column /
    --response-column trains a generative adapter on a causal LM: loss on the response tokens only, chat
    template when the base has one, validation Rouge-L and exact match.

    Runs on several GPUs or nodes with `accelerate launch -m adapterhub.cli.main train ...`.

    Example: adapterhub train --base minilm --task rt-sentiment --density 0.05 --steps 300
    """
    from adapterhub.data.text2text import is_text2text_task
    from adapterhub.training import init_distributed_from_env, train

    text2text = is_text2text_task(task) or prompt_column is not None or response_column is not None
    if not text2text and (chat_template is not None):
        raise click.UsageError("--chat-template applies to text-to-text training (a t2t-* task or --prompt-column)")
    init_distributed_from_env()
    with progress(transient=True) as bar:
        tid = bar.add_task(f"train {task or dataset}", total=None, info="loading")
        if text2text:
            from adapterhub.training.sft import train_sft

            info = train_sft(c.ws, base=base, task=task, dataset=dataset, name=name, config=cfg,
                             prompt_column=prompt_column or "prompt", response_column=response_column or "response",
                             chat_template=chat_template, max_new_tokens=max_new_tokens,
                             progress=_progress_cb(bar, tid))
        else:
            info = train(c.ws, base=base, task=task, dataset=dataset, name=name, config=cfg,
                         text_column=text_column, label_column=label_column, progress=_progress_cb(bar, tid))
    if info is None:  # a non-zero distributed rank: rank 0 reports
        return
    if as_json:
        print_json(info.to_json())
        return
    m = info.metrics or {}
    acc = m.get("validation_accuracy")
    if m.get("validation_rougeL") is not None:
        echo_err(f"trained {info.nnz} values ({info.density:.4g} of targets), validation Rouge-L "
                 f"{m['validation_rougeL']:.4f}, exact match {m.get('validation_exact_match', 0.0):.4f}")
        echo(info.ref)
        return
    echo_err(f"trained {info.nnz} values ({info.density:.4g} of targets), validation accuracy "
             f"{acc:.4f}" if acc is not None else f"trained {info.nnz} values")
    echo(info.ref)


@click.command("eval")
@click.argument("ref", required=False, type=REF, is_eager=True)
@click.option("--task", type=TASK, is_eager=True, default=None, help="Built-in task (default: the version's task).")
@click.option("--dataset", type=DATASET, is_eager=True, default=None, help="csv:PATH, jsonl:PATH or hf:ID.")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test", show_default=True)
@click.option("--deployment", type=DEPLOYMENT_NAME, is_eager=True, default=None, metavar="NAME",
              help="Evaluate a deployment's materialised weights (REF gives the head and labels).")
@click.option("--max-examples", type=click.IntRange(min=1), default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--prompt-column", default=None, metavar="COLUMN",
              help="Text-to-text dataset: the prompt column (default prompt); scores generations.")
@click.option("--response-column", default=None, metavar="COLUMN",
              help="Text-to-text dataset: the response column (default response).")
@click.option("--max-new-tokens", type=click.IntRange(min=1, max=4096), default=None,
              help="Text-to-text: generation budget (default: the adapter card's, else 32).")
@json_option
@pass_ctx
@handle_errors
def eval_cmd(c: Ctx, ref: str | None, task: str | None, dataset: str | None, text_column: str, label_column: str,
             split: str, deployment: str | None, max_examples: int | None, batch_size: int, max_length: int,
             device: str, prompt_column: str | None, response_column: str | None, max_new_tokens: int | None,
             as_json: bool) -> None:
    """Accuracy and loss of a version on a task split, recorded on the version.

    Text-to-text versions and tasks (t2t-*, or --prompt-column) are scored by greedy generation instead:
    Rouge-L and exact match, recorded as <split>_rougeL and <split>_exact_match.

    Example: adapterhub eval rt-sentiment-connection-sensitivity@1 --split test --json
    """
    if task is not None and dataset is not None:
        raise click.UsageError("give at most one of --task or --dataset")
    if ref is None and deployment is None:
        raise click.UsageError("give a REF (or --deployment NAME)")
    from adapterhub.evaluation import deployment_path, evaluate

    model_dir = deployment_path(c.ws, deployment) if deployment else None
    in_stack: bool | None = None
    note = ""
    if deployment and ref:
        # The score is the deployment's; REF only lends its head and labels unless it is in the stack.
        version = c.ws.resolve(ref)
        stack = c.ws.deployment_rows.get(deployment).stack
        in_stack = any(layer.get("version_id") == version.id for layer in stack)
        if not in_stack:
            shown = " > ".join(str(layer.get("ref")) for layer in stack) or "empty"
            note = f"{version.ref} is not in deployment {deployment}'s stack ({shown})"
            echo_err(f"note: {note}: the score is the deployment's, with {version.ref}'s head and labels; "
                     f"it is not recorded on {version.ref}")
    # rows scored / rows to score, as training shows steps; in a log, one line per ADAPTERHUB_PROGRESS_EVERY
    what = f"{split} split" + (f" of {task or dataset}" if task or dataset else "")
    from adapterhub.evaluation.generation import evaluate_text2text, wants_generation

    if wants_generation(c.ws, ref, task, dataset, prompt_column or response_column):
        with progress(transient=True) as bar:
            tid = bar.add_task(f"eval {ref or deployment}", total=None, info=f"{what}  [loading]")

            def gcb(done: int, total: int, info: dict[str, Any]) -> None:
                bar.update(tid, completed=done, total=total, info=f"{what}  [{info['phase']}]")

            g = evaluate_text2text(c.ws, ref, task=task, dataset=dataset, split=split, model_dir=model_dir,
                                   prompt_column=prompt_column or "prompt", response_column=response_column or "response",
                                   batch_size=batch_size, max_examples=max_examples, max_length=max(max_length, 256),
                                   max_new_tokens=max_new_tokens, device=device, deployment=deployment,
                                   record=in_stack is not False, progress=gcb)
        gdoc = g.to_json()
        gdoc["deployment"] = deployment
        if in_stack is not None:
            gdoc["in_stack"] = in_stack
        output(gdoc, as_json, ["ref", "task", "split", "rougeL", "exact_match", "n"],
               [(g.ref or deployment or "-", g.task, g.split, f"{g.rougeL:.4f}", f"{g.exact_match:.4f}", g.n)],
               title=f"generation{' by deployment ' + deployment if deployment else ''}{': ' + note if note else ''}")
        return
    with progress(transient=True) as bar:
        tid = bar.add_task(f"eval {ref or deployment}", total=None, info=f"{what}  [loading]")

        def cb(done: int, total: int, info: dict[str, Any]) -> None:
            bar.update(tid, completed=done, total=total, info=f"{what}  [{info['phase']}]")

        res = evaluate(c.ws, ref, task=task, dataset=dataset, split=split, model_dir=model_dir,
                       text_column=text_column, label_column=label_column, batch_size=batch_size,
                       max_examples=max_examples, max_length=max_length, device=device,
                       deployment=deployment, record=in_stack is not False, progress=cb)
    doc = res.to_json()
    doc["deployment"] = deployment
    if in_stack is not None:
        doc["in_stack"] = in_stack
    shown_ref = res.ref or "-"
    if in_stack is False:
        shown_ref = f"{deployment} (head of {res.ref}, not in its stack)"
    output(doc, as_json, ["ref", "task", "split", "accuracy", "loss", "n"],
           [(shown_ref, res.task, res.split, f"{res.accuracy:.4f}", f"{res.loss:.4f}", res.n)],
           title=f"evaluation{' of deployment ' + deployment if deployment else ''}{': ' + note if note else ''}")


# The root group (cli/main.py) adds these.
COMMANDS: tuple[click.Command, ...] = (tasks_cmd, train_cmd, eval_cmd)
