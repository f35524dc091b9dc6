"""`--report-to`: the run in an experiment tracker, through Accelerate's trackers.

    llmkit finetune --model smollm2-135m --data train.txt --max-steps 50 --report-to tensorboard --report-to mlflow --out runs/x
    tensorboard --logdir runs/x/tracking/tensorboard
    MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri runs/x/tracking/mlruns   # the full mlflow package
    wandb sync runs/x/tracking/wandb/offline-run-*                                     # upload an offline W&B run
    TRACKIO_DIR=runs/x/tracking/trackio trackio show --project llmkit

Each tracker gets what the run folder holds, from the main process only (Accelerate's `init_trackers` and `log` run
there, so N processes make one tracker run):
- the run's config: llmkit.json's resolved recipe and machine facts, flattened to `section.key` scalars;
- every metrics.jsonl line's numbers at its step (train loss, lr, tokens/s, eval metrics, distillation and preference
  parts): train.StepLog hands each line it writes to `accelerator.log`;
- at the end, the model card (README.md) and loss.png: MLflow and trackio artifacts, W&B run files, TensorBoard an
  image and a text.

Logs go under OUT/tracking/ unless the tracker's own environment says otherwise: MLFLOW_TRACKING_URI and
MLFLOW_EXPERIMENT_NAME; WANDB_DIR, WANDB_MODE, WANDB_PROJECT, WANDB_NAME; TRACKIO_DIR. W&B runs offline (`wandb sync`
uploads it later) unless WANDB_MODE is set or an API key is (WANDB_API_KEY, or `wandb login`). A run that fails is
marked so (W&B exit code, MLflow FAILED / KILLED). A `--resume`d run is a new tracker run, from the step it resumed at.

accelerate, torch and the trackers are imported only when a run starts (`tracker_classes`), so that validating
flags stays instant.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmkit.errors import UsageError
from llmkit.runfolder import LOSS_PLOT
from llmkit.training.checkpoints import max_over_processes

TRACKING = "tracking"  # OUT/tracking/: every tracker's local files
PROJECT = "llmkit"  # the W&B / trackio project and the MLflow experiment, unless the environment names another
EXTRA = "pip install 'llmkit[track]'"
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb", "trackio": "trackio"}


def chosen(report_to: list[str]) -> list[str]:
    """The trackers asked for, each once, in order ("none" is none)."""
    return list(dict.fromkeys(r for r in report_to if r != "none"))


def require_trackers(report_to: list[str]) -> None:
    """Before anything is loaded or written: every tracker asked for is installed (one line naming the extra if not).
    Accelerate itself would silently skip a tracker whose package is missing."""
    missing = [name for name in chosen(report_to) if not installed(name)]
    if missing:
        packages = " ".join(PACKAGES[m] for m in missing)
        raise UsageError(f"--report-to {' '.join(missing)}: {packages} {'is' if len(missing) == 1 else 'are'} not installed; "
                         f"install the trackers with: {EXTRA} (or pip install {packages})")


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def make_trackers(report_to: list[str], out: Path, quiet: bool = False) -> list[Any] | None:
    """Accelerator(log_with=...): one tracker per name, logging under `out`; None when there are none."""
    names = chosen(report_to)
    if not names:
        return None
    classes = tracker_classes()
    return [classes[name](out, quiet) for name in names]


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """{"train.lr": 5e-05, "labels": "neg, pos", "data.eval": "None", ...}: what every tracker's config takes."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ", ".join(str(v) for v in value)
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def metrics(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl line's numbers, without its step (NaN was already written as None, which is left out)."""
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def tracking(accelerator: Any, out: Path, record: dict[str, Any], quiet: bool = False) -> Iterator[None]:
    """Around training and saving: start the trackers' runs with the config (and say in `record` where they are), add
    the model card and loss.png once the folder is published, or mark the runs failed. Accelerate's `end_training`
    finishes them after a success."""
    if not accelerator.log_with:  # the same on every process
        yield
        return
    failed = None
    try:
        accelerator.init_trackers(PROJECT, config=flatten(record))  # main process only
        record["tracking"] = {t.name: t.where() for t in accelerator.trackers}  # into llmkit.json
    except Exception as e:  # a tracking server that is down, a bad URI: one line, before any training
        _abandon(accelerator, 1)
        failed = e
    if max_over_processes(accelerator, [float(failed is not None)])[0]:  # every process stops, none waits for the main
        raise UsageError(_start_error(failed))
    try:
        yield
    except BaseException as e:
        _abandon(accelerator, getattr(e, "exit_code", 1))
        raise
    files = [f for f in (out / "README.md", out / LOSS_PLOT) if f.is_file()]
    for tracker in accelerator.trackers:
        try:
            tracker.log_files(files)
        except Exception as e:  # the model is published: a tracker that cannot take its files does not fail the run
            print(f"warning: --report-to {tracker.name}: the model card and loss.png were not logged ({_first_line(e)})",
                  file=sys.stderr)
        if not quiet:
            print(f"{tracker.name}: {tracker.hint()}", file=sys.stderr)


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def _start_error(e: BaseException | None) -> str:
    if e is None:
        return "--report-to: the main process could not start the tracker's run (its error is in that process's output)"
    which = type(e).__module__.split(".")[0]
    return f"--report-to{' ' + which if which in PACKAGES else ''}: could not start the tracker's run ({_first_line(e)})"


def _abandon(accelerator: Any, exit_code: int) -> None:
    """Finish every started tracker as failed, and forget them: nothing may finish them twice."""
    for tracker in accelerator.trackers:
        with contextlib.suppress(Exception):  # the run's own error is the one to report
            tracker.fail(exit_code)
    accelerator.trackers.clear()


def _wandb_key() -> bool:
    """An API key is there: WANDB_API_KEY, or `wandb login`'s entry in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host or "") is not None
    except (OSError, netrc.NetrcParseError):
        return False


@contextlib.contextmanager
def _stdout_to_stderr(quiet: bool) -> Iterator[None]:
    """trackio prints its news on stdout, which is for results."""
    with open(os.devnull, "w") if quiet else contextlib.nullcontext(sys.stderr) as sink, contextlib.redirect_stdout(sink):
        yield


@functools.cache
def tracker_classes() -> dict[str, type]:
    """Accelerate's trackers, each told where to log and how to take the run's files and a failure."""
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, TrackioTracker, WandBTracker

    class Numbers:
        """`accelerator.log(metrics.jsonl line, step)` reaches every tracker as the line's numbers."""

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            super().log(metrics(values), step=step, **kwargs)  # type: ignore[misc]

    class TensorBoard(Numbers, TensorBoardTracker):
        def __init__(self, out: Path, quiet: bool) -> None:
            super().__init__("tensorboard", out / TRACKING)  # event files in OUT/tracking/tensorboard/
            self.step: int | None = None

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            self.step = step if step is not None else self.step
            super().log(values, step=step, **kwargs)

        def where(self) -> dict[str, Any]:
            return {"logdir": str(Path(self.logging_dir).resolve())}

        def hint(self) -> str:
            return f"tensorboard --logdir {self.logging_dir}"

        def log_files(self, files: list[Path]) -> None:
            import numpy as np
            from PIL import Image

            for f in files:
                if f.suffix == ".png":
                    self.writer.add_image(f.name, np.asarray(Image.open(f).convert("RGB")), self.step, dataformats="HWC")
                else:  # the model card, as markdown in TensorBoard's Text tab
                    self.writer.add_text(f.name, f.read_text(encoding="utf-8"), self.step)
            self.writer.flush()

        def fail(self, exit_code: int) -> None:
            self.finish()

    class MLflow(Numbers, MLflowTracker):
        def __init__(self, out: Path, quiet: bool) -> None:
            super().__init__(PROJECT, run_name=out.name)  # Accelerate lets MLFLOW_EXPERIMENT_NAME, MLFLOW_RUN_ID, ... win
            self.uri = os.environ.get("MLFLOW_TRACKING_URI") or (out / TRACKING / "mlruns").resolve().as_uri()

        def start(self) -> None:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):  # MLflow 3 keeps its plain-folder store only when asked to
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri(self.uri)  # set, not left to the environment: an earlier run in this process set it
            super().start()

        def where(self) -> dict[str, Any]:
            return {"tracking_uri": self.uri, "experiment_id": self.active_run.info.experiment_id,
                    "run_id": self.active_run.info.run_id}

        def hint(self) -> str:
            return f"run {self.active_run.info.run_id} in {self.uri}"

        def log_files(self, files: list[Path]) -> None:
            import mlflow

            for f in files:
                mlflow.log_artifact(str(f))

        def fail(self, exit_code: int) -> None:
            import mlflow

            mlflow.end_run(status="KILLED" if exit_code in (130, 143) else "FAILED")

    class WandB(Numbers, WandBTracker):
        def __init__(self, out: Path, quiet: bool) -> None:
            kwargs: dict[str, Any] = {}
            if not os.environ.get("WANDB_DIR"):
                kwargs["dir"] = str(out / TRACKING)  # W&B adds wandb/<run>/
            if not os.environ.get("WANDB_MODE") and not _wandb_key():
                kwargs["mode"] = "offline"
            if not os.environ.get("WANDB_NAME"):
                kwargs["name"] = out.name
            super().__init__(os.environ.get("WANDB_PROJECT") or PROJECT, **kwargs)
            self.quiet = quiet

        def start(self) -> None:
            import wandb

            if "dir" in self.init_kwargs:
                Path(self.init_kwargs["dir"]).mkdir(parents=True, exist_ok=True)
            if self.quiet:
                self.init_kwargs["settings"] = wandb.Settings(silent=True)
            super().start()

        def where(self) -> dict[str, Any]:
            return {"dir": str(Path(self.run.dir).parent.resolve()), "project": self.run.project, "id": self.run.id,
                    "mode": "offline" if self.run.offline else "online", "url": None if self.run.offline else self.run.url}

        def hint(self) -> str:
            return f"offline; upload with: wandb sync {Path(self.run.dir).parent}" if self.run.offline else self.run.url

        def log_files(self, files: list[Path]) -> None:
            for f in files:  # copies in the run's files folder (a link would break when OUT moves), uploaded now
                shutil.copyfile(f, Path(self.run.dir) / f.name)
                self.run.save(str(Path(self.run.dir) / f.name), base_path=self.run.dir, policy="now")

        def fail(self, exit_code: int) -> None:
            self.run.finish(exit_code=exit_code or 1)

    class Trackio(TrackioTracker):
        def __init__(self, out: Path, quiet: bool) -> None:
            super().__init__(PROJECT, name=out.name)
            self.dir, self.quiet = out / TRACKING / "trackio", quiet

        def start(self) -> None:
            # trackio reads TRACKIO_DIR once, when it is first imported: a second run in one Python process logs
            # where the first did (llmkit.json's "tracking" says where)
            if "trackio" not in sys.modules and not os.environ.get("TRACKIO_DIR"):
                os.environ["TRACKIO_DIR"] = str(self.dir.resolve())
            with _stdout_to_stderr(self.quiet):
                super().start()

        def store_init_configuration(self, values: dict) -> None:
            # Accelerate's updates `trackio.config`, which no run reads (trackio 0.4x); the run logs its own with its
            # first values
            self.run.config.update(values)

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            self.run.log(metrics(values), step=step)  # Accelerate 1.9's drops the step

        def where(self) -> dict[str, Any]:
            from trackio.utils import TRACKIO_DIR

            return {"dir": str(TRACKIO_DIR), "project": PROJECT, "run": self.run.name}

        def hint(self) -> str:
            from trackio.utils import TRACKIO_DIR

            return f"TRACKIO_DIR={TRACKIO_DIR} trackio show --project {PROJECT}"

        def log_files(self, files: list[Path]) -> None:
            with _stdout_to_stderr(self.quiet):
                for f in files:
                    self.run.log_artifact(str(f), name=f.name)

        def finish(self) -> None:
            import trackio

            with _stdout_to_stderr(self.quiet):
                trackio.finish()  # not only the run's own finish: trackio would finish it again at exit, on stdout

        def fail(self, exit_code: int) -> None:
            self.finish()

    return {"tensorboard": TensorBoard, "mlflow": MLflow, "wandb": WandB, "trackio": Trackio}
