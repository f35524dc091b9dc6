"""The CLI surface: every command answers --help, stays light to import, and fails with one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMANDS = ["generate", "chat", "prepare", "finetune", "distill", "quantize", "evaluate", "serve", "models"]


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(cli, command):
    code, out, _ = cli(*([command] if command else []), "--help")
    assert code == 0
    assert "Usage" in out
    if command:
        assert "Examples" in out  # every command documents a runnable example
        assert f"llmkit {command}" in out
    if command not in (None, "models"):
        assert "[default: " in out  # defaults are shown (Rich markup once swallowed "[default: ...]" as a style tag)


def test_short_flags_mean_one_thing_across_commands():
    """`-t` was temperature in generate and teacher in distill: a short flag names the same long flag everywhere."""
    import click
    import typer.main

    from llmkit.cli import app

    seen: dict[str, set[str]] = {}
    group = typer.main.get_command(app)
    for command in group.commands.values():
        for param in command.params:
            if isinstance(param, click.Option):
                longs = [o for o in param.opts if o.startswith("--")]
                for short in (o for o in param.opts if not o.startswith("--")):
                    seen.setdefault(short, set()).update(longs)
    assert {k: v for k, v in seen.items() if len(v) > 1} == {}


def test_progress_without_a_tty_is_periodic_log_lines(capsys):
    from llmkit.progress import LogBar, bar

    assert bar(10, "x", "step", enabled=False) is None  # --quiet
    assert isinstance(bar(10, "x", "step"), LogBar)  # pytest's stderr is not a terminal
    log = LogBar(4, "training", "step", every=0)
    for _ in range(4):
        log.update(1)
    log.set_postfix_str("loss=1.5")
    log.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 5 and "\r" not in "".join(lines)
    assert lines[0].startswith("training: 1/4 steps (25%)") and "ETA" in lines[0]
    assert lines[-1].startswith("training: 4/4 steps (100%)") and "took" in lines[-1] and lines[-1].endswith("loss=1.5")
    quiet = LogBar(4, "short", "step", every=3600)  # a phase shorter than the interval prints nothing
    quiet.update(4)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_training_log_shows_life_when_piped(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMKIT_PROGRESS_EVERY", "0")
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "16", "--max-steps", "3",
                       "--out", tmp_path / "run")
    assert code == 0, err
    lines = [x for x in err.splitlines() if x.startswith("training: ")]
    assert [x.split(",")[0] for x in lines[:3]] == ["training: 1/3 steps (33%)", "training: 2/3 steps (67%)", "training: 3/3 steps (100%)"]
    assert "\r" not in err
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--block-size", "16", "--max-steps", "3",
                       "--out", tmp_path / "quiet", "--quiet")
    assert code == 0 and err == ""


def test_cli_import_is_light():
    # `llmkit --help` must answer instantly: no torch / transformers at import time.
    code = "import sys, llmkit.cli; bad = [m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_python_dash_m_and_console_script():
    for cmd in ([sys.executable, "-m", "llmkit", "--help"], [sys.executable, "-m", "llmkit", "--version"]):
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
    assert "llmkit" in res.stdout


def test_usage_error_is_one_line_exit_2_in_a_real_process(tmp_path):
    res = subprocess.run([sys.executable, "-m", "llmkit", "generate", "hi", "--model", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert res.returncode == 2
    assert res.stderr.startswith("error: no such file or folder")
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_models_lists_aliases_and_local_folders(cli, tiny_gpt2):
    code, out, _ = cli("models", "--json", "--dir", tiny_gpt2.parent)
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    names = {r["name"] for r in rows}
    assert {"smollm2-135m", "minilm-l6"} <= names
    local = [r for r in rows if r["source"] == "local"]
    assert any(r["path"] == str(tiny_gpt2.resolve()) and r["task"] == "GPT2LMHeadModel" for r in local)


def test_models_lists_llmkit_runs_with_what_they_are(cli, tmp_path):
    run = tmp_path / "runs" / "sentiment"
    run.mkdir(parents=True)
    (run / "adapter_config.json").write_text("{}")
    (run / "llmkit.json").write_text(json.dumps({"task": "seq-cls", "method": "lora", "model": {"name": "minilm-l6"},
                                                 "llmkit": {"status": "done", "metrics": {"eval_accuracy": 0.77, "eval_loss": 0.5}}}))
    stopped = tmp_path / "runs" / "stopped"
    stopped.mkdir()
    (stopped / "llmkit.json").write_text(json.dumps({"task": "causal-lm", "method": "full", "model": {"name": "smollm2-135m"},
                                                     "llmkit": {"status": "interrupted"}}))
    code, out, _ = cli("models", "--json", "--dir", tmp_path / "runs")
    rows = {r["name"]: r for r in map(json.loads, out.splitlines()) if r["source"] == "run"}
    assert code == 0 and rows[str(run)]["note"] == "lora of minilm-l6, accuracy 0.77" and rows[str(run)]["available"]
    assert rows[str(stopped)]["note"] == "full of smollm2-135m [interrupted]" and not rows[str(stopped)]["available"]
    code, out, _ = cli("models", "--dir", tmp_path / "runs")
    assert "lora of minilm-l6, accuracy 0.77" in out
