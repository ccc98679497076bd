"""Helpers shared by the benchmarks: timing and the machine's own roofs, measured in the same
run as the thing being timed (this machine is shared, so absolute numbers are noise)."""

import platform
import statistics
import time

import torch


def _sync_if_cuda():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def median_time(fn, repeat=5, warmup=1, min_time=0.0):
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.

    When CUDA is in use, the device is synchronised around every run, so the time covers the
    queued GPU work (end-to-end time; for device time use :func:`cuda_time`).
    """
    for _ in range(warmup):
        fn()
    _sync_if_cuda()
    times = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        _sync_if_cuda()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cuda_time(fn, repeat=20, warmup=3):
    """Median GPU time of ``fn()`` in seconds, measured with CUDA events.

    The runs are queued back to back with no synchronisation inside the timed loop (which would
    add launch latency to every run); each run is bracketed by its own pair of events.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        for _ in range(repeat)
    ]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events) / 1e3


def cuda_graph_time(fn, repeat=20):
    """Median GPU time of one replay of ``fn`` captured in a CUDA graph (no launch overhead),
    or None when ``fn`` cannot be captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return None
    return cuda_time(graph.replay, repeat=repeat, warmup=2)


def gpu_copy_gbps(mbytes=1024):
    """Device-to-device copy bandwidth (bytes read + written) in GB/s, the memory roof."""
    src = torch.ones(mbytes * 2**20 // 4, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), repeat=10)
    return 2 * src.numel() * 4 / t / 1e9


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
