"""The docs run: every shell line of ``docs/tour.md`` is executed, in order, through the real CLI.

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
    "adapterhub hub versions": ["v1"],
}


def tour_lines(path: Path) -> list[tuple[str, str]]:
    """``(command, comment)`` of every line of the ```` ```bash ```` blocks of ``path``, in order."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S):
        for raw in block.splitlines():
            command, *rest = re.split(r"\s+#\s", raw, maxsplit=1)
            command, comment = command.strip(), (rest[0].strip() if rest else "")
            if command:
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


@pytest.mark.parametrize("base", ["tiny", pytest.param("minilm", marks=pytest.mark.slow)])
def test_tour_runs_line_by_line(base: str, hub_server: HubServer, tour_base: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    lines = tour_lines(DOCS / "tour.md")
    assert len(lines) > 30  # the parser found the tour
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPTERHUB_HOME", str(tmp_path / "tour-home"))
    monkeypatch.setenv("HF_TOKEN", "hf_tourTestToken0123456789")
    monkeypatch.delenv("ADAPTERHUB_DB_URL", raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # tables unwrapped, so that the claims can be found
    runner = CliRunner()
    ran = 0
    for command, _comment in lines:
        if any(command.startswith(k) for k in SKIP):
            continue
        argv = shlex.split(command)
        assert argv[0] == "adapterhub", f"the tour has a line the test cannot run: {command}"
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
        assert result.exit_code == 0, f"{command}\n{result.output}\n{result.exception!r}"
        if out_file:
            Path(out_file).write_text(result.stdout)
            doc = json.loads(Path(out_file).read_text())
            assert {"mask", "training_config", "metrics", "content_hash"} <= set(doc), command
            assert doc["mask"]["nnz"] > 0 and doc["training_config"]["steps"] == 6
            # no --select-steps/--reselect-every on the line: the schedule scaled to the 6 steps, as recorded
            assert (doc["training_config"]["select_steps"], doc["training_config"]["reselect_every"]) == (1, 1)
        for prefix, needles in CLAIMS.items():
            if command.startswith(prefix):
                for needle in needles:
                    assert needle.lower() in result.output.lower(), f"{command}: {needle!r} not in\n{result.output}"
                break
        ran += 1
    assert ran == len(lines) - 4  # every line but the four of SKIP
    assert (tmp_path / "other-home").is_dir()
    peft_folder = tmp_path / "rt-peft"
    assert json.loads((peft_folder / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    assert (peft_folder / "adapterhub_extras.safetensors").is_file()  # the head travels beside the SHiRA weights
