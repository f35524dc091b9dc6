"""Checks 1, 2 and 4: hard kills, kills during a save, and SIGTERM / Ctrl-C, all on real processes.

Every scenario ends in the same place as an uninterrupted run with the same seed: the final weights are
compared within 1e-6 (CPU fp32; they come out bit-identical), and metrics.jsonl shows the steps, learning
rates and losses (which depend on the data order) continuing exactly from the checkpoint.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from reliability_helpers import logged_steps, max_weight_diff, metrics_rows, record, run, start, wait_until

pytestmark = pytest.mark.slow  # real processes, ~1 min in all

STEPS_PER_EPOCH = 15  # 60 blocks of 16 tokens at batch 4


def args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16",
            "--batch-size", "4", "--epochs", "2", "--lr", "1e-3", "--save-every", "3", "--mixed-precision", "no",
            "--seed", "0", "--set", "train.log_every=1", "--set", "train.keep_checkpoints=3", "--quiet", *extra]


@pytest.fixture(scope="module")
def reference(tiny_gpt2, toy_data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(args(tiny_gpt2, toy_data, out))
    assert done.returncode == 0, done.stderr
    assert logged_steps(out) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    return out


class DriftBeforeAnyInterruption(AssertionError):
    """The run differed from the reference before it was ever interrupted: not something resume did."""


def assert_same_run(out: Path, reference: Path, clean_until: int, note: str = "") -> float:
    """Same weights (1e-6), and the same step / lr / loss for every logged step: nothing repeated or skipped.

    `clean_until`: the last step the first (never interrupted) process logged and kept. On this machine, 1 run
    in ~5 of the *fresh* process comes out a few ULPs off from step 2 (seen with no kill at all in its first
    steps); that is CPU-kernel nondeterminism, not resume, so it is reported apart and retried once.
    """
    got = [(r["step"], r["lr"], r["loss"]) for r in metrics_rows(out) if "loss" in r]
    want = [(r["step"], r["lr"], r["loss"]) for r in metrics_rows(reference) if "loss" in r]
    assert [g[0] for g in got] == [w[0] for w in want], note
    first = next((g for g, w in zip(got, want, strict=True) if g != w), None)
    diff = max_weight_diff(out, reference)
    if first is not None and first[0] <= clean_until:
        raise DriftBeforeAnyInterruption((diff, "first differing step", first, note))
    if first is not None and diff <= 1e-5:
        # The same few-ULP kernel drift can start in the resumed process (seen once in ~20 CI runs: 1.8e-6 after
        # step 10). A resume bug (data position, lr, RNG) changes the step, the lr or the loss in its leading
        # digits and the weights far beyond 1e-5, so a run this close is retried once instead of failing.
        want_row = dict((w[0], w) for w in want)[first[0]]
        if first[1] == want_row[1] and abs(first[2] - want_row[2]) <= 1e-5 * abs(want_row[2]):
            raise DriftBeforeAnyInterruption((diff, "ULP-level drift after resume, first at step", first, note))
    assert diff <= 1e-6 and first is None, (diff, "first differing step", first, note)
    assert json.loads((out / "llmkit.json").read_text())["llmkit"]["status"] == "done"
    return diff


def kill_when(proc, out: Path, step: int) -> None:
    """SIGKILL once step `step` has been logged: mid-epoch, after at least one checkpoint."""
    wait_until(proc, lambda: (logged_steps(out) or [0])[-1] >= step)
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def once_more_on_drift(scenario, tmp_path: Path):
    """Run `scenario(folder)`; if it drifted by a few ULPs (CPU-kernel nondeterminism, see assert_same_run), once more."""
    try:
        return scenario(tmp_path / "run")
    except DriftBeforeAnyInterruption:
        return scenario(tmp_path / "run-again")


def latest_checkpoint(out: Path) -> str:
    from llmkit.training.checkpoints import latest_checkpoint

    return latest_checkpoint(out / "checkpoints").name


def test_sigkill_mid_epoch_twice_and_across_an_epoch_boundary(tiny_gpt2, toy_data, tmp_path, reference):
    once_more_on_drift(lambda out: _sigkill_scenario(tiny_gpt2, toy_data, out, reference), tmp_path)


def _sigkill_scenario(tiny_gpt2, toy_data, out: Path, reference: Path) -> None:
    a = args(tiny_gpt2, toy_data, out)
    resumed_from = []

    proc = start(a, LLMKIT_TEST_STEP_DELAY="0.08")
    kill_when(proc, out, 7)  # checkpoint step 6 exists; killed in the middle of epoch 1
    resumed_from.append(latest_checkpoint(out))

    proc = start([*a, "--resume"], LLMKIT_TEST_STEP_DELAY="0.08")
    kill_when(proc, out, 11)  # a second kill in the same epoch, after resuming once
    resumed_from.append(latest_checkpoint(out))

    proc = start([*a, "--resume"], LLMKIT_TEST_STEP_DELAY="0.08")
    kill_when(proc, out, STEPS_PER_EPOCH - 1)  # checkpoint 12: the resumed run must cross the end of epoch 1 itself
    resumed_from.append(latest_checkpoint(out))
    state = json.loads((out / "checkpoints" / resumed_from[-1] / "state.json").read_text())

    done = run([*a, "--resume"])
    assert done.returncode == 0, done.stderr
    diff = assert_same_run(out, reference, int(resumed_from[0].split("-")[1]), f"resumed from {resumed_from}")
    assert resumed_from[0] in ("step-00000006",) and resumed_from[1] in ("step-00000009",)
    assert state["step"] in (12, STEPS_PER_EPOCH)  # 12 unless the kill landed one step late
    record(1, "SIGKILL x3 + resume (mid-epoch twice, across an epoch boundary)",
           f"max weight diff {diff:.1e} vs uninterrupted; resumed from {', '.join(resumed_from)}")


@pytest.mark.parametrize("where", ["optimizer.pt", "COMPLETE"])
def test_kill_during_a_save_resumes_from_the_newest_complete_checkpoint(tiny_gpt2, toy_data, tmp_path, reference, where):
    once_more_on_drift(lambda out: _kill_during_save_scenario(tiny_gpt2, toy_data, out, reference, where), tmp_path)


def _kill_during_save_scenario(tiny_gpt2, toy_data, out: Path, reference: Path, where: str) -> None:
    a = args(tiny_gpt2, toy_data, out)
    died = run(a, LLMKIT_TEST_KILL_AT=f"step-00000006/{where}")
    assert died.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / ".tmp-step-00000006").is_dir() and not (ckpts / "step-00000006").exists()

    done = run([*a, "--resume"])
    assert done.returncode == 0, done.stderr
    assert "warning: ignoring the incomplete checkpoint" in done.stderr and ".tmp-step-00000006" in done.stderr
    assert "Traceback" not in done.stderr
    diff = assert_same_run(out, reference, 3)
    record(2, f"killed while writing a checkpoint ({where})",
           f"resumed from step-00000003 with a warning; max weight diff {diff:.1e}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_ctrl_c_write_a_checkpoint_and_exit_with_a_documented_code(tiny_gpt2, toy_data, tmp_path, reference, sig):
    once_more_on_drift(lambda out: _signal_scenario(tiny_gpt2, toy_data, out, reference, sig), tmp_path)


def _signal_scenario(tiny_gpt2, toy_data, out: Path, reference: Path, sig: signal.Signals) -> None:
    a = args(tiny_gpt2, toy_data, out)
    step_delay = 0.08
    proc = start(a, LLMKIT_TEST_STEP_DELAY=str(step_delay))
    wait_until(proc, lambda: (logged_steps(out) or [0])[-1] >= 4)  # between checkpoints (3 and 6)
    sent = time.monotonic()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == 128 + sig, (proc.returncode, err)  # 143 for SIGTERM, 130 for Ctrl-C
    assert "Traceback" not in err
    stopped_at = logged_steps(out)[-1]
    ckpt = latest_checkpoint(out)
    assert ckpt == f"step-{stopped_at:08d}"  # the checkpoint is of the step it stopped after, not the older one
    assert f"stopped by {sig.name}" in err and "--resume" in err
    state = json.loads((out / "llmkit.json").read_text())["llmkit"]  # not left saying "running"
    assert state["status"] == "interrupted" and state["checkpoint"] == ckpt and state["step"] == stopped_at
    assert seconds < 10  # one step (0.1 s) plus a save of a tiny model: far below this on any machine

    done = run([*a, "--resume"])
    assert done.returncode == 0, done.stderr
    diff = assert_same_run(out, reference, stopped_at)
    record(4, f"{sig.name} during training",
           f"exit {128 + sig} after {seconds:.2f} s with checkpoint {ckpt}; resumed, max weight diff {diff:.1e}")
