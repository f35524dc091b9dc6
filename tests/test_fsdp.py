"""`--fsdp` under torchrun with 2 CPU processes (gloo): same training as one process, half the bytes per process,
and every checkpoint guarantee of unsharded runs (SIGKILL + --resume, a kill during a sharded save)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # real torchrun processes: ~4 min in all

CHILD = Path(__file__).parent / "reliability" / "_child.py"  # llmkit's CLI, with faults injected from the environment


def env(**extra: str) -> dict[str, str]:
    base = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    for key in ("LLMKIT_TEST_STEP_DELAY", "LLMKIT_TEST_KILL_AT", "LLMKIT_TEST_HOLD_AT", "LLMKIT_TEST_PID_DIR"):
        base.pop(key, None)
    return {**base, **extra}


def torchrun(args: list, nproc: int = 2, script: Path = CHILD, **extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), str(script), *map(str, args)]


def run(args: list, nproc: int = 2, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun(args, nproc), env=env(**extra), capture_output=True, text=True, timeout=300)


def losses(out: Path) -> list[float]:
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the half-written last line of a killed run
            continue
    return [r["loss"] for r in rows if "loss" in r]


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    name = "model.safetensors" if (out / "model.safetensors").exists() else "adapter_model.safetensors"
    return load_file(out / name)


def max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert set(wa) == set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def models(tiny_gpt2, tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """The tiny models with dropout off: each process draws its own masks, so with dropout runs match only statistically."""
    import shutil

    out = {}
    for arch, src in (("gpt2", tiny_gpt2), ("llama", tiny_llama)):
        dst = tmp_path_factory.mktemp(f"nodropout-{arch}")
        shutil.copytree(src, dst, dirs_exist_ok=True)
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attention_dropout=0.0)
        (dst / "config.json").write_text(json.dumps(cfg))
        out[arch] = dst
    return out


def finetune(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data / "train.txt", "--out", out, "--block-size", "16", "--lr", "1e-3",
            "--mixed-precision", "no", "--seed", "0", "--set", "train.log_every=1", "--set", "lora.dropout=0", "--quiet", *extra]


@pytest.mark.parametrize("arch,method", [("gpt2", "full"), ("llama", "full"), ("gpt2", "lora"), ("llama", "lora")])
def test_two_sharded_processes_match_one_process(models, toy_data, tmp_path, arch, method):
    common = ("--method", method, "--max-steps", "6", "--eval-data", str(toy_data / "eval.txt"), "--eval-every", "3")
    one = subprocess.run([sys.executable, str(CHILD), *map(str, finetune(models[arch], toy_data, tmp_path / "one", *common, "--batch-size", "8"))],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run(finetune(models[arch], toy_data, tmp_path / "two", *common, "--batch-size", "4", "--fsdp"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(losses(tmp_path / "two")) == 6
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert max_diff(tmp_path / "one", tmp_path / "two") < 1e-4
    evals = [json.loads((tmp_path / d / "llmkit.json").read_text())["llmkit"]["metrics"]["eval_loss"] for d in ("one", "two")]
    assert evals[1] == pytest.approx(evals[0], rel=1e-4)  # evaluation (and the best-model copy) on the sharded model
    # the saved folder is the same kind as an unsharded run's: plain transformers / peft load it
    saved = json.loads((tmp_path / "two" / ("config.json" if method == "full" else "adapter_config.json")).read_text())
    if method == "full":
        assert saved["architectures"] == json.loads((models[arch] / "config.json").read_text())["architectures"]
    run_info = json.loads((tmp_path / "two" / "llmkit.json").read_text())
    assert run_info["train"]["fsdp"] is True and run_info["machine"]["processes"] == 2


def test_each_process_holds_about_half_the_bytes(models, tmp_path):
    script = tmp_path / "sizes.py"
    script.write_text(f"""
