"""CUDA ms_deform_attn against the CPU op (whose arithmetic the CPU tests check against a float64
grid_sample reference): values, all three gradients, reduced precision, edge cases, streams,
determinism, no device synchronisation and CUDA graph capture.

Skipped unless a GPU is visible and align_detr._C was built with the CUDA kernels
(``make gpu-check`` builds and runs them).
"""

import math

import pytest
import torch
from test_ms_deform_attn import CASES, level_table, make_inputs, reference_msda

from align_detr import _ext
from align_detr.layers import ms_deform_attn

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _ext.has_cuda_kernels()),
    reason="needs a CUDA GPU and align_detr._C built with the CUDA kernels (make gpu-check)",
)

DINO_LEVELS = [(100, 167), (50, 84), (25, 42), (13, 21)]
OPS = torch.ops.align_detr if _ext._LOAD_ERROR is None else None


def realistic_inputs(levels, lq, encoder, n=1, m=8, d=32, p=4, dtype=torch.float64, seed=0):
    """DINO-like inputs: encoder queries on their own pixel centres (raster order), decoder
    queries on random points, offsets of a few pixels (about 9% of samples off the map)."""
    g = torch.Generator().manual_seed(seed)
    ss, starts, s = level_table(levels)
    nl = len(levels)
    value = torch.randn(n, s, m, d, generator=g, dtype=torch.float64)
    if encoder:
        centres = []
        for h, w in levels:
            ys, xs = torch.meshgrid(
                (torch.arange(h, dtype=torch.float64) + 0.5) / h,
                (torch.arange(w, dtype=torch.float64) + 0.5) / w,
                indexing="ij",
            )
            centres.append(torch.stack([xs, ys], -1).reshape(-1, 2))
        ref = torch.cat(centres)[:lq].view(1, lq, 1, 1, 1, 2).expand(n, lq, 1, 1, 1, 2)
    else:
        ref = torch.rand(n, lq, 1, 1, 1, 2, generator=g, dtype=torch.float64)
    wh = ss.flip(-1).double().view(1, 1, 1, nl, 1, 2)
    offsets = torch.randn(n, lq, m, nl, p, 2, generator=g, dtype=torch.float64) * 2.0
    loc = (ref + offsets / wh).contiguous()
    attn = torch.randn(n, lq, m, nl * p, generator=g, dtype=torch.float64).softmax(-1)
    attn = attn.view(n, lq, m, nl, p)
    return value.to(dtype), ss, starts, loc.to(dtype), attn.to(dtype)


def kink_mask(loc, ss, tol=1e-9):
    """(N, Lq, M, L, P) True where a coordinate sits on a pixel centre (a kink of bilinear
    interpolation) or on the strict -1 bound: there nvcc's fused multiply-add may put the
    sample one ulp to the other side, so the location gradient is compared elsewhere only."""
    wh = ss.flip(-1).to(loc.dtype).view(1, 1, 1, -1, 1, 2)
    pix = loc.cpu() * wh - 0.5
    return ((pix - pix.round()).abs() < tol).any(-1)


def run_op(value, ss, starts, loc, attn, grad, device):
    """Forward and the three gradients of the raw ops on `device` (level table on the CPU)."""
    args = [t.to(device) for t in (value, loc, attn)]
    out = OPS.ms_deform_attn_forward(args[0], ss, starts, args[1], args[2])
    grads = OPS.ms_deform_attn_backward(args[0], ss, starts, args[1], args[2], grad.to(device))
    return [out.cpu()] + [t.cpu() for t in grads]


def compare_cuda_cpu(value, ss, starts, loc, attn, rtol, atol, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, lq, m = loc.shape[:3]
    grad = torch.randn(n, lq, m * value.shape[-1], generator=g, dtype=torch.float64)
    grad = grad.to(value.dtype)
    cpu = run_op(value, ss, starts, loc, attn, grad, "cpu")
    cuda = run_op(value, ss, starts, loc, attn, grad, "cuda")
    kinks = kink_mask(loc, ss)
    for name, a, b in zip(("out", "grad_value", "grad_loc", "grad_attn"), cuda, cpu):
        if name == "grad_loc":
            a, b = a[~kinks], b[~kinks]
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=name)
    return cuda


