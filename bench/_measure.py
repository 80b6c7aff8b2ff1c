"""Timing, peak-memory and device helpers for bench/run.py and bench/test_bench.py.

GPU: CUDA events around each step with the L2 cache flushed before it, peak from torch.cuda.max_memory_allocated.
CPU: wall clock (CPU ops are synchronous), peak resident set above the baseline, measured in a forked child
per case (`isolated`) so that one case's allocator state and peak never leak into the next.
"""
from __future__ import annotations

import ctypes
import datetime
import importlib
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

GiB = 1 << 30
LONG_S = 2.0  # CPU steps longer than this are timed twice only (the full-size headline figures would take minutes)
_L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100: 50 MB)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters

def summarize(samples_ms: list[float]) -> dict:
    """Median with the interquartile range and the extremes of a list of times in milliseconds."""
    s = sorted(samples_ms)
    q = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else [s[0]] * 3
    return {"median": statistics.median(s), "q25": q[0], "q75": q[2], "min": s[0], "max": s[-1], "n": len(s)}


def fmt_time(ms: float) -> str:
    """A time in milliseconds, in the unit that reads best (µs, ms or s)."""
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms" if ms < 1e3 else f"{ms / 1e3:.2f} s"


def fmt_bytes(n: int | None) -> str:
    """A byte count in binary units ("n/a" when unmeasured)."""
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _runs(estimate_s: float, budget_s: float, min_runs: int, max_runs: int) -> int:
    return max(min_runs, min(max_runs, int(budget_s / max(estimate_s, 1e-6))))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_cpu(step, estimate_s: float, budget_s: float, min_runs: int, max_runs: int) -> list[float]:
    """Wall-clock milliseconds of repeated steps, about budget_s in all."""
    runs = min(2, min_runs) if estimate_s > LONG_S else _runs(estimate_s, budget_s, min_runs, max_runs)
    samples = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step()
        samples.append(1e3 * (time.perf_counter() - t0))
    return samples


def time_cuda(step, budget_s: float, min_runs: int, max_runs: int) -> list[float]:
    """Milliseconds per step from CUDA events, the L2 flushed (zeroing a 256 MB buffer) before every step.

    Events for all steps are recorded first and read after one synchronisation, so the host never waits
    between steps (as triton.testing.do_bench does)."""
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")

    def run(n: int) -> list[float]:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for start, end in events:
            flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]

    estimate = statistics.median(run(3)) / 1e3
    return run(_runs(estimate, budget_s, min_runs, max_runs))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _malloc(mmap_threshold: int, trim_threshold: int) -> None:
    """Set glibc malloc's thresholds in this process and give free heap memory back (no-op without glibc)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def timing_malloc() -> None:
    """The state glibc's dynamic thresholds reach in a long-running process: blocks up to 32 MiB are reused from
    the heap, without the page faults of a fresh mapping (a fixed low threshold slows allocating code 2-8x)."""
    _malloc(32 << 20, 64 << 20)


def peak_malloc() -> None:
    """The allocator settings peak_cpu measures under, for a child to set before it builds anything, so that its
    warm-up leaves no freed heap for the measured step to reuse unseen."""
    _malloc(64 << 10, 128 << 10)


def peak_cpu(step) -> tuple[int | None, str]:
    """(peak resident bytes of one step above the size before it, method).

    Blocks of 64 KiB and more get their own mapping, returned on free, so the resident set follows what is
    alive; the kernel's high-water mark is reset through /proc/self/clear_refs (without it: unknown)."""
    peak_malloc()
    base = _rss_bytes()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None, "n/a (no /proc/self/clear_refs)"
    step()
    return max(0, _hwm_bytes() - base), "peak RSS above baseline (child process, /proc/self/clear_refs)"


