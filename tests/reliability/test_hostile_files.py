"""Checks 5 and 6: model files from strangers. Pickles and shipped Python are refused unless opted in.

Each hostile file would create a marker file the moment it ran; the marker must never appear, whichever
command is pointed at it, and the refusal is one line (exit 2) naming the file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from reliability_helpers import record


class Payload:
    """Unpickling this runs `code`: what a malicious pytorch_model.bin does."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (exec, (self.code,))


def commands(model: Path, data: Path, out: Path) -> dict[str, list[str]]:
    return {
        "generate": ["generate", "--model", model, "Hello", "-n", "4"],
        "evaluate": ["evaluate", "--model", model, "--data", data / "eval.txt", "--block-size", "8"],
        "finetune": ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16", "--max-steps", "1"],
        "distill": ["distill", "--teacher", model, "--data", data / "train.txt", "--out", out, "--block-size", "16", "--max-steps", "1"],
        "quantize": ["quantize", "--model", model, "--out", out],
    }


@pytest.fixture
def marker(tmp_path) -> Path:
    return tmp_path / "PWNED"


@pytest.fixture
def pickle_model(tiny_gpt2, tmp_path, marker) -> Path:
    """A GPT-2 folder whose only weights are a pickle that writes the marker when loaded."""
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "model.safetensors").unlink()
    torch.save(Payload(f"open({str(marker)!r}, 'w').write('pwned')"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_by_every_command(cli, pickle_model, toy_data, tmp_path, marker, one_line_error):
    for name, argv in commands(pickle_model, toy_data, tmp_path / "out").items():
        code, _, err = cli(*argv)
        assert code == 2, (name, err)
        one_line_error(err, "pickle", "pytorch_model.bin", "--allow-pickle")
        assert not marker.exists(), name
        assert not (tmp_path / "out").exists(), name
    record(5, "hostile pickle weights (.bin) x 5 commands", "refused, exit 2, file named; marker never created")


def test_a_bare_pickle_file_is_refused(cli, tmp_path, marker, one_line_error):
    import torch

    evil = tmp_path / "model.pt"
    torch.save(Payload(f"open({str(marker)!r}, 'w').write('pwned')"), evil)
    for flag in ([], ["--allow-pickle"]):
        code, _, err = cli("generate", "--model", evil, "Hello", *flag)
        assert code == 2, err
        one_line_error(err, "model.pt", "pickle")
    assert not marker.exists()


def test_a_planted_pickle_in_a_checkpoint_is_refused_on_resume(cli, tiny_gpt2, toy_data, tmp_path, marker, monkeypatch,
                                                                one_line_error):
    """Checkpoints are loaded with weights_only: a swapped-in optimizer.pt cannot run code either."""
    import torch

    from llmkit.training import checkpoints

    out = tmp_path / "run"
    argv = ["finetune", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--out", out, "--block-size", "16",
            "--max-steps", "6", "--save-every", "2", "--quiet"]
    real_save_checkpoint = checkpoints.save_checkpoint

    def stop_after_4(*a, **k):  # Ctrl-C right after the step-4 checkpoint
        path = real_save_checkpoint(*a, **k)
        if path.name == "step-00000004":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(checkpoints, "save_checkpoint", stop_after_4)
    assert cli(*argv)[0] == 130
    monkeypatch.undo()
    torch.save(Payload(f"open({str(marker)!r}, 'w').write('pwned')"), out / "checkpoints" / "step-00000004" / "optimizer.pt")
    code, _, err = cli(*argv, "--resume")
    assert code == 2, err
    one_line_error(err, "optimizer.pt", "refusing")
    assert not marker.exists()


@pytest.fixture
def remote_code_model(tiny_gpt2, tmp_path, marker) -> Path:
    """A folder whose config maps AutoModel classes to its own modeling file, which writes the marker on import."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_gpt2, folder)
    (folder / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import GPT2LMHeadModel\n\nclass EvilModel(GPT2LMHeadModel):\n    pass\n")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel", "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_remote_code_is_refused_by_every_command(cli, remote_code_model, toy_data, tmp_path, marker, one_line_error):
    for name, argv in commands(remote_code_model, toy_data, tmp_path / "out").items():
        code, _, err = cli(*argv)
        assert code == 2, (name, err)
        one_line_error(err, "modeling_evil.py", "--trust-remote-code")
        assert not marker.exists(), name
        assert not (tmp_path / "out").exists(), name
    record(6, "auto_map remote code x 5 commands", "refused without --trust-remote-code, exit 2; marker never created")


def test_remote_code_in_the_tokenizer_config_is_refused_too(cli, tiny_gpt2, tmp_path, marker, one_line_error):
    folder = tmp_path / "remote-tok"
    shutil.copytree(tiny_gpt2, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('pwned')\n")
    code, _, err = cli("generate", "--model", folder, "Hello")
    assert code == 2
    one_line_error(err, "tokenization_evil.py", "--trust-remote-code")
    assert not marker.exists()