@pytest.mark.parametrize("shapes,n,m,d,lq,p", CASES)
def test_float64_matches_cpu_on_the_reference_cases(shapes, n, m, d, lq, p):
    value, ss, starts, loc, attn = make_inputs(shapes, n, m, d, lq, p)
    out = compare_cuda_cpu(value, ss, starts, loc, attn, rtol=1e-10, atol=1e-10)[0]
    torch.testing.assert_close(out, reference_msda(value, ss, loc, attn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("encoder", [True, False], ids=["encoder", "decoder"])
def test_float64_matches_cpu_at_dino_shapes(encoder):
    s = sum(h * w for h, w in DINO_LEVELS)
    lq = s if encoder else 1000
    inputs = realistic_inputs(DINO_LEVELS, lq, encoder, n=2 if not encoder else 1)
    compare_cuda_cpu(*inputs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [16, 32, 33, 64])
def test_float32_matches_float64(d):
    value, ss, starts, loc, attn = realistic_inputs(
        [(17, 11), (9, 6), (5, 3)], 40, False, n=2, m=4, d=d, dtype=torch.float64
    )
    grad = torch.randn(2, 40, 4 * d, dtype=torch.float64)
    ref = run_op(value, ss, starts, loc, attn, grad, "cpu")
    f32 = run_op(value.float(), ss, starts, loc.float(), attn.float(), grad.float(), "cuda")
    kinks = kink_mask(loc, ss, tol=1e-4)
    for i, (a, b) in enumerate(zip(f32, ref)):
        if i == 2:
            a, b = a[~kinks], b[~kinks]
        tol = 1e-5 if i == 0 else 1e-4
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 32, 12])
def test_reduced_precision(dtype, d):
    value, ss, starts, loc, attn = make_inputs([(8, 8), (4, 4)], 1, 2, d, 10, 4)
    low = [t.to(dtype) for t in (value, loc, attn)]
    grad = torch.randn(1, 10, 2 * d, dtype=torch.float64).to(dtype)
    cuda = run_op(low[0], ss, starts, low[1], low[2], grad, "cuda")
    assert [t.dtype for t in cuda] == [dtype] * 4
    ref = reference_msda(low[0].double(), ss, low[1].double(), low[2].double())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(cuda[0].double(), ref, rtol=tol, atol=tol)
    # gradients: against the float64 CPU op on the same rounded inputs
    ref_grads = run_op(
        low[0].double(), ss, starts, low[1].double(), low[2].double(), grad.double(), "cpu"
    )[1:]
    kinks = kink_mask(low[1].double(), ss, tol=1e-3)
    for i, (a, b) in enumerate(zip(cuda[1:], ref_grads)):
        if i == 1:
            a, b = a[~kinks], b[~kinks]
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.double(), b, rtol=4 * tol, atol=4 * tol * scale)


def test_gradcheck_and_opcheck():
    value, ss, starts, loc, attn = make_inputs([(5, 4), (3, 2)], 1, 2, 3, 3, 2, lo=0.05, hi=0.95)
    inputs = (
        value.cuda().requires_grad_(),
        ss,
        starts,
        loc.cuda().requires_grad_(),
        attn.cuda().requires_grad_(),
    )
    # Atomics reorder the grad_value sums: allow for it in gradcheck's reentrancy check.
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-6, nondet_tol=1e-12)
    torch.library.opcheck(OPS.ms_deform_attn_forward, inputs)
    # The level table may also sit on the GPU (at the cost of a copy to the host).
    device_table = (inputs[0], ss.cuda(), starts.cuda(), inputs[3], inputs[4])
    torch.library.opcheck(OPS.ms_deform_attn_forward, device_table)


def test_borders_outside_and_nan():
    ss, starts, s = level_table([(4, 5), (3, 3)])
    value = torch.randn(1, s, 1, 3, dtype=torch.float64)
    xs = [0.0, 1.0, 0.5 / 5, 4.5 / 5, -0.45 / 5, 1 + 0.45 / 5, -3.0, 7.0, 0.5, 0.999999]
    pts = torch.tensor([(x, y) for x in xs for y in xs], dtype=torch.float64)
    loc = pts.view(1, -1, 1, 1, 1, 2).expand(1, -1, 1, 2, 1, 2).contiguous()
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    attn = torch.full(loc.shape[:-1], 0.5, dtype=torch.float64)
    cuda = compare_cuda_cpu(value, ss, starts, loc, attn, rtol=1e-10, atol=1e-10)
    assert all(torch.isfinite(t).all() for t in cuda)


