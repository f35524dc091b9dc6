"""--report-to: each tracker, read back with its own reader, holds exactly metrics.jsonl's numbers at their steps, the
resolved recipe as its config, and the model card and loss.png; N processes make one tracker run; a missing tracker
package or a bad name is one line before anything is loaded.

Runs that use trackio or W&B run as subprocesses: trackio fixes its folder when first imported and W&B keeps a
service per process, so one pytest process must not hold them."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TRACKERS = ["tensorboard", "mlflow", "wandb", "trackio"]
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(t) is None for t in TRACKERS),
                                reason="the track extra is not installed: pip install -e '.[track]'")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", **extra}


def _train_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data / "train.txt"), "--eval-data", str(data / "eval.txt"),
            "--block-size", "16", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--mixed-precision", "no",
            "--set", "train.log_every=2", "--out", str(out)]


def expected(out: Path) -> dict[tuple[str, int], float]:
    """metrics.jsonl's numbers: {(name, step): value}."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {(k, r["step"]): v for r in rows for k, v in r.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


# ------------------------------------------------------------------------------------------- readers


def tensorboard_scalars(logdir: Path) -> tuple[dict[tuple[str, int], float], object]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}, acc


def mlflow_run(uri: str):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("llmkit")
    runs = client.search_runs([experiment.experiment_id])
    return client, runs


def mlflow_metrics(client, run) -> dict[tuple[str, int], float]:
    return {(k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)}


def wandb_records(path: Path):
    """The records of an offline run's .wandb file: W&B's LevelDB-style log (7-byte header, 32 KiB blocks of chunks:
    crc32c, length, type), each record a wandb_internal_pb2.Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk  # FULL, FIRST start a record; MIDDLE, LAST continue it
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_run(run_dir: Path) -> tuple[dict[tuple[str, int], float], dict[str, object], list[str], int | None]:
    """(history {(name, step): value}, config, files, exit code) of an offline run folder."""
    history, config, files, exit_code = {}, {}, [], None
    for record in wandb_records(next(run_dir.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history[(key, record.history.step.num)] = json.loads(item.value_json)
        elif kind in ("run", "config"):
            for item in (record.run.config if kind == "run" else record.config).update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "files":
            files += [f.path for f in record.files.files]
        elif kind == "exit":
            exit_code = record.exit.exit_code
    return history, config, files, exit_code


def trackio_store(folder: Path) -> dict:
    """trackio's own reader, in a fresh process pointed at `folder` (trackio reads TRACKIO_DIR at import)."""
    code = ("import json; from trackio.sqlite_storage import SQLiteStorage as S\n"
            "runs = S.get_runs('llmkit')\n"
            "print(json.dumps({'runs': runs, 'logs': S.get_logs('llmkit', runs[0]), 'config': S.get_run_config('llmkit', runs[0]),"
            " 'artifacts': sorted(a['name'] for a in S.list_artifacts('llmkit'))}))")
    proc = subprocess.run([sys.executable, "-c", code], env=_env(TRACKIO_DIR=str(folder)), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trackio_metrics(store: dict) -> dict[tuple[str, int], float]:
    return {(k, row["step"]): v for row in store["logs"] for k, v in row.items() if k not in ("step", "timestamp")}


# ------------------------------------------------------------------------------------------- tests


def test_every_tracker_holds_what_metrics_jsonl_holds(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    args = [*_train_args(tiny_gpt2, toy_data, out)] + [a for t in TRACKERS for a in ("--report-to", t)]
    proc = subprocess.run([sys.executable, "-m", "llmkit", *args], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"saved to {out}"  # trackers' chatter goes to stderr
    want = expected(out)
    keys = {k for k, _ in want}
    assert {"loss", "lr", "tokens_per_s", "samples_per_s", "epoch", "eval_loss", "eval_perplexity"} <= keys
    assert {s for _, s in want} == {2, 3, 4, 6}  # train lines at 2, 4, 6; evaluations at 3 and 6
    record = json.loads((out / "llmkit.json").read_text())
    tracking = out / "tracking"
    assert set(record["tracking"]) == set(TRACKERS) and record["train"]["report_to"] == TRACKERS

    # TensorBoard: every scalar at its step (stored as float32), the card as text, the curves as an image
    scalars, acc = tensorboard_scalars(tracking / "tensorboard")
    assert scalars.keys() == want.keys()
    assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())
    assert acc.Images("loss.png")[0].width > 100
    assert b"llmkit" in acc.Tensors("README.md/text_summary")[0].tensor_proto.string_val[0]

    # MLflow: one finished run in OUT/tracking/mlruns, exact values, the recipe as params, both files as artifacts
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, runs = mlflow_run((tracking / "mlruns").as_uri())
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_id == record["tracking"]["mlflow"]["run_id"]
    assert mlflow_metrics(client, runs[0]) == want
    params = runs[0].data.params
    assert params["train.max_steps"] == "6" and params["train.lr"] == str(record["train"]["lr"]) and params["task"] == "causal-lm"
    assert params["train.report_to"] == "tensorboard, mlflow, wandb, trackio" and params["machine.processes"] == "1"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id)} == {"README.md", "loss.png"}

    # W&B, offline: one run folder under OUT/tracking/wandb, its history, config and files
    (run_dir,) = (tracking / "wandb").glob("offline-run-*")
    history, config, files, exit_code = wandb_run(run_dir)
    assert history == want
    assert config["train.max_steps"] == 6 and config["model.name"] == str(tiny_gpt2) and config["data.eval"] == str(toy_data / "eval.txt")
    assert {"README.md", "loss.png"} <= set(files) and exit_code == 0
    assert (run_dir / "files" / "README.md").read_text() == (out / "README.md").read_text()  # a copy, not a link
    assert not (run_dir / "files" / "README.md").is_symlink()

    # trackio: its local store in OUT/tracking/trackio
    store = trackio_store(tracking / "trackio")
    assert store["runs"] == [out.name]
    assert trackio_metrics(store) == want
    assert store["config"]["train.max_steps"] == 6 and store["config"]["train.batch_size"] == 4
    assert store["artifacts"] == ["README.md", "loss.png"]


