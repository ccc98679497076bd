"""Helpers shared by the benchmarks: timing and the machine's own roofs, measured in the same
run as the thing being timed (this machine is shared, so absolute numbers are noise)."""

import platform
import statistics
import time

import torch


def median_time(fn, repeat=5, warmup=1, min_time=0.0):
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sgemm_gflops(n=2048):
    """fp32 matrix-multiply throughput of this machine with torch's current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = median_time(lambda: torch.mm(a, b), repeat=5)
    return 2 * n**3 / t / 1e9


def copy_gbps(mbytes=256):
    """Streaming copy bandwidth (bytes read + written) in GB/s."""
    src = torch.empty(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    src.fill_(1.0)
    t = median_time(lambda: dst.copy_(src), repeat=5)
    return 2 * src.numel() * 4 / t / 1e9


def machine_summary():
    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "sgemm_gflops": sgemm_gflops(),
        "copy_gbps": copy_gbps(),
    }