import json, os, torch, torch.distributed as dist
from transformers import AutoModelForCausalLM
from llmkit.training.sharding import local_bytes, shard
dist.init_process_group("gloo")
model = AutoModelForCausalLM.from_pretrained({str(models["llama"])!r}, dtype=torch.float32)
whole = local_bytes(model)[0]
shard(model, "cpu", "no")
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 300, (2, 16))
model(input_ids=x, labels=x).loss.backward()
opt.step()
params, optim = local_bytes(model, opt)
json.dump({{"whole": whole, "params": params, "optim": optim}}, open({str(tmp_path)!r} + f"/rank{{dist.get_rank()}}.json", "w"))
dist.destroy_process_group()
""")
    proc = subprocess.run(torchrun([], script=script), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["params"] <= 0.6 * got["whole"], got
        assert got["optim"] <= 0.6 * 2 * got["whole"], got  # AdamW's two moments of the whole model would be 2x


def held_ranks(proc: subprocess.Popen, folder: Path, nproc: int = 2, timeout: float = 240) -> list[int]:
    """The pids of the `nproc` ranks, once each is holding at LLMKIT_TEST_HOLD_AT (tests/reliability/_child.py)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        pids = [folder / f"rank{rank}.pid" for rank in range(nproc)]
        if all(p.exists() for p in pids):
            return [int(p.read_text()) for p in pids]
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"the ranks never reached the hold ({sorted(p.name for p in folder.iterdir())} in {folder})")


def running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie, dead and waiting for init to reap it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows the command name, which may hold spaces


def hard_kill(launcher: subprocess.Popen, ranks: list[int]) -> None:
    """SIGKILL torchrun and every rank, and see them all gone.

    Killing the launcher's process group is not enough: torch.distributed.elastic starts each worker in a session of its
    own (so that it can kill a worker's whole group), so the ranks would live on, finish the run and race the --resume
    run for the same folder. A SIGKILL cannot be forwarded, so each rank's group is killed here too; the launcher
    first, so that it cannot see its workers die and tear down or restart anything itself."""
    os.killpg(launcher.pid, signal.SIGKILL)
    for pid in ranks:
        try:
            group = os.getpgid(pid)
        except ProcessLookupError:  # in the launcher's group after all (another torch), and gone with it
            continue
        assert group != os.getpgrp()  # never this test's own group
        os.killpg(group, signal.SIGKILL)
    launcher.wait()
    assert launcher.returncode == -signal.SIGKILL
    deadline = time.time() + 30
    while any(running(pid) for pid in ranks) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in ranks), [pid for pid in ranks if running(pid)]