def peak_cuda(step) -> tuple[int, str]:
    """(bytes allocated at the peak of one step above what was allocated before it, method)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base, "torch.cuda.max_memory_allocated above baseline"


def measure(step, device: torch.device, budget_s: float, min_runs: int, max_runs: int) -> dict:
    """Warm up (compiles, lazy initialisation), time repeated steps, then measure the peak memory of one step."""
    t0 = time.perf_counter()
    step()
    sync(device)
    warmup_s = time.perf_counter() - t0
    if device.type == "cuda":
        samples = time_cuda(step, budget_s, min_runs, max_runs)
        peak, method = peak_cuda(step)
    else:
        timing_malloc()
        samples = time_cpu(step, warmup_s, budget_s, min_runs, max_runs)
        peak, method = peak_cpu(step)
    return {"times_ms": summarize(samples), "peak_bytes": peak, "memory_method": method, "warmup_ms": 1e3 * warmup_s}


def memory_budget(device: torch.device, cap: int = 16 * GiB) -> int:
    """Bytes one case may use: 80% of free GPU memory, or on the CPU the smaller of `cap` and 70% of MemAvailable."""
    if device.type == "cuda":
        return int(0.8 * torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    return min(cap, int(0.7 * available))


def _child(send, fn, args, memory_limit: int | None) -> None:
    """Body of an isolated case: quiet, first in line for the OOM killer, its address space capped so that a
    runaway case fails cleanly instead of pushing the machine into swapping or the OOM killer."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("1000")
    except OSError:
        pass
    if memory_limit is not None:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + memory_limit, vm + memory_limit))
    try:
        send.send(fn(*args))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent as the case's error
        send.send({"status": "error", "note": f"{type(e).__name__}: {e}"})


def preload(*modules: str) -> None:
    """Import modules in the parent, so that every forked child of `isolated` inherits them instead of importing
    them again (vaekernels takes seconds: Triton). A module that fails to import is left to the child to report."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - not installed, or built for another torch: the case says so
            pass


def isolated(fn, args: tuple, timeout_s: float, memory_limit: int | None = None) -> dict:
    """fn(*args) in a forked child (CPU only: never fork after CUDA is initialised); a dict either way.

    The parent must not have run parallel torch work before forking. A child that dies or exceeds timeout_s
    becomes an error dict instead of taking the run down."""
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, fn, args, memory_limit), daemon=True)
    proc.start()
    send.close()
    result, timed_out = None, False
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
        else:
            timed_out = True
    except EOFError:
        pass
    finally:
        recv.close()
        proc.join(5 if result is not None else 0.5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is not None:
        return result
    if timed_out:
        why = f"timed out after {timeout_s:.0f} s"
    elif proc.exitcode is not None and proc.exitcode < 0:
        why = f"child killed by signal {-proc.exitcode}" + (" (out of memory?)" if proc.exitcode == -9 else "")
    else:
        why = f"child exited with code {proc.exitcode} without a result"
    return {"status": "error", "note": why}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in bytes/s: read + write of a large float32 tensor, median of runs."""
    numel = (1 << 28) if device.type == "cuda" else (1 << 26)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)

    def step():
        dst.copy_(src)

    step()
    sync(device)
    if device.type == "cuda":
        ms = statistics.median(time_cuda(step, 0.5, 10, 50))
    else:
        timing_malloc()
        ms = statistics.median(time_cpu(step, 0.1, 1.0, 5, 20))
    return 2 * src.nbytes / (ms / 1e3)


def count_kernels(step) -> dict:
    """GPU kernels one step launches (torch.profiler): total, those not from ATen or copies, and their names."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    aten = [n for n in names if "at::" in n or "at_cuda_detail" in n or n.startswith(("Memcpy", "Memset"))]
    return {"kernels": len(names), "non_aten": len(names) - len(aten), "names": names}


def peak_tflops(device_name: str) -> dict | None:
    """{"fp32": ..., "tf32": ..., "bf16": ...} dense peak TFLOP/s for a known GPU name (bench/roofline.py's table),
    else None."""
    import roofline

    key = roofline.device_named(device_name)
    if key is None:
        return None
    dev = roofline.DEVICES[key]
    return {unit: dev[unit] / 1e12 for unit in ("fp32", "tf32", "bf16")} | {"matched": dev["match"]}


def _nvidia_driver() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def device_info(device: torch.device) -> dict:
    """What produced the numbers: device, driver, versions, date, command line, machine load."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "settings": {k: v for k, v in os.environ.items() if k.startswith(("VAEKERNELS_", "TRITON_"))},
    }
    if device.type == "cuda":
        info.update(kind="cuda", device=torch.cuda.get_device_name(device), driver=_nvidia_driver(),
                    capability="sm_%d%d" % torch.cuda.get_device_capability(device),
                    memory_gib=round(torch.cuda.get_device_properties(device).total_memory / GiB, 1))
    else:
        info.update(kind="cpu", device=f"CPU ({info['cpu']}, {os.cpu_count()} cores)", driver=None)
    return info
