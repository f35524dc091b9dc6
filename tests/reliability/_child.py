"""`python _child.py ARGS...` runs `llmkit ARGS...` in this process with faults injected from the environment.

Process-level reliability tests use it: the fault is real (SIGKILL, ENOSPC from the writer), the code path
is the installed CLI's. Nothing here changes what llmkit computes; the step delay only gives the parent
time to act between steps of a tiny model.

    LLMKIT_TEST_STEP_DELAY=0.1          sleep this long in every training step
    LLMKIT_TEST_KILL_AT=step-00000006/optimizer.pt   SIGKILL this process when it starts writing that file
                                        ("step-00000006/COMPLETE": after every file, before the rename)
    LLMKIT_TEST_HOLD_AT=8 LLMKIT_TEST_PID_DIR=DIR    at the start of step 8 (steps 1-7 done, logged and
                                        checkpointed as due) write DIR/rank<RANK>.pid and wait there to be killed:
                                        the parent kills every rank at a known point, and the run cannot end first
"""

from __future__ import annotations

import os
import signal
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import llmkit.training.checkpoints as checkpoints
import llmkit.training.loop as train

delay = float(os.environ.get("LLMKIT_TEST_STEP_DELAY", "0"))
kill_at = os.environ.get("LLMKIT_TEST_KILL_AT", "")
hold_at = int(os.environ.get("LLMKIT_TEST_HOLD_AT", "0"))

if delay or hold_at:
    real_loss = train._default_loss
    calls = 0

    def slow_loss(model, batch, **kw):
        global calls
        calls += 1  # one loss per optimizer step (no gradient accumulation in these tests): the step number
        if calls == hold_at:
            folder = os.environ["LLMKIT_TEST_PID_DIR"]
            rank = os.environ.get("RANK", "0")
            with open(os.path.join(folder, f".rank{rank}.pid"), "w") as f:
                f.write(str(os.getpid()))
            os.replace(os.path.join(folder, f".rank{rank}.pid"), os.path.join(folder, f"rank{rank}.pid"))  # never half-written
            time.sleep(120)
            os._exit(3)  # the parent that should have killed this process is gone: do not run on without it
        time.sleep(delay)
        return real_loss(model, batch, **kw)

    train._default_loss = slow_loss

if kill_at:
    step, _, filename = kill_at.partition("/")
    real_open = open

    def killing_open(file, mode="r", *args, **kwargs):
        name = str(file)
        if "w" in mode and f"{step}/" in name.replace(".tmp-", "") and name.endswith(filename):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_open(file, mode, *args, **kwargs)

    real_fsync_tree = checkpoints._fsync_tree

    def killing_fsync_tree(folder):
        if filename == "COMPLETE" and folder.name == f".tmp-{step}":
            os.kill(os.getpid(), signal.SIGKILL)  # every file is written; the rename into place never happens
        return real_fsync_tree(folder)

    import builtins

    builtins.open = killing_open
    checkpoints._fsync_tree = killing_fsync_tree

from llmkit.cli import main  # noqa: E402

main(sys.argv[1:])
