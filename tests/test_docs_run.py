"""The docs run: every shell line of ``docs/tour.md`` and of ``docs/guide.md`` is executed, in order, through
the real CLI, and every ``adapterhub`` line of every doc is accepted by the CLI's parser.

The guide's lines (its PEFT-user section, "The same from the command line") run the same way as the tour's,
in a fresh home; the guide's Python blocks then run, as written, against the home the lines made
(:func:`test_guide_command_blocks_run`). :func:`test_every_documented_command_line_parses` checks the lines
that need data no test has (``rt.safetensors``, ``qa-merge``) as far as a parser can: command, options and
every value's type.

The test reads the ```` ```bash ```` blocks of the tour, and runs each ``adapterhub …`` line with the
click app (``CliRunner``, the same entry point as the ``adapterhub`` script) in a fresh home
(``ADAPTERHUB_HOME``, as the tour's ``export`` line sets it) and a fresh working directory. The docs
keep their real numbers; the test shrinks them itself with :data:`SMALL` (nothing in the environment
overrides a flag) and points the Hub lines at the local Hub server (fixture ``hub_server``, which sets
``HF_ENDPOINT``). Each line must exit 0 and print what its comment claims where that is checkable
(:data:`CLAIMS`).

The fast variant (``[tiny]``, about 2 minutes on two shared CPU cores) registers a tiny random BERT
under the tour's base name ``minilm`` instead of the built-in MiniLM; every other word of every line is
the doc's (a second home gets the tiny base before its ``pull``, as the built-in one would be added by
the pull itself). The full variant (``[minilm]``, the doc's own base, marked ``slow``: 7 minutes
on two shared CPU cores) runs the lines exactly as written, with the small step counts. Lines that need what a test cannot have are listed in :data:`SKIP` with the reason.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from adapterhub.cli.main import cli
from adapterhub.testing.hubserver import HubServer
from adapterhub.training.config import TrainConfig

DOCS = Path(__file__).resolve().parent.parent / "docs"

#: the doc's flag value -> the test's (the docs show the real numbers)
SMALL = {
    "--steps": "6",
    "--max-length": "24",
    "--clients": "2",
    "--rounds": "1",
    "--local-steps": "2",
    "--max-test": "40",
}
#: lines the test does not run, by their first words, and why
SKIP = {
    "make venv": "the test already runs in the venv",
    "export ADAPTERHUB_HOME": "the test sets ADAPTERHUB_HOME to a fresh home itself",
    "export HF_TOKEN": "the test Hub server takes the test's token (set by the test)",
    "export ADAPTERHUB_DB_URL": "no PostgreSQL server in the test; `db upgrade` then runs on SQLite",
}
#: a line's first words -> text its output must contain (what its comment claims)
CLAIMS = {
    "adapterhub tasks": ["rt-sentiment", "sms-spam", "trec-coarse"],
    "adapterhub list": ["rt@1", "spam@1"],
    "adapterhub show rt@1 --json": [],
    "adapterhub show rt@1": ["connection-sensitivity", "nnz", "targets", "test_accuracy", "content hash"],
    "adapterhub show rt@prod": ["rt@1"],
    "adapterhub diff": ["jaccard"],
    "adapterhub lineage rt-spam --format mermaid": ["rt@1", "spam@1"],
    "adapterhub deploy history prod": ["rt-spam@1"],
    "adapterhub deploy rm fed": ["removed deployment fed", "deleted"],
    "adapterhub hub versions": ["v1"],
}


def tour_lines(path: Path) -> list[tuple[str, str]]:
    """``(command, comment)`` of every command of the shell blocks of ``path``, in order: every line of a
    ```` ```bash ```` (or ``sh``/``shell``) block, and the ``$ `` lines of a ```` ```console ```` block (the
    others are its output). A line ending in ``\\`` continues on the next; ``  # `` starts a comment."""
    out = []
    for lang, block in re.findall(r"^ *```(bash|sh|shell|console)\n(.*?)^ *```", path.read_text(encoding="utf-8"),
                                  flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            raw = raw.strip()
            if lang == "console" and not pending:
                if not raw.startswith("$ "):
                    continue  # output shown under a command
                raw = raw[2:]
            if raw.endswith("\\"):
                pending += raw[:-1] + " "
                continue
            raw, pending = pending + raw, ""
            command, *rest = re.split(r"\s+#\s", raw, maxsplit=1)
            command, comment = command.strip(), (rest[0].strip() if rest else "")
            if command and not command.startswith("#"):
                out.append((command, comment))
    return out


def shrink(args: list[str]) -> list[str]:
    """``args`` with the values of the flags in :data:`SMALL` replaced."""
    out = list(args)
    for i, word in enumerate(out[:-1]):
        if word in SMALL:
            out[i + 1] = SMALL[word]
    return out


def test_small_step_counts_need_no_schedule_flags() -> None:
    """``--steps 40`` just works: unset warm-up / reselection steps scale with the run's length."""
    assert TrainConfig().select_steps is None and TrainConfig().reselect_every is None
    assert (TrainConfig(steps=40).scheduled(40).select_steps, TrainConfig().scheduled(40).reselect_every) == (10, 10)
    assert TrainConfig().scheduled(6).select_steps == 1 and TrainConfig().scheduled(2).select_steps == 1
    assert TrainConfig().scheduled(400).select_steps == 100 and TrainConfig().scheduled(5000).reselect_every == 100
    # runs longer than 100 steps keep the recipe (and bytes) every recorded figure used: 100, not a quarter
    assert TrainConfig().scheduled(101).select_steps == 100 and TrainConfig().scheduled(300).reselect_every == 100
    assert TrainConfig().scheduled(100).select_steps == 25
    kept = TrainConfig(select_steps=7, reselect_every=0).scheduled(40)
    assert (kept.select_steps, kept.reselect_every) == (7, 0)  # explicit values are kept


@pytest.fixture(scope="module")
def tour_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BERT like ``tiny_bert_dir`` but with 512 positions: ``eval``'s default
    ``--max-length 128`` must fit, as it does on MiniLM."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    dest = tmp_path_factory.mktemp("tour_base") / "model"
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=512)).save_pretrained(dest, safe_serialization=True)
    return dest