def test_distill_reports_its_loss_parts(cli, tiny_gpt2, toy_data, tmp_path):
    out = tmp_path / "student"
    code, _, err = cli("distill", "--teacher", tiny_gpt2, "--data", toy_data / "train.txt", "--student-layers", "1",
                            "--layer-selection", "even", "--block-size", "16", "--batch-size", "4", "--max-steps", "4",
                            "--mixed-precision", "no", "--set", "train.log_every=1", "--report-to", "tensorboard", "--out", out)
    assert code == 0, err
    assert f"tensorboard: tensorboard --logdir {out}/tracking/tensorboard" in err  # where to look, said once at the end
    want = expected(out)
    assert {("kd_loss", 4), ("ce_loss", 4), ("loss", 1)} <= want.keys()
    scalars, _ = tensorboard_scalars(out / "tracking" / "tensorboard")
    assert scalars.keys() == want.keys()
    assert all(scalars[k] == pytest.approx(v, rel=1e-6) for k, v in want.items())


def test_report_to_is_a_list_or_a_comma_separated_string(tmp_path):
    from llmkit.config import DistillConfig, load_recipe

    assert load_recipe(None).train.report_to == []
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  report_to: tensorboard\n")
    assert load_recipe(recipe).train.report_to == ["tensorboard"]
    recipe.write_text("train:\n  report_to: [wandb, mlflow]\n")
    assert load_recipe(recipe, ["train.report_to=tensorboard,trackio"]).train.report_to == ["tensorboard", "trackio"]
    assert load_recipe(None, [], {"train.report_to": ["mlflow"]}, cls=DistillConfig).train.report_to == ["mlflow"]


