"""fsutil: folders that appear whole or not at all; atomic writes that never replace a special file."""
from __future__ import annotations

import os
import stat

import pytest

from adapterhub.fsutil import DONE_MARKER, atomic_write_bytes, build_once, new_or_existing_folder


def test_new_or_existing_folder(tmp_path):
    with new_or_existing_folder(tmp_path / "a") as f:
        assert f.parent == tmp_path and f.name.startswith(".a.") and not (tmp_path / "a").exists()
        (f / "x").write_text("1")
    assert (tmp_path / "a" / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    with new_or_existing_folder(tmp_path / "a") as f:  # an existing folder is written in place
        assert f == tmp_path / "a"
    (tmp_path / "file").write_text("")
    with pytest.raises(FileExistsError), new_or_existing_folder(tmp_path / "file"):
        pass
    with pytest.raises(FileExistsError, match="appeared"), new_or_existing_folder(tmp_path / "b") as f:
        (f / "y").write_text("2")
        (tmp_path / "b").mkdir()  # someone else took the name meanwhile: nothing is put there
    assert list((tmp_path / "b").iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "file"]


def test_build_once(tmp_path):
    dest = tmp_path / "cache" / "base"
    calls = []

    def build(tmp):
        calls.append(tmp)
        assert tmp.parent == dest.parent and tmp.name.startswith(".base.")
        (tmp / "w").write_text("weights")
        return "made by test\n"

    assert build_once(dest, build) == dest
    assert (dest / "w").read_text() == "weights" and (dest / DONE_MARKER).read_text() == "made by test\n"
    assert build_once(dest, build) == dest and len(calls) == 1  # whole: reused, not rebuilt
    (dest / DONE_MARKER).unlink()  # a build that crashed before its marker is redone, its leftovers dropped
    (dest / "partial").write_text("")
    build_once(dest, build)
    assert len(calls) == 2 and sorted(p.name for p in dest.iterdir()) == [DONE_MARKER, "w"]
    assert [p.name for p in dest.parent.iterdir()] == ["base"]  # no temp folder left

    def failing(tmp):
        (tmp / "half").write_text("")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        build_once(tmp_path / "other", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # nothing left beside it

    def raced(tmp):  # another process finishes first: its folder stays, this copy is dropped
        (tmp_path / "raced").mkdir()
        (tmp_path / "raced" / DONE_MARKER).write_text("theirs\n")
        return "ours\n"

    assert build_once(tmp_path / "raced", raced) == tmp_path / "raced"
    assert (tmp_path / "raced" / DONE_MARKER).read_text() == "theirs\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "raced"]


def test_build_once_concurrent_builders_over_a_crashed_build(tmp_path):
    """Builders racing over a folder a crashed build left without its marker: one of them removes it, each
    returns the whole folder, none fails, nothing is left beside it."""
    import threading

    def build(tmp):
        (tmp / "w").write_text("weights")
        return "ok\n"

    for trial in range(10):
        dest = tmp_path / f"t{trial}" / "base"
        dest.mkdir(parents=True)
        (dest / "junk").write_text("left by a crash")
        errors, got = [], []

        def run(dest=dest, errors=errors, got=got):
            try:
                got.append(build_once(dest, build))
            except Exception as e:  # collected for the assertion
                errors.append(e)

        threads = [threading.Thread(target=run) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and got == [dest] * 8
        assert sorted(p.name for p in dest.iterdir()) == [DONE_MARKER, "w"]
        assert [p.name for p in dest.parent.iterdir()] == ["base"]


def test_atomic_write_replaces_files_and_links_but_never_a_special_file(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"old")
    atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new"
    target = tmp_path / "target"
    target.write_bytes(b"kept")
    link = tmp_path / "link"
    link.symlink_to(target)
    atomic_write_bytes(link, b"file")  # the link is replaced, its target untouched
    assert not link.is_symlink() and link.read_bytes() == b"file" and target.read_bytes() == b"kept"
    fifo, folder = tmp_path / "fifo", tmp_path / "folder"
    os.mkfifo(fifo)
    folder.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for p in (fifo, folder):
        with pytest.raises(FileExistsError, match="not a regular file"):
            atomic_write_bytes(p, b"x")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no temp file left