def run_lines(lines: list[tuple[str, str]], claims: dict[str, list[str]], base: str, tour_base: Path,
              doc: str) -> int:
    """Run ``lines`` (from :func:`tour_lines`) in order through the click app; returns how many ran.

    Each must exit 0 and its output contain what ``claims`` lists for its first words. Lines of
    :data:`SKIP` are not run; flags of :data:`SMALL` are shrunk; with ``base == "tiny"`` the base
    ``minilm`` is the tiny random BERT ``tour_base``."""
    runner = CliRunner()
    ran = 0
    for command, _comment in lines:
        if any(command.startswith(k) for k in SKIP):
            continue
        argv = shlex.split(command)
        assert argv[0] == "adapterhub", f"{doc} has a line the test cannot run: {command}"
        args = shrink(argv[1:])
        if base == "tiny" and args[:3] == ["base", "add", "minilm"]:
            args = ["base", "add", "minilm", str(tour_base)]  # the fast variant's tiny base
        if base == "tiny" and args[0] == "--home" and args[2] == "pull":  # a built-in base comes with the pull; the tiny one cannot
            added = runner.invoke(cli, ["--home", args[1], "base", "add", "minilm", str(tour_base)])
            assert added.exit_code == 0, added.output
        out_file = None
        if ">" in args:
            out_file = args[args.index(">") + 1]
            args = args[:args.index(">")]
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, f"{doc}: {command}\n{result.output}\n{result.exception!r}"
        if out_file:
            Path(out_file).write_text(result.stdout)
            written = json.loads(Path(out_file).read_text())
            assert {"mask", "training_config", "metrics", "content_hash"} <= set(written), command
            assert written["mask"]["nnz"] > 0 and written["training_config"]["steps"] == 6
            # no --select-steps/--reselect-every on the line: the schedule scaled to the 6 steps, as recorded
            assert (written["training_config"]["select_steps"], written["training_config"]["reselect_every"]) == (1, 1)
        for prefix, needles in claims.items():
            if command.startswith(prefix):
                for needle in needles:
                    assert needle.lower() in result.output.lower(), f"{command}: {needle!r} not in\n{result.output}"
                break
        ran += 1
    return ran


