"""llmkit.atomic: a write is renamed into place when complete, removed on failure, and a killed writer's
leftovers are swept by the next writer while a live writer's are kept."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmkit.atomic import atomic_path, pid_alive, scratch_path, sweep_stale, tmp_sibling, write_atomic, writer_pid


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not pid_alive(child.pid)
    return child.pid


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_success_renames_a_folder_and_a_file(tmp_path):
    final = tmp_path / "out"
    with atomic_path(final) as tmp:
        assert tmp == tmp_path / f".tmp-out-{os.getpid()}" and not final.exists()
        tmp.mkdir()
        (tmp / "weights").write_text("new")
    assert (final / "weights").read_text() == "new"
    with atomic_path(tmp_path / "a" / "b.json") as tmp:  # the parent folder is created
        tmp.write_text("{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
    assert _names(tmp_path) == ["a", "out"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_failure_removes_the_temporary_and_reraises(tmp_path, error, kind):
    final = tmp_path / "out"
    with pytest.raises(error), atomic_path(final) as tmp:
        if kind == "folder":
            tmp.mkdir()
            (tmp / "half").write_text("half")
        else:
            tmp.write_text("half")
        raise error()
    assert _names(tmp_path) == []


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_an_existing_target_is_replaced_only_on_success(tmp_path, kind):
    final = tmp_path / "out"

    def write(path: Path, text: str) -> None:
        if kind == "folder":
            path.mkdir()
            (path / "content").write_text(text)
        else:
            path.write_text(text)

    def read(path: Path) -> str:
        return (path / "content").read_text() if kind == "folder" else path.read_text()

    write(final, "old")
    with pytest.raises(RuntimeError), atomic_path(final) as tmp:
        write(tmp, "new")
        assert read(final) == "old"  # untouched while the new one is written
        raise RuntimeError("failed")
    assert read(final) == "old" and _names(tmp_path) == ["out"]
    with atomic_path(final) as tmp:
        write(tmp, "new")
    assert read(final) == "new" and _names(tmp_path) == ["out"]  # no temporary, no old copy left


def test_replace_false_keeps_what_another_process_completed(tmp_path):
    final = tmp_path / "kept"
    final.mkdir()
    (final / "config.json").write_text("theirs")
    with pytest.raises(FileExistsError), atomic_path(final, replace=False) as tmp:
        tmp.mkdir()
        (tmp / "config.json").write_text("mine")
    assert (final / "config.json").read_text() == "theirs" and _names(tmp_path) == ["kept"]


def test_stale_siblings_of_dead_writers_are_swept_and_live_ones_kept(tmp_path, dead_pid):
    final = tmp_path / "KEY"
    dead = tmp_path / f".tmp-KEY-{dead_pid}"
    dead.mkdir()
    (dead / "part").write_text("half")
    dead_file = tmp_path / f".tmp-KEY.part-{dead_pid}"  # not this name's pattern (a scratch file): left alone
    dead_file.write_text("other")
    live = tmp_path / f".tmp-KEY-{os.getppid()}"  # the process that started this one: alive
    live.mkdir()
    other = tmp_path / f".tmp-OTHER-{dead_pid}"  # another target's: not this writer's business
    other.write_text("half")
    with atomic_path(final, sweep=True) as tmp:
        assert not dead.exists() and live.exists() and other.exists() and dead_file.exists()
        tmp.mkdir()
    assert _names(tmp_path) == sorted(["KEY", live.name, other.name, dead_file.name])
    # without a name, every dead writer's sibling in the folder goes (a cache only this code writes)
    assert sorted(sweep_stale(tmp_path)) == sorted([other, dead_file])
    assert live.exists()


def test_names_and_the_pids_in_them(dead_pid):
    # a suffix stays last: the unfinished file is handed to tools that go by it (llama.cpp's loader)
    assert tmp_sibling(Path("runs/model.q8_0.gguf")) == Path(f"runs/.tmp-model.q8_0-{os.getpid()}.gguf")
    assert tmp_sibling(Path("cache/KEY"), tag="hf") == Path(f"cache/.tmp-KEY.hf-{os.getpid()}")
    assert writer_pid(f".tmp-model.q8_0-{dead_pid}.gguf") == writer_pid(f".tmp-KEY-{dead_pid}") == dead_pid
    assert writer_pid(f".tmp-{dead_pid}-model.q8_0.gguf") == dead_pid  # older llmkit GGUF cache files
    assert writer_pid(".tmp-model") is None and writer_pid("model-12") is None
    assert pid_alive(os.getpid()) and not pid_alive(dead_pid) and not pid_alive("x") and not pid_alive(0)
    assert tmp_sibling(Path("ckpt/step-00000006"), per_process=False) == Path("ckpt/.tmp-step-00000006")


def test_a_shared_name_is_cleared_before_it_is_written(tmp_path):
    final = tmp_path / "step-00000006"
    leftover = tmp_path / ".tmp-step-00000006"  # a killed run's checkpoint in progress
    leftover.mkdir()
    (leftover / "optimizer.pt").write_text("half")
    with atomic_path(final, per_process=False) as tmp:
        assert tmp == leftover and not tmp.exists()
        tmp.mkdir()
        (tmp / "COMPLETE").write_text("ok\n")
    assert _names(tmp_path) == ["step-00000006"] and _names(final) == ["COMPLETE"]


def test_write_atomic_and_scratch_path(tmp_path, dead_pid):
    path = tmp_path / "llmkit.json"
    (tmp_path / f".tmp-llmkit-{dead_pid}.json").write_text("{")  # a killed write
    write_atomic(path, "{}\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert path.read_text() == "{}\n" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["b.bin", "llmkit.json"]
    with pytest.raises(RuntimeError), scratch_path(path, "f32") as scratch:
        assert scratch.name == f".tmp-llmkit.f32-{os.getpid()}.json"
        scratch.write_text("intermediate")
        raise RuntimeError
    with scratch_path(path, "hf") as scratch:
        scratch.mkdir()
    assert _names(tmp_path) == ["b.bin", "llmkit.json"]
