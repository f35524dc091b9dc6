"""What machine a run used: CPU model and the flags that decide fast kernels, threads, precision.

Machines differ between sessions and users (a Xeon with AMX trains bf16 2x faster; one with only AVX512-BF16 is
slower in bf16 than fp32), so every run records these facts in llmkit.json and every benchmark prints them first.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The CPU features that decide which precision and kernels are fast (GUIDE §3: bf16 autocast only pays with AMX).
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni")


@functools.cache
def cpu_info() -> tuple[str, frozenset[str]]:
    """(CPU model name, its feature flags), from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), frozenset()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    name = value.strip()
                elif key.strip() in ("flags", "Features"):  # x86 / ARM
                    flags = frozenset(value.split())
                    break
    except OSError:  # not Linux: the name alone
        pass
    return name, flags


def physical_cores() -> int:
    """Cores this process may use; matmul threads beyond the physical cores only add contention."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------- threads on a shared machine
#
# llama.cpp (and torch) split every matrix product across their threads and wait at a barrier after each step,
# spinning rather than sleeping. When another process holds one of the cores, the thread that lost it stalls every
# barrier until the scheduler gives it back: measured here with a LoRA run on both cores, SmolLM2's 16 tokens
# took 12 s on 2 threads and 1 s on 1. So the default is the cores other processes leave idle, measured from
# /proc/stat, and long generations measure again as they go (`CoreWatch`).

# A core counts as ours when less than this share of it is busy with other processes: an idle machine's
# background (logs, a shell) must not cost half the speed, a steady competitor on a core must.
_SPARE = 0.3


@dataclass(frozen=True)
class CpuSample:
    """Jiffies of the cores this process may use, and this process's own CPU seconds, at one moment."""

    when: float  # time.monotonic()
    busy: int  # jiffies spent busy (user, nice, system, irq, softirq, steal) on those cores
    total: int  # all their jiffies
    own: float  # this process's CPU seconds, all threads
    cores: int


def parse_proc_stat(text: str, cpus: set[int] | None = None) -> tuple[int, int, int]:
    """(busy jiffies, total jiffies, cores counted) from /proc/stat's text, over `cpus` (None: all of them)."""
    busy = total = n = 0
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = v
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
        n += 1
    return busy, total, n


def cpu_sample() -> CpuSample | None:
    """Now's CpuSample, or None where there is no /proc/stat (not Linux)."""
    try:
        text = Path("/proc/stat").read_text()
        cpus = set(os.sched_getaffinity(0))
    except (OSError, AttributeError):
        return None
    busy, total, n = parse_proc_stat(text, cpus)
    if not n:  # a /proc/stat without per-core lines
        return None
    t = os.times()
    return CpuSample(time.monotonic(), busy, total, t.user + t.system, n)


def idle_cores(before: CpuSample, after: CpuSample, hz: int | None = None) -> float | None:
    """Cores that processes other than this one left idle between two samples; None when too close to tell."""
    hz = hz or os.sysconf("SC_CLK_TCK")
    total = after.total - before.total
    if total < 4 * after.cores:  # under ~40 ms per core: a few jiffies would swing the answer
        return None
    others = max(0.0, (after.busy - before.busy) - (after.own - before.own) * hz)
    return max(0.0, after.cores * (1 - min(1.0, others / total)))


def threads_for(idle: float | None, cores: int) -> int:
    """Threads to compute with when `idle` of `cores` cores are free: every core when unknown, never fewer than 1."""
    if idle is None:
        return cores
    return max(1, min(cores, math.floor(idle + _SPARE)))


