"""Check 3: the disk fills up while a checkpoint (or the final model) is written.

ENOSPC is injected into the writer, on the file the real writer opens; a second test fills a real 600 KB
tmpfs where the machine allows mounting one. Either way: one "no space left" line, a non-zero exit (74),
the previous checkpoint byte-identical and loadable, and old checkpoints deleted only after a new one is
complete (keep_checkpoints=1 here, so a rotation-before-completion bug would lose the only checkpoint).
"""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from pathlib import Path

import pytest
from reliability_helpers import record, tree_digest


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16",
            "--batch-size", "4", "--max-steps", "10", "--save-every", "3", "--mixed-precision", "no", "--quiet",
            "--set", "train.keep_checkpoints=1", *extra]


@pytest.mark.parametrize("victim", ["optimizer.pt", "trainable.safetensors"])
def test_enospc_while_saving_a_checkpoint_keeps_the_previous_one(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch,
                                                                   one_line_error, victim):
    import builtins

    import safetensors.torch

    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    before: dict[str, str] = {}
    real_open, real_save_file = builtins.open, safetensors.torch.save_file

    def full(name: str) -> None:
        if ".tmp-step-00000006" in name and name.endswith(victim):
            before.update(tree_digest(ckpts / "step-00000003"))  # the previous checkpoint, just before the failure
            raise OSError(errno.ENOSPC, "No space left on device", name)

    def open_(file, mode="r", *a, **k):
        if "w" in mode:
            full(str(file))
        return real_open(file, mode, *a, **k)

    def save_file(tensors, filename, *a, **k):
        if str(filename).endswith(victim) and ".tmp-step-00000006" in str(filename):
            before.update(tree_digest(ckpts / "step-00000003"))
            # what safetensors really raises on a full disk (measured on a 512 KB tmpfs)
            raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *a, **k)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code, _, err = cli(*args(tiny_gpt2, toy_data, out))
    monkeypatch.undo()
    assert code == 74, err
    one_line_error(err, "no space left on device", "step-00000006")
    assert before, "the failure was not injected"
    assert [p.name for p in ckpts.iterdir()] == ["step-00000003"]  # the half-written one is gone, the old one kept
    assert tree_digest(ckpts / "step-00000003") == before  # byte-identical
    assert not (out / "model.safetensors").exists()

    code, _, err = cli(*args(tiny_gpt2, toy_data, out), "--resume")  # space is back: the kept checkpoint loads
    assert code == 0, err
    assert json.loads((out / "llmkit.json").read_text())["llmkit"]["steps"] == 10
    record(3, f"ENOSPC injected while writing {victim}",
           f"exit 74, one 'no space left' line; step-00000003 byte-identical ({len(before)} files), resumed to step 10")


def test_enospc_while_saving_the_final_model(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch, one_line_error):
    import safetensors.torch

    out = tmp_path / "run"
    real = safetensors.torch.save_file

    def save_file(tensors, filename, *a, **k):
        if str(filename).endswith("model.safetensors") and ".tmp-model" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    import transformers.modeling_utils as mu

    monkeypatch.setattr(mu, "safe_save_file", save_file)  # transformers' own import of save_file
    code, _, err = cli(*args(tiny_gpt2, toy_data, out))
    monkeypatch.undo()
    assert code == 74, err
    one_line_error(err, "no space left on device")
    assert not (out / ".tmp-model").exists() and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "step-00000009").is_dir()
    code, _, err = cli(*args(tiny_gpt2, toy_data, out), "--resume")
    assert code == 0, err


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


def test_a_really_full_disk(tiny_gpt2, toy_data, tmp_path):
    """No injection: the run folder lives on a 600 KB tmpfs; one checkpoint fits, two do not."""
    from reliability_helpers import run

    disk = tmp_path / "small"
    if not _mount_tmpfs(disk, "600k"):
        pytest.skip("cannot mount a tmpfs here (needs root); the injected tests above cover the writer")
    try:
        out = disk / "run"
        done = run(args(tiny_gpt2, toy_data, out))
        assert done.returncode == 74, done.stderr
        assert "Traceback" not in done.stderr
        assert "error: no space left on device while writing" in done.stderr
        kept = [p.name for p in (out / "checkpoints").iterdir()]
        assert kept == ["step-00000003"], kept
        moved = tmp_path / "run"
        shutil.copytree(out, moved)  # "free space": continue the same run on a disk with room
        done = run([*args(tiny_gpt2, toy_data, moved), "--resume"])
        assert done.returncode == 0, done.stderr
        record(3, "real full disk (600 KB tmpfs)", "exit 74, one line; step-00000003 kept complete and resumed elsewhere")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