@pytest.mark.parametrize("command", ["finetune", "distill"])
@pytest.mark.parametrize(("flags", "message"), [
    (["--report-to", "comet"], "--report-to 'comet' is not one of none, tensorboard, mlflow, wandb, trackio"),
    (["--report-to", "none", "--report-to", "wandb"], "--report-to none cannot be combined with a tracker"),
    (["--set", "train.report_to=tensorbord"], "--report-to 'tensorbord' is not one of"),
])
def test_bad_report_to_is_one_line_exit_2(cli, tiny_gpt2, toy_data, tmp_path, command, flags, message):
    out = tmp_path / "out"
    model = ["--model" if command == "finetune" else "--teacher", tiny_gpt2]
    code, _, err = cli(command, *model, "--data", toy_data / "train.txt", "--out", out, *flags)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_a_missing_tracker_package_stops_before_anything_is_loaded(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    import llmkit.training.lifecycle
    import llmkit.training.trackers
    from llmkit.config import REPORT_TO

    monkeypatch.setattr(llmkit.training.trackers, "installed", lambda module: module not in ("wandb", "trackio"))
    monkeypatch.setattr(llmkit.training.lifecycle, "resolve", lambda *a, **k: pytest.fail("the model was resolved"))
    out = tmp_path / "out"
    code, _, err = cli("finetune", "--model", tiny_gpt2, "--data", toy_data / "train.txt", "--out", out,
                       "--report-to", "tensorboard", "--report-to", "wandb", "--report-to", "trackio")
    assert code == 2, err
    assert err.strip() == ("error: --report-to wandb trackio: wandb trackio are not installed; install the trackers with: "
                           "pip install 'llmkit[track]' (or pip install wandb trackio)")
    assert not out.exists()
    # and the real check: every name maps to its package, and the installed ones pass
    assert set(llmkit.training.trackers.PACKAGES) == set(REPORT_TO) - {"none"}
    monkeypatch.undo()
    llmkit.training.trackers.require_trackers([*TRACKERS, "none"])


def test_a_failed_run_is_marked_failed_where_the_environment_says(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI wins over OUT/tracking; a run that dies after its tracker started is FAILED there (the run
    folder itself is removed: nothing was checkpointed), with what was logged before."""
    import llmkit.training.lifecycle
    from llmkit.errors import Diverged

    def dies(job, accelerator):
        accelerator.log({"step": 1, "epoch": 0.1, "loss": 1.5, "lr": None}, step=1)
        raise Diverged("training diverged (injected)")

    uri = (tmp_path / "server").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setattr(llmkit.training.lifecycle, "fit", dies)
    out = tmp_path / "out"
    code, _, err = cli(*_train_args(tiny_gpt2, toy_data, out), "--report-to", "mlflow", "--quiet")
    assert code == 4 and "injected" in err
    assert not out.exists()
    client, runs = mlflow_run(uri)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert mlflow_metrics(client, runs[0]) == {("epoch", 1): 0.1, ("loss", 1): 1.5}  # None (NaN in metrics.jsonl) is left out


def test_a_tracker_that_cannot_start_is_one_line_before_training(cli, tiny_gpt2, toy_data, tmp_path, monkeypatch):
    import llmkit.training.lifecycle

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    monkeypatch.setattr(llmkit.training.lifecycle, "fit", lambda *a: pytest.fail("training started"))
    out = tmp_path / "out"
    code, _, err = cli(*_train_args(tiny_gpt2, toy_data, out), "--report-to", "tensorboard", "--report-to", "mlflow", "--quiet")
    assert code == 2 and err.startswith("error: --report-to mlflow: could not start the tracker's run (") and "bogus" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_two_processes_make_one_tracker_run(tiny_gpt2, toy_data, tmp_path, monkeypatch):
    """Under torchrun only the main process starts and logs the trackers' runs; the values are the reduced ones
    metrics.jsonl holds."""
    out = tmp_path / "run"
    args = [*_train_args(tiny_gpt2, toy_data, out)] + [a for t in TRACKERS for a in ("--report-to", t)]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "llmkit", *args, "--batch-size", "2"], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "llmkit.json").read_text())["machine"]["processes"] == 2
    want = expected(out)
    tracking = out / "tracking"
    scalars, _ = tensorboard_scalars(tracking / "tensorboard")
    assert len(list((tracking / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert scalars.keys() == want.keys()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client, runs = mlflow_run((tracking / "mlruns").as_uri())
    assert len(runs) == 1 and mlflow_metrics(client, runs[0]) == want
    (run_dir,) = (tracking / "wandb").glob("*run-*")
    assert wandb_run(run_dir)[0] == want
    store = trackio_store(tracking / "trackio")
    assert store["runs"] == [out.name] and trackio_metrics(store) == want