@pytest.mark.parametrize("n,lq,p", [(0, 5, 2), (2, 0, 2), (2, 5, 0)])
def test_empty_inputs(n, lq, p):
    value, ss, starts, loc, attn = make_inputs([(3, 3)], n, 2, 4, lq, p)
    cuda = run_op(value, ss, starts, loc, attn, torch.randn(n, lq, 8, dtype=torch.float64), "cuda")
    assert cuda[0].shape == (n, lq, 8)
    assert torch.all(cuda[0] == 0) and all(torch.all(g == 0) for g in cuda[1:])
    assert [g.shape for g in cuda[1:]] == [value.shape, loc.shape, attn.shape]


@pytest.mark.parametrize("m,d", [(2, 16), (3, 33), (1, 256), (1, 1), (4, 2)])
def test_head_widths(m, d):
    value, ss, starts, loc, attn = make_inputs([(9, 7), (4, 5)], 2, m, d, 11, 3)
    compare_cuda_cpu(value, ss, starts, loc, attn, rtol=1e-10, atol=1e-10)
    # and in float32, where the vector paths differ
    args = [value.float(), ss, starts, loc.float(), attn.float()]
    out = OPS.ms_deform_attn_forward(*[a.cuda() if a.is_floating_point() else a for a in args])
    ref = reference_msda(value, ss, loc.float().double(), attn.float().double())
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-5, atol=1e-5)


def test_non_contiguous_and_misaligned_inputs():
    value, ss, starts, loc, attn = make_inputs([(5, 6)], 2, 2, 8, 6, 2)
    v, lc, a = (t.cuda() for t in (value, loc, attn))
    expect = ms_deform_attn(v, ss, starts, lc, a)
    loc_t = lc.transpose(0, 1).contiguous().transpose(0, 1)
    assert not loc_t.is_contiguous()
    torch.testing.assert_close(ms_deform_attn(v, ss, starts, loc_t, a), expect)
    # value starting one element into its storage: not 16-byte aligned, scalar loads are used
    buf = torch.empty(v.numel() + 1, dtype=v.dtype, device="cuda")
    shifted = buf[1:].view_as(v).copy_(v)
    torch.testing.assert_close(ms_deform_attn(shifted, ss, starts, lc, a), expect)


def test_level_table_on_device_or_host_gives_the_same():
    value, ss, starts, loc, attn = make_inputs([(5, 6), (2, 3)], 2, 2, 8, 6, 2)
    v, lc, a = (t.cuda() for t in (value, loc, attn))
    torch.testing.assert_close(
        ms_deform_attn(v, ss, starts, lc, a), ms_deform_attn(v, ss.cuda(), starts.cuda(), lc, a)
    )
    with pytest.raises(RuntimeError, match="spatial_shapes .* must be on the CPU"):
        OPS.ms_deform_attn_forward(value, ss.cuda(), starts.cuda(), loc, attn)
    with pytest.raises(RuntimeError, match="sampling_locations is on cuda"):
        OPS.ms_deform_attn_forward(value, ss, starts, loc.cuda(), attn)


def test_side_stream():
    value, ss, starts, loc, attn = make_inputs([(9, 7), (4, 4)], 2, 3, 32, 20, 4)
    v, lc, a = (t.cuda() for t in (value, loc, attn))
    expect = ms_deform_attn(v, ss, starts, lc, a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = ms_deform_attn(v, ss, starts, lc, a)
    torch.cuda.current_stream().wait_stream(stream)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device_while_first_is_current():
    value, ss, starts, loc, attn = make_inputs([(9, 7)], 2, 3, 8, 20, 4)
    expect = ms_deform_attn(value, ss, starts, loc, attn)
    with torch.cuda.device(0):
        out = ms_deform_attn(
            *(
                t.to("cuda:1") if t.is_floating_point() else t
                for t in (value, ss, starts, loc, attn)
            )
        )
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), expect)


