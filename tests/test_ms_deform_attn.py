"""Tests of the compiled multi-scale deformable attention op against an independent float64
reference built on F.grid_sample, plus gradcheck, bad inputs, determinism and torch.compile."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import align_detr  # noqa: F401  (loads the extension)
from align_detr.layers import MSDeformAttn, ms_deform_attn


def reference_msda(value, spatial_shapes, sampling_locations, attention_weights):
    """out[n, q, m*D + d] = sum_{l,p} a[n,q,m,l,p] * bilinear(value_l[n,:,m,d], loc[n,q,m,l,p]),
    computed in float64 one level at a time with grid_sample(align_corners=False, zeros)."""
    value = value.double()
    loc = sampling_locations.double()
    attn = attention_weights.double()
    n, _, m, d = value.shape
    lq = loc.shape[1]
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        v = value[:, start : start + h * w]  # (N, HW, M, D)
        start += h * w
        v = v.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        grid = loc[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, lq, -1, 2) * 2 - 1
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.view(n, m, d, lq, -1)  # (N, M, D, Lq, P)
        a = attn[:, :, :, lvl].permute(0, 2, 1, 3)  # (N, M, Lq, P)
        out += torch.einsum("nmdqp,nmqp->nqmd", sampled, a)
    return out.reshape(n, lq, m * d)


def level_table(shapes):
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64)
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    starts = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, starts, int(areas.sum())


def make_inputs(shapes, n=2, m=2, d=5, lq=7, p=3, dtype=torch.float64, lo=-0.2, hi=1.2):
    spatial_shapes, starts, s = level_table(shapes)
    levels = len(shapes)
    value = torch.randn(n, s, m, d, dtype=dtype)
    loc = torch.rand(n, lq, m, levels, p, 2, dtype=dtype) * (hi - lo) + lo
    attn = torch.rand(n, lq, m, levels, p, dtype=dtype).softmax(-1)
    return value, spatial_shapes, starts, loc, attn


CASES = [
    # (level shapes, N, M, D, Lq, P)
    ([(6, 4), (3, 2)], 1, 2, 4, 5, 2),
    ([(5, 7)], 2, 1, 3, 4, 1),  # one level, one point, odd D
    ([(9, 5), (4, 3), (2, 2), (1, 1)], 3, 4, 7, 6, 4),  # non-square, a 1x1 level
    ([(2, 13), (1, 6)], 2, 3, 33, 3, 2),  # D > 32: more than one channel per CUDA lane
]


@pytest.mark.parametrize("shapes,n,m,d,lq,p", CASES)
def test_forward_and_gradients_match_reference(shapes, n, m, d, lq, p):
    value, ss, starts, loc, attn = make_inputs(shapes, n, m, d, lq, p)
    inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref_inputs = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(inputs[0], ss, starts, inputs[1], inputs[2])
    ref = reference_msda(ref_inputs[0], ss, ref_inputs[1], ref_inputs[2])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    ours = torch.autograd.grad(out, inputs, grad)
    theirs = torch.autograd.grad(ref, ref_inputs, grad)
    for name, a, b in zip(("value", "locations", "attention"), ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_float32_matches_float64_reference():
    value, ss, starts, loc, attn = make_inputs([(17, 11), (9, 6), (5, 3)], 2, 4, 16, 40, 4)
    args = [t.float().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(args[0], ss, starts, args[1], args[2])
    ref = reference_msda(value, ss, loc, attn)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref_args = [t.clone().requires_grad_() for t in (value, loc, attn)]
    reference_msda(ref_args[0], ss, ref_args[1], ref_args[2]).sum().backward()
    for a, b in zip(args, ref_args):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_accumulates_in_fp32(dtype):
    value, ss, starts, loc, attn = make_inputs([(8, 8), (4, 4)], 1, 2, 8, 10, 4)
    low = [t.to(dtype) for t in (value, loc, attn)]
    out = ms_deform_attn(low[0], ss, starts, low[1], low[2])
    assert out.dtype == dtype
    ref = reference_msda(*[low[0].double()], ss, low[1].double(), low[2].double())
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    grads = torch.ops.align_detr.ms_deform_attn_backward(
        low[0], ss, starts, low[1], low[2], torch.ones_like(out)
    )
    assert [g.dtype for g in grads] == [dtype] * 3


def test_mixed_dtypes_are_promoted():
    value, ss, starts, loc, attn = make_inputs([(6, 5)], 1, 2, 4, 3, 2, dtype=torch.float32)
    out = ms_deform_attn(value.half(), ss, starts, loc, attn)
    assert out.dtype == torch.float32


@pytest.mark.parametrize("which", [0, 1, 2])
def test_integer_inputs_raise(which):
    """An integer value / location / weight tensor is an error, not silently promoted."""
    args = list(make_inputs([(6, 5)], 1, 2, 4, 3, 2, dtype=torch.float32))
    names = {0: "value", 1: "sampling_locations", 2: "attention_weights"}
    pos = {0: 0, 1: 3, 2: 4}[which]
    args[pos] = (args[pos] * 10).long()
    with pytest.raises(TypeError, match=f"{names[which]} must be a floating-point tensor"):
        ms_deform_attn(*args)


@pytest.mark.parametrize(
    "mask", [(True, False, False), (False, True, False), (False, False, True), (False, True, True)]
)
def test_backward_computes_only_the_requested_gradients(mask):
    value, ss, starts, loc, attn = make_inputs([(6, 5), (3, 2)], 2, 2, 8, 9, 3)
    grad = torch.randn(2, 9, 16, dtype=torch.float64)
    op = torch.ops.align_detr.ms_deform_attn_backward
    full = op(value, ss, starts, loc, attn, grad)
    part = op(value, ss, starts, loc, attn, grad, list(mask))
    for want, a, b in zip(mask, full, part):
        if want:
            assert torch.equal(a, b)
        else:
            assert b.numel() == 0
    # Through autograd: only the inputs that require grad get one.
    v, lc, a = value.clone(), loc.clone(), attn.clone()
    for t, want in zip((v, lc, a), mask):
        t.requires_grad_(want)
    ms_deform_attn(v, ss, starts, lc, a).backward(grad)
    for t, want, ref in zip((v, lc, a), mask, full):
        if want:
            torch.testing.assert_close(t.grad, ref, rtol=0, atol=0)
        else:
            assert t.grad is None


def test_half_location_gradient_rounds_the_float32_value():
    """fp16 location gradients are computed in fp32 and rounded once: they are inf exactly
    where the true gradient is beyond fp16's range (so GradScaler sees the overflow), and
    never NaN."""
    value, ss, starts, loc, attn = make_inputs([(4, 600), (2, 3)], 1, 2, 32, 6, 2, lo=0.1, hi=0.9)
    value = value * 40
    grad = torch.full((1, 6, 64), 30.0, dtype=torch.float64)
    args = [t.half() for t in (value, loc, attn)]
    _, gl_half, _ = torch.ops.align_detr.ms_deform_attn_backward(
        args[0], ss, starts, args[1], args[2], grad.half()
    )
    _, gl_float, _ = torch.ops.align_detr.ms_deform_attn_backward(
        *(t.float() for t in args[:1]), ss, starts, args[1].float(), args[2].float(), grad.float()
    )
    assert not torch.isnan(gl_half).any()
    assert torch.isinf(gl_half).any() and torch.isfinite(gl_half).any()
    torch.testing.assert_close(gl_half, gl_float.half(), rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(torch.isinf(gl_half), gl_float.abs() > 65519.0)


def test_level_table_must_be_on_host_or_value_device():
    value, ss, starts, loc, attn = make_inputs([(4, 3)], 1, 2, 4, 3, 2)
    with pytest.raises(RuntimeError, match="spatial_shapes .*on the CPU"):
        torch.ops.align_detr.ms_deform_attn_forward(value, ss.to("meta"), starts, loc, attn)


def test_deterministic_mode_backward():
    value, ss, starts, loc, attn = make_inputs([(9, 7), (4, 4)], 2, 2, 8, 20, 3)
    grad = torch.randn(2, 20, 16, dtype=torch.float64)
    op = torch.ops.align_detr.ms_deform_attn_backward
    plain = op(value, ss, starts, loc, attn, grad)
    torch.use_deterministic_algorithms(True)
    try:
        det = op(value, ss, starts, loc, attn, grad)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(plain, det):
        assert torch.equal(a, b)


def test_locations_on_borders_and_outside():
    """Pixel centres of the first/last row and column, the map edges (0 and 1), points just
    inside the strict -1 / W bounds and points far outside."""
    ss, starts, s = level_table([(4, 5), (3, 3)])
    value = torch.randn(1, s, 1, 3, dtype=torch.float64)
    xs = [0.0, 1.0, 0.5 / 5, 4.5 / 5, -0.45 / 5, 1 + 0.45 / 5, -3.0, 7.0, 0.5, 0.999999]
    pts = torch.tensor([(x, y) for x in xs for y in xs], dtype=torch.float64)
    loc = pts.view(1, -1, 1, 1, 1, 2).expand(1, -1, 1, 2, 1, 2).contiguous()
    attn = torch.full(loc.shape[:-1], 0.5, dtype=torch.float64)
    out = ms_deform_attn(value, ss, starts, loc, attn)
    torch.testing.assert_close(out, reference_msda(value, ss, loc, attn), rtol=1e-12, atol=1e-12)
    far = (pts.abs() > 2).any(-1)
    assert torch.all(out[0, far] == 0)
    # Gradients agree away from the measure-zero set x == -1 or y == -1, where the strict test
    # (the sample contributes nothing) gives 0 and grid_sample a one-sided derivative.
    v, lc, a = (t.clone().requires_grad_() for t in (value, loc, attn))
    ms_deform_attn(v, ss, starts, lc, a).sum().backward()
    v2, lc2, a2 = (t.clone().requires_grad_() for t in (value, loc, attn))
    reference_msda(v2, ss, lc2, a2).sum().backward()
    for g1, g2 in ((v.grad, v2.grad), (a.grad, a2.grad)):
        torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)
    # Pixel centres are kinks of bilinear interpolation (left and right derivatives differ, and
    # which side is taken depends on rounding), so location gradients are compared elsewhere.
    kink = torch.zeros(len(pts), dtype=torch.bool)
    for size in (5, 4, 3):
        pix = pts * size - 0.5
        kink |= ((pix - pix.round()).abs() < 1e-9).any(-1)
    torch.testing.assert_close(lc.grad[0, ~kink], lc2.grad[0, ~kink], rtol=1e-10, atol=1e-10)
    assert (~kink).sum() > 30


def test_nan_location_contributes_nothing():
    value, ss, starts, loc, attn = make_inputs([(4, 4)], 1, 1, 2, 2, 1)
    loc[0, 0, 0, 0, 0, 0] = float("nan")
    out = ms_deform_attn(value, ss, starts, loc, attn)
    assert torch.all(out[0, 0] == 0) and torch.isfinite(out).all()


def test_gradcheck():
    value, ss, starts, loc, attn = make_inputs([(5, 4), (3, 2)], 1, 2, 3, 3, 2, lo=0.05, hi=0.95)
    inputs = (
        value.requires_grad_(),
        ss,
        starts,
        loc.requires_grad_(),
        attn.requires_grad_(),
    )
    assert torch.autograd.gradcheck(ms_deform_attn, inputs, eps=1e-6, atol=1e-6)


def test_backward_is_bit_identical_across_runs():
    value, ss, starts, loc, attn = make_inputs([(20, 17), (10, 9), (5, 5)], 2, 4, 32, 300, 4)
    value, loc, attn = value.float(), loc.float(), attn.float()
    grad = torch.randn(2, 300, 4 * 32)
    first = torch.ops.align_detr.ms_deform_attn_backward(value, ss, starts, loc, attn, grad)
    for _ in range(2):
        again = torch.ops.align_detr.ms_deform_attn_backward(value, ss, starts, loc, attn, grad)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_empty_inputs():
    value, ss, starts, loc, attn = make_inputs([(3, 3)], 2, 2, 4, 0, 2)
    assert ms_deform_attn(value, ss, starts, loc, attn).shape == (2, 0, 8)
    value, ss, starts, loc, attn = make_inputs([(3, 3)], 0, 2, 4, 5, 2)
    assert ms_deform_attn(value, ss, starts, loc, attn).shape == (0, 5, 8)


def _bad(value, ss, starts, loc, attn, match):
    with pytest.raises(RuntimeError, match=match):
        torch.ops.align_detr.ms_deform_attn_forward(value, ss, starts, loc, attn)


def test_bad_inputs_raise_clear_errors():
    value, ss, starts, loc, attn = make_inputs([(4, 3), (2, 2)], 2, 2, 4, 3, 2)
    _bad(value[0], ss, starts, loc, attn, "value must be")
    _bad(value, ss, starts, loc[..., 0], attn, "sampling_locations must be")
    _bad(value, ss, starts, loc, attn[0], "attention_weights must be")
    _bad(value[:, :-1], ss, starts, loc, attn, r"sum\(H \* W\)")
    _bad(value, ss, starts + 1, loc, attn, "level_start_index")
    _bad(value, ss, starts[:1], loc, attn, "level_start_index")
    _bad(value, ss.int(), starts, loc, attn, "int64")
    _bad(value, ss.float(), starts, loc, attn, "int64")
    _bad(value, ss, starts, loc.float(), attn, "share a dtype")
    _bad(value.long(), ss, starts, loc, attn, "floating")
    _bad(value, ss, starts, loc[:1], attn[:1], "sampling_locations must be")  # batch mismatch
    _bad(value, ss, starts, loc, attn[:, :, :, :, :1], "attention_weights must be")
    _bad(value, ss, starts, loc[:, :, :, :1], attn[:, :, :, :1], "sampling_locations must be")
    _bad(value, -ss, starts, loc, attn, "positive")
    with pytest.raises(RuntimeError, match="device"):
        torch.ops.align_detr.ms_deform_attn_forward(value, ss, starts, loc.to("meta"), attn)
    with pytest.raises(RuntimeError, match="grad_output"):
        torch.ops.align_detr.ms_deform_attn_backward(
            value, ss, starts, loc, attn, torch.zeros(2, 3, 7, dtype=torch.float64)
        )


def test_non_contiguous_inputs():
    value, ss, starts, loc, attn = make_inputs([(5, 6)], 2, 2, 4, 6, 2)
    loc_t = loc.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert not loc_t.is_contiguous()
    torch.testing.assert_close(
        ms_deform_attn(value, ss, starts, loc_t, attn), ms_deform_attn(value, ss, starts, loc, attn)
    )


@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_every_cpu_instruction_set_variant_matches(isa):
    """The kernels are compiled for several x86 instruction sets; check the narrower ones too."""
    code = (
        "import torch, align_detr\n"
        "from tests.test_ms_deform_attn import make_inputs, reference_msda\n"
        "from align_detr.layers import ms_deform_attn\n"
        "torch.manual_seed(0)\n"
        "v, ss, st, loc, a = make_inputs([(9, 7), (4, 4)], 2, 3, 32, 20, 4)\n"
        "v, loc, a = (t.float().requires_grad_() for t in (v, loc, a))\n"
        "out = ms_deform_attn(v, ss, st, loc, a)\n"
        "ref = reference_msda(v.detach(), ss, loc.detach(), a.detach())\n"
        "torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)\n"
        "out.sum().backward()\n"
        "v2, loc2, a2 = (t.detach().double().requires_grad_() for t in (v, loc, a))\n"
        "reference_msda(v2, ss, loc2, a2).sum().backward()\n"
        "for x, y in ((v, v2), (loc, loc2), (a, a2)):\n"
        "    torch.testing.assert_close(x.grad.double(), y.grad, rtol=1e-4, atol=1e-4)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, ALIGN_DETR_CPU_ISA=isa, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root, timeout=120)


def test_module_shapes_and_initialisation():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=4, n_points=3)
    # initial offsets: point i of every head sits at radius i + 1 on the unit square
    bias = attn.sampling_offsets.bias.view(4, 2, 3, 2)
    torch.testing.assert_close(bias.abs().amax(-1)[:, :, 0], torch.ones(4, 2))
    torch.testing.assert_close(bias.abs().amax(-1)[:, :, 2], torch.full((4, 2), 3.0))
    ss, starts, s = level_table([(6, 5), (3, 3)])
    query = torch.randn(2, 7, 16)
    memory = torch.randn(2, s, 16)
    for ref in (torch.rand(2, 7, 2, 2), torch.rand(2, 7, 2, 4)):
        out = attn(query, ref, memory, ss, starts, torch.zeros(2, s, dtype=torch.bool))
        assert out.shape == (2, 7, 16)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match="reference_points"):
        attn(query, torch.rand(2, 7, 2, 3), memory, ss, starts)


def test_module_padding_mask_zeroes_padded_values():
    attn = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=2)
    ss, starts, s = level_table([(4, 4)])
    query, memory = torch.randn(1, 3, 8), torch.randn(1, s, 8)
    mask = torch.ones(1, s, dtype=torch.bool)
    out = attn(query, torch.rand(1, 3, 1, 2), memory, ss, starts, mask)
    torch.testing.assert_close(out, attn.output_proj.bias.expand(1, 3, 8))


def test_torch_compile_fullgraph():
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2)
    ss, starts, s = level_table([(5, 4), (2, 3)])
    query, memory, ref = torch.randn(2, 6, 16), torch.randn(2, s, 16), torch.rand(2, 6, 2, 2)
    eager = attn(query, ref, memory, ss, starts)
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    out = compiled(query, ref, memory, ss, starts)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert attn.sampling_offsets.weight.grad is not None


def test_opcheck():
    value, ss, starts, loc, attn = make_inputs([(4, 3), (2, 2)], 1, 2, 3, 4, 2)
    torch.library.opcheck(
        torch.ops.align_detr.ms_deform_attn_forward,
        (value.requires_grad_(), ss, starts, loc.requires_grad_(), attn.requires_grad_()),
    )


def test_level_normalizer_is_made_once_per_table_and_device():
    """MSDeformAttn keeps a host level table's (W, H) on the query's device once, so a CPU
    table costs no copy per call."""
    from align_detr.layers.ms_deform_attn import _level_normalizer

    ss, _, _ = level_table([(6, 5), (3, 2)])
    like = torch.empty(0, device="meta", dtype=torch.float16)
    first = _level_normalizer(ss, like)
    assert first.device.type == "meta" and first.dtype == torch.float16 and first.shape == (2, 2)
    assert _level_normalizer(ss, like) is first
    same_device = _level_normalizer(ss, torch.empty(0, dtype=torch.float64))
    assert same_device.tolist() == [[5.0, 6.0], [2.0, 3.0]]


def test_op_modules_import_neither_engine_nor_modeling():
    """The op wrappers stand alone: no detectron2 (engine or otherwise), no align_detr.modeling."""
    import ast

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = ["align_detr/_ext.py", "align_detr/layers/ms_deform_attn.py"]
    files += ["align_detr/layers/ms_deform_attn_reference.py"]
    matching = os.path.join(root, "align_detr", "matching")
    files += [os.path.join("align_detr", "matching", f) for f in sorted(os.listdir(matching))]
    for rel in files:
        if not rel.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(root, rel)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert not name.startswith("detectron2"), f"{rel} imports {name}"
                assert not name.startswith("align_detr.modeling"), f"{rel} imports {name}"
