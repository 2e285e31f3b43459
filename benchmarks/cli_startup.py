"""What a command costs through the CLI when it moves or checks adapter files but computes with no tensor.

``register`` and ``pull`` of an adapterhub file, ``push``, ``hub versions`` and ``export`` to our own format validate,
hash, copy or send bytes; importing torch (about a second here) was most of their wall time. Each command runs in a
fresh process (``python -m adapterhub.cli.main``, the ``adapterhub`` script's code), start-up included, against
the project's Hub-protocol test server on 127.0.0.1 (``pull``/``push``). Anchors measured in the same run: the bare
start-up (``adapterhub --version``) and ``python -c "import torch"``. With ``--compare REV`` the same commands
also run on that commit (a temporary ``git worktree``), alternating with this checkout, for a before/after table.

Per command: median wall time of ``--repeat`` runs, whether the process imported torch (one extra run with
``-X importtime``), and the ratio to the bare start-up. Adapters: the 0.5 MB and 4.3 MB bf16 adapters of the 135M
shapes that ``benchmarks/scale.py`` builds (made here if missing, under ``--work``).

Usage:  .venv/bin/python benchmarks/cli_startup.py [--work /tmp/adapterhub-scale] [--repeat 5] [--compare REV]
        [--md docs/bench/cli_startup.md] [--json docs/bench/cli_startup.json]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

PY = sys.executable
FILES = {"0.5 MB": "0.001", "4.3 MB": "0.01"}


def _env(code_root: Path, hub_url: str, hf_home: Path) -> dict[str, str]:
    env = dict(os.environ, HF_ENDPOINT=hub_url, HF_HOME=str(hf_home), HF_HUB_DISABLE_XET="1",
               PYTHONPATH=str(code_root))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled modules cached
    return env


def _run(env: dict[str, str], home: Path, *args: str, importtime: bool = False) -> tuple[float, bool]:
    """(wall seconds, whether torch was imported) of one command in a fresh process."""
    cmd = [PY, *(["-X", "importtime"] if importtime else []), "-m", "adapterhub.cli.main", "--home", str(home), *args]
    t0 = time.perf_counter()
    # run outside any checkout: ``python -m`` puts the working directory first on sys.path
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, cwd=home.parent)
    dt = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()[-400:]}")
    torch_in = importtime and any(re.search(r"\|\s+torch$", line.rstrip()) for line in r.stderr.splitlines())
    return dt, torch_in


def _worktree(rev: str, where: Path) -> Path:
    """A checkout of ``rev`` whose ``adapterhub.cli`` resolves inside it (a link to its ``cli/``)."""
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(where), rev], check=True)
    (where / "adapterhub" / "cli").symlink_to("../cli")
    return where


def measure(work: Path, repeat: int, compare: str | None) -> dict[str, Any]:
    import scale
    from adapterhub.testing.hubserver import HubServer

    cfg = scale.prepare(work, "135m")
    files = {label: Path(cfg["register_file"][key]) for label, key in FILES.items()}
    tmp = Path(tempfile.mkdtemp(dir=work))
    sides = {"this": ROOT}
    if compare:
        sides["before"] = _worktree(compare, tmp / "before")
    server = HubServer(record_bodies=False).start()
    try:
        envs = {s: _env(root, server.url, tmp / f"hf-{s}") for s, root in sides.items()}
        template = tmp / "template"
        _run(envs["this"], template, "base", "add", "b", cfg["base"])
        homes: dict[str, Path] = {}
        for s in sides:
            homes[s] = tmp / f"home-{s}"
            shutil.copytree(template, homes[s])
            _run(envs[s], homes[s], "register", str(files["4.3 MB"]), "--name", "x", "--task", "t", "--base", "b")
        n = {s: 0 for s in sides}

        def commands(s: str) -> dict[str, tuple[Path, tuple[str, ...]]]:
            """The commands of one round on side ``s``, each with the home it runs in (fresh names: each run does
            the whole work; the pull goes to a new home without the adapter)."""
            n[s] += 1
            i, h = n[s], homes[s]
            fresh = tmp / f"pull-{s}-{i}"
            shutil.copytree(template, fresh)
            return {
                "`adapterhub --version` (bare start-up)": (h, ("--version",)),
                **{f"`register` ({label})": (h, ("register", str(f), "--name", f"r{i}-{label[0]}", "--task", "t",
                                                 "--base", "b")) for label, f in files.items()},
                "`push` (4.3 MB, new repo)": (h, ("push", "x@1", "--repo", f"u/{s}-{i}")),
                "`pull` (4.3 MB, a home without it)": (fresh, ("pull", f"u/{s}-{i}@v1", "--name", "p")),
                "`hub versions`": (h, ("hub", "versions", f"u/{s}-{i}")),
                "`export` (our file, 4.3 MB)": (h, ("export", "x@1", str(tmp / f"e-{s}-{i}.safetensors"))),
                "`export --format peft` (4.3 MB)": (h, ("export", "x@1", str(tmp / f"p-{s}-{i}"), "--format", "peft")),
                "`list`": (h, ("list",)),
            }

        times: dict[str, dict[str, list[float]]] = {}
        torch_in: dict[str, dict[str, bool]] = {}
        for s in sides:  # warm-up round (compiles the modules' bytecode), recording which commands import torch
            for label, (home, args) in commands(s).items():
                torch_in.setdefault(label, {})[s] = _run(envs[s], home, *args, importtime=True)[1]
        for r in range(repeat):
            for s in (list(sides) if r % 2 == 0 else list(reversed(sides))):
                for label, (home, args) in commands(s).items():
                    times.setdefault(label, {}).setdefault(s, []).append(_run(envs[s], home, *args)[0])
        t_torch = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run([PY, "-c", "import torch"], check=True, env=envs["this"], cwd=tmp)
            t_torch.append(time.perf_counter() - t0)
    finally:
        server.stop()
        if compare:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(sides["before"])], check=False)
        shutil.rmtree(tmp, ignore_errors=True)
    med = {label: {s: statistics.median(v) for s, v in per.items()} for label, per in times.items()}
    return {"repeat": repeat, "compare": compare, "python_import_torch_s": statistics.median(t_torch),
            "commands": {label: {"seconds": med[label], "imports_torch": torch_in[label]} for label in med},
            "load_average_at_end": list(os.getloadavg())}


def fragment(doc: dict[str, Any], command: str) -> str:
    cmds = doc["commands"]
    bare = cmds["`adapterhub --version` (bare start-up)"]["seconds"]["this"]
    before = doc["compare"] is not None
    head = "| command | " + ("before (s) | torch before | " if before else "") + \
        "now (s) | torch now | now ÷ bare start-up |" + (" now ÷ before |" if before else "")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for label, c in cmds.items():
        s, t = c["seconds"], c["imports_torch"]
        cells = [label]
        if before:
            cells += [f"{s['before']:.2f}", "yes" if t["before"] else "no"]
        cells += [f"{s['this']:.2f}", "yes" if t["this"] else "no", f"{s['this'] / bare:.2f}×"]
        if before:
            cells.append(f"{s['this'] / s['before']:.2f}×")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join([
        "# Commands that move adapter files, through the CLI (`benchmarks/cli_startup.py`)", "",
        f"Command: `{command}` (figures: `docs/bench/cli_startup.json`). Each command in a fresh process "
        "(`python -m adapterhub.cli.main`, what the `adapterhub` script runs), start-up included, modules' "
        "bytecode cached as after an install; `push`/`pull` against the project's Hub-protocol test server on "
        f"127.0.0.1. Medians of {doc['repeat']} runs"
        + (f", alternating with the commit before this round's changes (`{doc['compare']}`, a temporary git "
           "worktree)" if before else "") +
        f". Anchors in the same run: the bare start-up (`adapterhub --version`, {bare:.2f} s) and "
        f"`python -c \"import torch\"` ({doc['python_import_torch_s']:.2f} s).", "",
        *rows, "",
        "`register` and `pull` of an adapterhub file validate it on numpy views of its bytes (gap coding, escapes, "
        "ranges, finite values, dense extras) and store those very bytes; `push` sends the store's blob and a card "
        "built from the catalog; `export` to our format copies the verified blob. None of them computes with a "
        "tensor, and none imports torch any more: `adapterhub.format` imports it on the first use of a tensor, "
        "`hub.client` imports the format only to parse a pull, and the CLI's `register FILE` goes through "
        "`Workspace.register(path)` (the scan) instead of a full decode. `export --format peft` decodes the "
        "adapter (PEFT's COO coordinates, one layer at a time) and imports torch; most of its time is "
        "`transformers` building the base architecture on the meta device to check that every target is an "
        "`nn.Linear` (it no longer imports `peft` for its version string: the installed package's metadata "
        "gives it).", ""])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "adapterhub-scale")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compare", help="a commit to measure the same commands on, alternating (before/after)")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "bench" / "cli_startup.md")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "bench" / "cli_startup.json")
    ap.add_argument("--md-only", action="store_true", help="only rewrite --md from the existing --json")
    a = ap.parse_args()
    if a.md_only:
        doc = json.loads(a.json.read_text())
    else:
        a.work.mkdir(parents=True, exist_ok=True)
        doc = measure(a.work, a.repeat, a.compare)
        a.json.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    command = ".venv/bin/python benchmarks/cli_startup.py" + \
        (f" --repeat {doc['repeat']}" if doc["repeat"] != 5 else "") + (f" --compare {doc['compare']}" if doc["compare"] else "")
    text = fragment(doc, command)
    a.md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