def test_sigkill_and_a_kill_during_a_sharded_save_resume_to_the_same_weights(models, toy_data, tmp_path):
    steps = ("--max-steps", "12", "--save-every", "3", "--batch-size", "4", "--fsdp", "--set", "train.keep_checkpoints=3")
    reference = tmp_path / "reference"
    done = run(finetune(models["gpt2"], toy_data, reference, *steps))
    assert done.returncode == 0, done.stderr[-3000:]

    # 1. SIGKILL the whole job (both ranks and torchrun) mid-run, after two checkpoints: both ranks hold at the start of
    # step 8 until killed, so the kill lands at the same point every time and never after the run's end
    killed, held = tmp_path / "killed", tmp_path / "held"
    held.mkdir()
    proc = subprocess.Popen(torchrun(finetune(models["gpt2"], toy_data, killed, *steps)),
                            env=env(LLMKIT_TEST_HOLD_AT="8", LLMKIT_TEST_PID_DIR=str(held)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    hard_kill(proc, held_ranks(proc, held))
    assert len(losses(killed)) == 7 and not (killed / "model.safetensors").exists()
    assert (killed / "checkpoints" / "step-00000006" / "sharded").is_dir()
    assert not (killed / "checkpoints" / "step-00000009").exists()
    resumed = run(finetune(models["gpt2"], toy_data, killed, *steps, "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(killed) == pytest.approx(losses(reference), rel=1e-5)
    assert max_diff(killed, reference) < 1e-5

    # 2. kill rank 0 after every shard of step 6 is written, before the checkpoint is renamed into place
    torn = tmp_path / "torn"
    died = run(finetune(models["gpt2"], toy_data, torn, *steps), LLMKIT_TEST_KILL_AT="step-00000006/COMPLETE")
    assert died.returncode != 0
    ckpts = torn / "checkpoints"
    assert (ckpts / "step-00000003" / "COMPLETE").exists() and not (ckpts / "step-00000006").exists()
    # resuming with another number of processes is refused in one line, before anything changes
    one = subprocess.run([sys.executable, str(CHILD), *map(str, finetune(models["gpt2"], toy_data, torn, *steps, "--resume"))],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 2 and "written by 2 processes" in one.stderr and "Traceback" not in one.stderr
    again = run(finetune(models["gpt2"], toy_data, torn, *steps, "--resume"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ignoring the incomplete checkpoint" in again.stderr
    assert losses(torn) == pytest.approx(losses(reference), rel=1e-5)
    assert max_diff(torn, reference) < 1e-5


SPY = '''
import json, os, sys
import safetensors, safetensors.torch, transformers.modeling_layers, transformers.modeling_utils
import llmkit.training.sharding

rank, opened, meta = int(os.environ["RANK"]), [], {}

def spying(real):
    def spy(path, *args, **kwargs):
        opened.append(os.path.basename(str(path)))
        return real(path, *args, **kwargs)
    return spy

# every way transformers and safetensors open a weights file
for module, name in ((transformers.modeling_utils, "safe_open"), (transformers.modeling_layers, "safe_open"), (safetensors, "safe_open"),
                     (safetensors.torch, "load_file"), (safetensors.torch, "load")):
    if hasattr(module, name):
        setattr(module, name, spying(getattr(module, name)))
real_shard = llmkit.training.sharding.shard

def shard(model, *args, **kwargs):
    meta.update(all=all(p.is_meta for p in model.parameters()), any=any(p.is_meta for p in model.parameters()),
                buffers=[n for n, b in model.named_buffers() if b.is_meta], opened=list(opened))
    return real_shard(model, *args, **kwargs)

llmkit.training.sharding.shard = shard
from llmkit.cli import main
try:
    main(sys.argv[1:])
finally:
    with open(os.path.join(os.environ["SPY_OUT"], f"rank{rank}.json"), "w") as f:
        json.dump(meta, f)
'''


@pytest.mark.parametrize("ties", ["tied", "config-only"])
def test_only_rank_0_reads_the_weights_and_the_others_receive_their_shards(models, toy_data, tmp_path, ties):
    """Loading once (sharding.load_once): rank 1 builds the model on the meta device and never opens model.safetensors;
    after sharding it gets rank 0's weights. Tied embeddings (SmolLM2's; "config-only": the config ties them but the
    checkpoint holds two different matrices, so transformers does not, which only rank 0 can see), Llama's rotary buffers
    (in no state dict: computed, not sent) and gradient checkpointing: the run still equals one unsharded process."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied-llama"
    shutil.copytree(models["llama"], tied)
    if ties == "tied":  # one matrix in the checkpoint
        model = AutoModelForCausalLM.from_pretrained(models["llama"], dtype=torch.float32)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        model.save_pretrained(tied)
        assert model.lm_head.weight is model.get_input_embeddings().weight
    else:
        cfg = json.loads((tied / "config.json").read_text())
        (tied / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    script = tmp_path / "spy.py"
    script.write_text(SPY)
    common = ("--max-steps", "4", "--gradient-checkpointing")
    one = subprocess.run([sys.executable, str(CHILD), *map(str, finetune(tied, toy_data, tmp_path / "one", *common, "--batch-size", "8"))],
                         env=env(), capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(torchrun(finetune(tied, toy_data, tmp_path / "two", *common, "--batch-size", "4", "--fsdp"), script=script),
                         env=env(SPY_OUT=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "model.safetensors" in rank0["opened"] and not rank0["any"], rank0  # the spy sees rank 0 load: it would see rank 1
    assert rank1["opened"] == [] and rank1["all"] and rank1["buffers"] == [], rank1  # parameters on meta, buffers real
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
    assert max_diff(tmp_path / "one", tmp_path / "two") < 1e-4