def _fresh_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, home: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / home))
    monkeypatch.setenv("HF_TOKEN", "hf_tourTestToken0123456789")
    monkeypatch.delenv("ADAPTERHUB_DB_URL", raising=False)
    monkeypatch.delenv("ADAPTERHUB_PROGRESS_EVERY", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # tables unwrapped, so that the claims can be found


@pytest.mark.parametrize("base", ["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def test_tour_runs_line_by_line(base: str, hub_server: HubServer, tour_base: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    lines = tour_lines(DOCS / "tour.md")
    assert len(lines) > 30  # the parser found the tour
    _fresh_home(tmp_path, monkeypatch, "tour-home")
    ran = run_lines(lines, CLAIMS, base, tour_base, "tour.md")
    assert ran == len(lines) - 4  # every line but the four of SKIP
    assert (tmp_path / "other-home").is_dir()
    peft_folder = tmp_path / "rt-peft"
    assert json.loads((peft_folder / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    assert (peft_folder / "adapterhub_extras.safetensors").is_file()  # the head travels beside the SHiRA weights


# -- docs/guide.md ----------------------------------------------------------------------------------------

#: a guide line's first words -> text its output must contain (what its comment claims)
GUIDE_CLAIMS = {
    "adapterhub eval rt@prod": ["486/486 (100%)", "[scoring]"],  # rows scored / total, in a log too
    "adapterhub show rt@prod": ["rt@1", "prod", "test_accuracy", "test_n=486", "content hash"],
    "adapterhub register ./exported/rt-peft": ["rt-peft@1"],
    "adapterhub push rt@prod": ["alice/rt@v1", "Hub tags: tag-prod"],
    "adapterhub pull alice/rt@v1": ["rt@1"],
    "adapterhub metrics rt@1": ["test_accuracy", "486", "*"],
    "adapterhub deprecate": ["deprecated rt-peft@1"],
    "adapterhub list --all": ["rt-peft@1 (deprecated)", "rt@1", "spam@1"],
}


def test_guide_shows_the_peft_path_first() -> None:
    """The guide opens with the PEFT user's path: its first section and first code block load, predict,
    switch and revert, in that order, before any command line or configuration table."""
    text = (DOCS / "guide.md").read_text(encoding="utf-8")
    assert re.findall(r"^## (.*)$", text, flags=re.M)[0].startswith("Coming from PEFT")
    lang, first = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)[0]
    assert lang == "python"
    steps = [first.index(w) for w in ("adapterhub.activate(model", ".predict(", ".set_adapter(", ".revert()")]
    assert steps == sorted(steps), steps
    assert text.index("```python") < text.index("```bash") < text.index("## Configuration and commands")


@pytest.mark.parametrize("base", ["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def test_guide_command_blocks_run(base: str, hub_server: HubServer, tour_base: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Every command of the guide's shell blocks runs as written (small step counts, the local Hub), and
    leaves what the guide's Python blocks need; those then run against it, as written."""
    from test_activate import _guide_python_blocks

    lines = tour_lines(DOCS / "guide.md")
    assert len(lines) >= 14 and all(c.startswith(("adapterhub ", "export ")) for c, _ in lines)
    _fresh_home(tmp_path, monkeypatch, "guide-home")
    ran = run_lines(lines, GUIDE_CLAIMS, base, tour_base, "guide.md")
    assert ran == len(lines) - 1  # every line but `export HF_TOKEN=...`
    repo = hub_server.repos["alice/rt"]
    assert set(repo.tags) == {"v1", "tag-prod"} and repo.tags["tag-prod"] == repo.tags["v1"]
    peft_folder = tmp_path / "exported" / "rt-peft"
    assert json.loads((peft_folder / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    # the Python of the guide, as written, in the home the commands made
    first, second = _guide_python_blocks()
    ns: dict = {}
    exec(compile(first, "guide.md#peft-1", "exec"), ns)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("rt@1 [") and ns["adapters"].active_adapter is None
    exec(compile(second, "guide.md#peft-2", "exec"), ns)
    assert ns["adapters"].names == ["rt", "spam", "mine"]
    ns["ws"].close()


# -- every documented command line, in every doc ----------------------------------------------------------

def _leaf_commands(group: click.Group) -> list[click.Command]:
    out: list[click.Command] = []
    for cmd in group.commands.values():
        out += _leaf_commands(cmd) if isinstance(cmd, click.Group) else [cmd]
    return out


def test_every_documented_command_line_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every ``adapterhub …`` line of every shell block of README.md and docs/*.md is accepted by the CLI as written:
    the command and its options exist, and each value passes its type (REF, NAME, choices, ranges). The
    commands' bodies are replaced by no-ops, so lines that need data (``rt.safetensors``, a trained
    ``rt-sentiment@2``) are checked too; a relative path a line reads gets an empty stand-in first."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "home"))
    for var in ("ADAPTERHUB_DB_URL", "ADAPTERHUB_STORE_URL"):
        monkeypatch.delenv(var, raising=False)
    ran: list[str] = []
    for cmd in _leaf_commands(cli):
        monkeypatch.setattr(cmd, "callback", lambda *a, _name=cmd.name, **kw: ran.append(str(_name)))
    runner = CliRunner()
    checked = 0
    for path in [DOCS.parent / "README.md", *sorted(DOCS.glob("*.md"))]:
        for line, _comment in tour_lines(path):
            for part in re.split(r"\s&&\s", line):  # `a && b`: each command; `a | b`, `a > f`: the adapterhub part
                part = re.split(r"\s[|>]\s", part)[0].strip()
                if not part.startswith("adapterhub "):
                    continue
                args = shlex.split(part)[1:]
                for _ in range(5):
                    r = runner.invoke(cli, args)
                    missing = re.search(r"Path '([^']+)' does not exist", r.output)
                    if r.exit_code != 2 or missing is None or Path(missing[1]).is_absolute():
                        break
                    stand_in = Path(missing[1])  # a file the reader has: an empty one (a folder without suffix)
                    if stand_in.suffix:
                        stand_in.parent.mkdir(parents=True, exist_ok=True)
                        stand_in.touch()
                    else:
                        stand_in.mkdir(parents=True)
                assert r.exit_code == 0, f"{path.name}: {part}\n{r.output}"
                checked += 1
    assert checked > 100 and len(ran) > 100