def test_deterministic_mode():
    value, ss, starts, loc, attn = realistic_inputs(
        [(20, 17), (10, 9), (5, 5)], 300, False, n=2, m=4, dtype=torch.float32
    )
    v, lc, a = (t.cuda() for t in (value, loc, attn))
    grad = torch.randn(2, 300, 4 * 32, device="cuda")
    atomic = OPS.ms_deform_attn_backward(v, ss, starts, lc, a, grad)
    torch.use_deterministic_algorithms(True)
    try:
        first = OPS.ms_deform_attn_backward(v, ss, starts, lc, a, grad)
        for _ in range(2):
            again = OPS.ms_deform_attn_backward(v, ss, starts, lc, a, grad)
            for x, y in zip(first, again):
                assert torch.equal(x, y)
        # the whole autograd path works under the flag (no alertNotDeterministic)
        leaves = [t.clone().requires_grad_() for t in (v, lc, a)]
        ms_deform_attn(leaves[0], ss, starts, leaves[1], leaves[2]).backward(grad)
    finally:
        torch.use_deterministic_algorithms(False)
    for x, y in zip(first, atomic):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    # the forward has no atomics: bitwise reproducible in either mode
    out1 = ms_deform_attn(v, ss, starts, lc, a)
    assert torch.equal(out1, ms_deform_attn(v, ss, starts, lc, a))
    # grad_value equals the CPU kernel's, which sums in the same order
    cpu = OPS.ms_deform_attn_backward(value, ss, starts, loc, attn, grad.cpu())
    torch.testing.assert_close(first[0].cpu(), cpu[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_deterministic_mode_reduced_precision_and_fp64(dtype):
    value, ss, starts, loc, attn = make_inputs([(9, 7), (4, 4)], 2, 2, 8, 20, 3)
    grad = torch.randn(2, 20, 16, dtype=torch.float64)
    args = [t.to(dtype).cuda() for t in (value, loc, attn)]
    atomic = OPS.ms_deform_attn_backward(args[0], ss, starts, args[1], args[2], grad.to(args[0]))
    torch.use_deterministic_algorithms(True)
    try:
        det = OPS.ms_deform_attn_backward(args[0], ss, starts, args[1], args[2], grad.to(args[0]))
    finally:
        torch.use_deterministic_algorithms(False)
    tol = 1e-12 if dtype == torch.float64 else 2e-3
    for x, y in zip(det, atomic):
        torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def test_no_sync_and_cuda_graph_capture():
    value, ss, starts, loc, attn = realistic_inputs(
        [(20, 17), (10, 9)], 100, False, n=2, m=4, dtype=torch.float32
    )
    v, lc, a = (t.cuda().requires_grad_() for t in (value, loc, attn))
    grad = torch.randn(2, 100, 128, device="cuda")

    def step():
        out = ms_deform_attn(v, ss, starts, lc, a)
        return (out,) + torch.autograd.grad(out, (v, lc, a), grad)

    eager = step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()  # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # capture forward + backward in a graph and replay it
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        lc.add_(0.0)  # the same inputs: the replay must give the eager result
    graph.replay()
    torch.cuda.synchronize()
    for x, y in zip(captured, eager):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def test_module_with_host_level_table():
    from align_detr.layers import MSDeformAttn

    attn = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=2)
    ss, starts, s = level_table([(6, 5), (3, 3)])
    query, memory, ref = torch.randn(2, 7, 32), torch.randn(2, s, 32), torch.rand(2, 7, 2, 2)
    expect = attn(query, ref, memory, ss, starts)
    attn.cuda()
    out = attn(query.cuda(), ref.cuda(), memory.cuda(), ss, starts)  # table stays on the host
    torch.testing.assert_close(out.cpu(), expect, rtol=1e-5, atol=1e-5)
    out_dev = attn(query.cuda(), ref.cuda(), memory.cuda(), ss.cuda(), starts.cuda())
    torch.testing.assert_close(out_dev, out)


@pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 24 * 2**30,
    reason="needs a GPU with 24 GB",
)
def test_more_than_2_31_value_elements():
    """fp16 value of 3 * 2^30 elements (6 GiB); samples in the last image, near its end."""
    h = w = 1024
    m, d, n = 8, 128, 3
    ss, starts, s = level_table([(h, w)])
    value = torch.empty(n, s, m, d, dtype=torch.float16, device="cuda")
    value.normal_()
    assert value.numel() > 2**31
    g = torch.Generator().manual_seed(0)
    loc = (0.9 + 0.1 * torch.rand(n, 4, m, 1, 2, 2, generator=g)).half()
    attn = torch.rand(n, 4, m, 1, 2, generator=g).half()
    out = ms_deform_attn(value, ss, starts, loc.cuda(), attn.cuda())
    last = value[n - 1 :].cpu().float()
    ref = reference_msda(last, ss, loc[n - 1 :].double(), attn[n - 1 :].double())
    torch.testing.assert_close(out[n - 1 :].cpu().double(), ref, rtol=2e-3, atol=2e-3)
    assert math.isfinite(float(out.float().abs().sum()))