class CoreWatch:
    """The thread count for this machine as it is now: `choose()` once at start, `recheck()` as work goes on.

        >>> watch = CoreWatch()                  # first sample
        >>> load_model(...)                      # anything; its own CPU time does not count as busy
        >>> n = watch.choose()                   # waits out the rest of `window` s if less has passed
        >>> if (m := watch.recheck()) is not None: set_threads(m)   # at most every `every` s, None when unchanged
    """

    def __init__(self, cores: int | None = None, *, window: float = 0.1, every: float = 1.0,
                 sample: Callable[[], CpuSample | None] = cpu_sample) -> None:
        self._sample, self.window, self.every = sample, window, every
        self.cores = cores or physical_cores()
        self.last = sample()
        self.threads = self.cores

    def choose(self) -> int:
        if self.last is not None:
            time.sleep(max(0.0, self.window - (time.monotonic() - self.last.when)))
        self.recheck(force=True)
        return self.threads

    def recheck(self, force: bool = False) -> int | None:
        """A new thread count when it changed since the last check (at most every `every` s), else None."""
        if self.last is None or (not force and time.monotonic() - self.last.when < self.every):
            return None
        now = self._sample()
        if now is None:
            return None
        idle = idle_cores(self.last, now)
        if idle is None:
            return None
        self.last = now
        threads = min(threads_for(idle, now.cores), self.cores)
        if threads == self.threads:
            return None
        self.threads = threads
        return threads


def idle_threads(cores: int | None = None) -> int:
    """Threads for work starting now (a 0.1 s look at the machine): the cores other processes leave idle."""
    return CoreWatch(cores).choose()


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch computes with at most `n` threads for a while (a conversion on a busy machine), then as before."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(n, before)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a while: C libraries (llama.cpp) write there, past sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def cpu_has_amx() -> bool:
    """CPUs with bf16 matrix tiles (Intel AMX), where bf16 autocast pays off.

    AVX512-BF16 alone is not enough: measured on such a Xeon (MiniLM-L6 seq-cls, 60 steps x 32), bf16 autocast
    ran at 0.71x the samples/s of fp32, because the casts cost more than the bf16 dot products save.
    """
    return "amx_bf16" in cpu_info()[1]


def cpu_line() -> str:
    """`cpu: Intel(R) Xeon(R) ... (2 cores) amx_bf16=no amx_int8=no avx512_bf16=yes avx512_vnni=yes`."""
    name, flags = cpu_info()
    return f"cpu: {name} ({os.cpu_count()} cores) " + " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in CPU_FLAGS)


def facts(device: str = "cpu", precision: str | None = None, processes: int = 1) -> dict[str, Any]:
    """llmkit.json's "machine" section: enough to trace any number back to the hardware and settings behind it."""
    import torch

    name, flags = cpu_info()
    out: dict[str, Any] = {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "cores": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "device": device,
                           "processes": processes}
    if precision is not None:
        out["precision"] = "fp32" if precision == "no" else precision
    if device == "cuda" and torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def summary(m: dict[str, Any]) -> str:
    """`1 process, fp32, 2 threads on Intel(R) Xeon(R) Platinum 8480+ (amx_bf16 avx512_bf16)`."""
    where = m.get("gpu") or f"{m['threads']} threads on {m['cpu']} ({' '.join(m['cpu_flags']) or 'no amx/avx512'})"
    precision = m["precision"] if m["precision"] == "fp32" else f"{m['precision']} mixed precision"
    return f"{m['processes']} process{'es' if m['processes'] > 1 else ''}, {precision}, {where}"


def return_freed_memory(mmap_threshold: int | None = None) -> None:
    """Give memory freed so far back to the OS (glibc keeps freed blocks mapped for reuse): loading and de-quantizing a
    model, or writing a kept base, leave ~1 GB behind that would otherwise add to a training's resident peak.
    `mmap_threshold` (bytes) also fixes glibc's M_MMAP_THRESHOLD: blocks that large are mapped and unmapped
    directly from then on, instead of kept for reuse."""
    import ctypes
    import gc

    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        if mmap_threshold is not None:
            libc.mallopt(-3, mmap_threshold)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def reset_peak_memory(device: Any) -> None:
    """Start measuring the training peak here: loading a model (a GGUF is de-quantized) can peak higher than training."""
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set size
    except OSError:
        pass  # elsewhere the peak counts from the process start


def peak_memory_gb(device: Any) -> float:
    """This process's peak since reset_peak_memory: allocated GPU memory on CUDA, else the resident set size."""
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024 / 1e9
    except (OSError, IndexError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
