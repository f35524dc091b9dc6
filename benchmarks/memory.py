"""Memory per process of every way to train SmolLM2-135M, and its speed; plain HF Trainer runs as the peer.

Same work for every row: 8 optimizer steps x 4 blocks x 256 tokens of Tiny Shakespeare (per process: the 2-process
rows split the global batch, 2 x 2), lr 1e-4, fp32. Per process: the training peak of the resident set size (RSS;
llmkit.json's `peak_memory_gb`, measured from the first step), `--estimate-memory`'s prediction of it, and the
whole run's peak with model loading (from the OS, for the peer too). Activation memory is measured, not assumed:
(training peak at batch 4 - at batch 1) x 4/3.

Targets (issue 17): FSDP 2-process peak per process <= 0.65x DDP's; checkpointing activations <= 0.5x at <= 1.4x
the time; QLoRA base weights <= 0.3x LoRA's.

Usage: python benchmarks/memory.py [--steps 8] [--skip-peer] [--rows ddp,fsdp]
(--rows: only these rows, of full, ddp, fsdp, ckpt, lora, qlora; a ratio is printed when its rows ran)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from _common import LLMKIT, SHARED, bundled_smollm2, estimate_gb, fields, first_line, run, run_facts

# --rows keys -> the row names printed
ROWS = {"full": "full, 1 process", "ddp": "full, DDP 2 processes", "fsdp": "full, FSDP 2 processes",
        "ckpt": "full + gradient checkpointing", "lora": "LoRA", "qlora": "QLoRA"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmkit"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)} (default: all)")
    a = p.parse_args()
    chosen = [r.strip() for r in a.rows.split(",") if r.strip()]
    if unknown := [r for r in chosen if r not in ROWS]:
        sys.exit(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    print(first_line(), flush=True)
    gguf = bundled_smollm2()
    data = SHARED / "data" / "tinyshakespeare"
    work = Path(tempfile.mkdtemp(prefix="llmkit-bench-memory-"))
    print(f"SmolLM2-135M, {a.steps} steps x 4 x 256 tokens (global), fp32; peak RSS of the largest process", flush=True)

    def llmkit(name: str, *extra: object, batch: int = 4, launcher: list[str] = LLMKIT) -> dict:
        out = work / name
        cmd = [*launcher, "finetune", "--model", "smollm2-135m", "--data", data / "train.txt", "--out", out, "--max-steps", a.steps,
               "--block-size", 256, "--lr", 1e-4, "--mixed-precision", "no", "--quiet", "--batch-size", batch, *extra]
        _, whole = peak_rss(cmd, name)
        facts = run_facts(out)
        total = estimate_gb(["--model", "smollm2-135m", "--data", data / "train.txt", "--out", out, "--block-size", 256, "--batch-size", batch,
                             "--mixed-precision", "no", *extra], env=_env(2 if launcher is TORCHRUN else 1))
        shutil.rmtree(out, ignore_errors=True)
        print(f"  {name}: training peak {facts['peak_memory_gb']:.2f} GB, whole run {whole:.2f} GB, {facts['train_tokens_per_s']} tokens/s",
              flush=True)
        return {"peak": facts["peak_memory_gb"], "whole": whole, "tps": facts["train_tokens_per_s"], "est": total}

    runs = {
        "full": lambda: llmkit("full"),
        "ddp": lambda: llmkit("ddp", batch=2, launcher=TORCHRUN),
        "fsdp": lambda: llmkit("fsdp", "--fsdp", batch=2, launcher=TORCHRUN),
        "ckpt": lambda: llmkit("ckpt", "--gradient-checkpointing"),
        "lora": lambda: llmkit("lora", "--method", "lora"),
        "qlora": lambda: llmkit("qlora", "--method", "qlora"),
    }
    rows = {ROWS[k]: runs[k]() for k in ROWS if k in chosen}
    act = {}
    if {"full", "ckpt"} <= set(chosen):
        act = {
            "full": (rows[ROWS["full"]]["peak"] - llmkit("full-b1", batch=1)["peak"]) * 4 / 3,
            "ckpt": (rows[ROWS["ckpt"]]["peak"] - llmkit("ckpt-b1", "--gradient-checkpointing", batch=1)["peak"]) * 4 / 3,
        }
    if not a.skip_peer:
        small_eval = work / "eval.txt"
        small_eval.write_text("\n".join((data / "validation.txt").read_text().splitlines()[:40]))
        for name, extra in (("peer HF Trainer, full", []), ("peer HF Trainer, LoRA", ["--lora"])):
            text, whole = peak_rss([sys.executable, SHARED / "bench" / "peer_clm_trainer.py", gguf.parent, data / "train.txt", small_eval,
                                    "--gguf", gguf.name, "--max-steps", a.steps, "--block", 256, "--bs", 4, "--lr", 1e-4, *extra], name)
            rows[name] = {"peak": float("nan"), "whole": whole, "tps": fields(text, "peer_clm")["tokens_per_s"], "est": float("nan")}

    print(f"{'run':<32} {'training peak GB':>16} {'estimate GB':>11} {'whole-run peak GB':>17} {'tokens/s':>9}   (per process)")
    for name, r in rows.items():
        print(f"{name:<32} {r['peak']:16.2f} {r['est']:11.2f} {r['whole']:17.2f} {r['tps']:9.1f}", flush=True)

    full, ddp, fsdp, ckpt = (rows.get(ROWS[k]) for k in ("full", "ddp", "fsdp", "ckpt"))
    if ddp and fsdp:
        print(f"ratio FSDP/DDP training peak per process = {fsdp['peak'] / ddp['peak']:.2f} (target <= 0.65); whole run "
              f"(model loading included) = {fsdp['whole'] / ddp['whole']:.2f} (target <= 0.65)")
    if full and ckpt:
        print(f"ratio activations checkpointing/plain = {act['ckpt'] / act['full']:.2f} ({act['ckpt']:.2f} vs {act['full']:.2f} GB; "
              f"target <= 0.5) at time x{full['tps'] / ckpt['tps']:.2f} (target <= 1.4)")
    if "qlora" in chosen:
        base_ratio, layers_ratio = qlora_base_ratio()
        print(f"ratio QLoRA/LoRA base weight bytes = {base_ratio:.2f} (target <= 0.3); of the blocks' linear layers alone "
              f"(what NF4 stores; SmolLM2's tied 28M-parameter embedding stays fp32) = {layers_ratio:.2f}")
    if not a.skip_peer and full and ROWS["lora"] in rows:
        print(f"ratio whole-run peak llmkit/peer: full {full['whole'] / rows['peer HF Trainer, full']['whole']:.2f}, "
              f"LoRA {rows[ROWS['lora']]['whole'] / rows['peer HF Trainer, LoRA']['whole']:.2f}; tokens/s llmkit/peer: "
              f"full {full['tps'] / rows['peer HF Trainer, full']['tps']:.2f}, LoRA {rows[ROWS['lora']]['tps'] / rows['peer HF Trainer, LoRA']['tps']:.2f}")
    shutil.rmtree(work, ignore_errors=True)


def _env(processes: int) -> dict[str, str]:
    import os

    return {**os.environ, "WORLD_SIZE": str(processes), "LOCAL_WORLD_SIZE": str(processes)}


def peak_rss(cmd: list[object], label: str) -> tuple[str, float]:
    """Run a command in a fresh Python that reports the peak RSS of its largest (grand)child over the whole run,
    model loading included (RUSAGE_CHILDREN: the largest waited-for descendant, counted per waiting process)."""
    probe = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
             "sys.stdout.write(p.stdout + p.stderr); print(f'PEAK_KB={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); "
             "sys.exit(p.returncode)")
    text, _ = run([sys.executable, "-c", probe, *cmd], label)
    kb = float(text.rsplit("PEAK_KB=", 1)[1].split()[0])
    return text, kb * 1024 / 1e9


def qlora_base_ratio() -> tuple[float, float]:
    """Bytes of SmolLM2's frozen base as QLoRA holds it (NF4 blocks + fp32 embeddings and norms) / as LoRA holds it (fp32);
    and the same for the blocks' linear layers alone."""
    from llmkit.models import base_folder, base_weight_bytes, keep_base, load_4bit, load_tokenizer, resolve
    ref = resolve("smollm2-135m")
    if not (base_folder(ref) / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from llmkit.models import from_pretrained_checked
        keep_base(ref, from_pretrained_checked(AutoModelForCausalLM, ref, False, dtype=torch.float32), load_tokenizer(ref))
    import torch
    from transformers import AutoModelForCausalLM

    q_model = load_4bit(base_folder(ref), progress=False, gradient_checkpointing=False)
    fp32 = AutoModelForCausalLM.from_pretrained(base_folder(ref), dtype=torch.float32)
    linear = {n for n, m in fp32.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    q_linear = sum(base_weight_bytes(m) for n, m in q_model.named_modules() if n in linear)
    f_linear = sum(m.weight.numel() * 4 for n, m in fp32.named_modules() if n in linear)
    return base_weight_bytes(q_model) / sum(p.numel() * p.element_size() for p in fp32.parameters()), q_linear / f_linear


if __name__ == "__main__":
    main()
