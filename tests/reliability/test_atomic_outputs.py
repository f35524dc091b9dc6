"""Check 12: output atomicity. Every command that writes a folder (finetune, distill, quantize) builds it under
a temporary name and installs it at the end. A failure at any point leaves no half-written output: before the
first checkpoint, no folder at all; after it, a resumable run (status "failed" with the error and checkpoint) with no model files
in it. An existing folder is never touched without --overwrite.
"""

from __future__ import annotations

import json

import pytest
from reliability_helpers import record, tree_digest

MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "config.json", "README.md", "loss.png")
points_checked: list[str] = []


class Injected(RuntimeError):
    pass


def fail(*_a, **_k):
    raise Injected("injected failure")


def fail_on_call(n: int):
    calls = {"n": 0}

    def wrapper(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] >= n:
                raise Injected("injected failure")
            return real(*a, **k)
        return f
    return wrapper


def run_failing(argv) -> None:
    from llmkit.cli import main

    with pytest.raises(Injected):
        main([str(a) for a in argv])


def assert_nothing_half_written(out, *, checkpoints: bool) -> None:
    if not checkpoints:
        assert not out.exists(), sorted(p.name for p in out.iterdir())
        return
    names = {p.name for p in out.iterdir()}
    assert not names & set(MODEL_FILES), names
    assert not any(n.startswith(".tmp") for n in names), names
    state = json.loads((out / "llmkit.json").read_text())["llmkit"]
    # resumable, and it says what happened: not "running" (nothing runs) and not "done"
    assert state["status"] == "failed" and state["error"] and state["checkpoint"].startswith("step-"), state


def finetune_argv(model, data, out, *extra):
    return ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16", "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--quiet", *extra]


@pytest.mark.parametrize("target,when,has_ckpt", [
    ("llmkit.training.lifecycle.prepare_data", 1, False),  # reading the data
    ("llmkit.finetune.build_model", 1, False),  # loading the model
    ("llmkit.training.loop._default_loss", 1, False),  # the first training step
    ("llmkit.training.loop._default_loss", 4, True),  # after the step-2 checkpoint
    ("llmkit.training.outputs.model_card", 1, True),  # writing the final folder: weights already staged
    ("llmkit.training.outputs.install_files", 1, True),  # just before the final renames
])
def test_finetune_failure_at_any_point(tiny_gpt2, toy_data, tmp_path, monkeypatch, target, when, has_ckpt):
    import importlib

    module, _, name = target.rpartition(".")
    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, name, fail_on_call(when)(getattr(mod, name)))
    out = tmp_path / "run"
    run_failing(finetune_argv(tiny_gpt2, toy_data, out))
    assert_nothing_half_written(out, checkpoints=has_ckpt)
    points_checked.append(f"finetune:{name}#{when}")
    if has_ckpt:  # and the run can be finished
        monkeypatch.undo()
        from llmkit.cli import main

        with pytest.raises(SystemExit) as e:
            main([str(a) for a in finetune_argv(tiny_gpt2, toy_data, out, "--resume")])
        assert e.value.code in (0, None)
        assert (out / "model.safetensors").exists()


def test_distill_failure_before_and_after_checkpoints(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    import llmkit.distill as distill

    argv = ["distill", "--teacher", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "16", "--batch-size", "4",
            "--max-steps", "4", "--save-every", "2", "--student-layers", "1", "--quiet", "--out"]
    monkeypatch.setattr(distill, "measure", fail)  # measuring the teacher, after the folder was started
    run_failing([*argv, tmp_path / "a"])
    assert_nothing_half_written(tmp_path / "a", checkpoints=False)
    monkeypatch.undo()
    monkeypatch.setattr(distill, "save_student", fail)  # training done, writing the student
    run_failing([*argv, tmp_path / "b"])
    assert_nothing_half_written(tmp_path / "b", checkpoints=True)
    points_checked.extend(["distill:measure", "distill:save_student"])


@pytest.mark.parametrize("method,suffix", [("int8", ""), ("gguf-q8_0", ".gguf")])
def test_quantize_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch, method, suffix):
    import llmkit.quantize as q

    monkeypatch.setattr(q, "_files_bytes", fail)  # after the weights were written, before the report
    out = tmp_path / f"q{suffix}"
    run_failing(["quantize", "--model", tiny_llama, "--method", method, "--out", out, "--quiet"])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    points_checked.append(f"quantize {method}:after writing")


@pytest.mark.parametrize("command", ["finetune", "quantize", "distill"])
def test_an_existing_folder_is_never_touched_without_overwrite(cli, tiny_gpt2, toy_data, tmp_path, command):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my own work")
    (out / "model.safetensors").write_bytes(b"not llmkit's")
    before = tree_digest(out)
    argv = {"finetune": finetune_argv(tiny_gpt2, toy_data, out),
            "quantize": ["quantize", "--model", tiny_gpt2, "--out", out],
            "distill": ["distill", "--teacher", tiny_gpt2, "--data", toy_data / "train.txt", "--out", out, "--block-size", "16"]}[command]
    code, _, err = cli(*argv)
    assert code == 2, err
    assert "--overwrite" in err or "exists" in err
    assert tree_digest(out) == before


def test_report_atomicity():
    if points_checked:
        record(12, "output atomicity (failures injected)",
               f"{len(points_checked)} failure points across finetune/distill/quantize: no half-written folder; "
               "existing folders untouched without --overwrite")
