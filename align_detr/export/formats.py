# Copyright (c) align-detr contributors.
"""Export of an :class:`~align_detr.export.ExportableDetector` to ``torch.export`` (pt2) and ONNX.

One ``torch.export`` trace with a dynamic batch size and image size is the source of both files:

- **pt2**: the ExportedProgram as is, saved by ``torch.export.save``. Our compiled deformable
  attention stays one opaque ``align_detr::ms_deform_attn_forward`` node per call (traced through
  its fake kernel); loading the file needs only ``import align_detr`` (which registers the op).
- **ONNX, ``msda="grid_sample"``**: traced with the PyTorch reference path of the op (one
  ``F.grid_sample`` per level), so the file holds only standard ONNX operators (``GridSample``,
  opset 18) and runs in any ONNX runtime.
- **ONNX, ``msda="plugin"``**: traced with the compiled op, which the ONNX translation turns into
  one ``MultiscaleDeformableAttnPlugin_TRT`` node per call with the inputs of TensorRT's plugin of
  that name (value, int32 spatial_shapes, int32 level_start_index, sampling_locations,
  attention_weights; output (N, Lq, M, D), reshaped back to (N, Lq, M * D)). For TensorRT users;
  ONNX Runtime cannot run it.

The matching op is training-only and never appears in an exported graph. Each file carries the
metadata a runner needs (input format, test resize, class names) as JSON: ONNX metadata_props /
the pt2 file's extra file, key :data:`METADATA_KEY`.
"""

import json
from typing import Any, Dict, Optional, Tuple

import torch

from align_detr import kernels

__all__ = [
    "METADATA_KEY",
    "MSDA_FLAVOURS",
    "export_onnx",
    "export_pt2",
    "load_pt2",
    "onnx_metadata",
    "trace",
]

METADATA_KEY = "align_detr"
MSDA_FLAVOURS = ("grid_sample", "plugin")
ONNX_OPSET = 18
#: The custom node of ``msda="plugin"`` files (TensorRT's plugin name and a domain of its own).
PLUGIN_OP, PLUGIN_DOMAIN = "MultiscaleDeformableAttnPlugin_TRT", "trt.plugins"


def trace(
    detector: torch.nn.Module,
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    kernel: str = "compiled",
) -> torch.export.ExportedProgram:
    """``torch.export`` of the detector with a dynamic batch size, height and width.

    Args:
        detector: an ExportableDetector.
        images: (N, 3, H, W) example batch, N >= 2 and H != W (an example dimension of 1, or
            two equal ones, would be taken as always so).
        image_sizes: (N, 2) int64 example sizes.
        kernel: "compiled" (our op, opaque in the graph) or "reference" (grid_sample).

    Raises:
        RuntimeError: if the trace fixed the batch size or the image size to the example's.
    """
    dims = {0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
    with kernels.kernel_mode(kernel), torch.no_grad():
        program = torch.export.export(
            detector, (images, image_sizes), dynamic_shapes=(dims, {0: torch.export.Dim.AUTO})
        )
    placeholder = next(
        n for n in program.graph.nodes if n.op == "placeholder" and n.name == "images"
    )
    shape = placeholder.meta["val"].shape
    fixed = [
        name
        for name, d in zip(("batch", "", "height", "width"), shape)
        if name and isinstance(d, int)
    ]
    if fixed:
        raise RuntimeError(
            f"export: the traced graph fixed the {', '.join(fixed)} to the example's "
            f"{tuple(images.shape)}; some model code turns a size into a Python int"
        )
    _check_other_sizes_run(program, images, image_sizes)
    return program


def _check_other_sizes_run(program, images, image_sizes) -> None:
    """Runs the traced graph on one image of another size: a guard that pins a size derived
    from the input (a level's width read as an int somewhere) fails here, not at the user's."""
    _, _, h, w = images.shape
    h2, w2 = max(h - 33, min(h, 65)), max(w - 17, min(w, 65))
    sizes = torch.minimum(image_sizes[:1], torch.tensor([[h2, w2]]))
    try:
        with torch.no_grad():
            program.module()(images[:1, :, :h2, :w2].contiguous(), sizes)
    except AssertionError as e:  # what a failed shape guard raises
        raise RuntimeError(
            f"export: the traced graph only runs at the example's size ({e}); some model code "
            "turns a size derived from the input into a Python int"
        ) from e


def export_pt2(program: torch.export.ExportedProgram, path: str, metadata: Dict[str, Any]) -> None:
    """Saves the ExportedProgram with the metadata as an extra file."""
    torch.export.save(program, path, extra_files={METADATA_KEY: json.dumps(metadata)})


def load_pt2(path: str) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """(callable module, metadata) of a pt2 file; ``import align_detr`` is all it needs."""
    import align_detr._ext  # noqa: F401  (registers torch.ops.align_detr.* and their fakes)

    extra = {METADATA_KEY: ""}
    program = torch.export.load(path, extra_files=extra)
    return program.module(), json.loads(extra[METADATA_KEY] or "{}")


def _register_plugin_schema() -> None:
    """Declares the plugin node to ONNX (once per process), so the exporter can emit it."""
    import onnx

    if onnx.defs.has(PLUGIN_OP, PLUGIN_DOMAIN):
        return
    param = onnx.defs.OpSchema.FormalParameter
    schema = onnx.defs.OpSchema(
        PLUGIN_OP,
        PLUGIN_DOMAIN,
        1,
        "Multi-scale deformable attention as TensorRT's plugin of this name (no attributes).",
        inputs=[
            param("value", "T"),
            param("spatial_shapes", "I"),
            param("level_start_index", "I"),
            param("sampling_locations", "T"),
            param("attention_weights", "T"),
        ],
        outputs=[param("output", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)"], "value and weights"),
            ("I", ["tensor(int32)"], "level table"),
        ],
    )
    onnx.defs.register_schema(schema)


def _plugin_translation():
    """ONNX translation of ``align_detr::ms_deform_attn_forward`` into TensorRT's plugin node."""
    import onnxscript
    from onnxscript import opset18 as op

    _register_plugin_schema()
    plugin = onnxscript.values.Opset(PLUGIN_DOMAIN, 1)

    def ms_deform_attn_plugin(value, spatial_shapes, level_start_index, locations, weights):
        int32 = onnxscript.ir.DataType.INT32
        out = getattr(plugin, PLUGIN_OP)(
            value,
            op.Cast(spatial_shapes, to=int32),
            op.Cast(level_start_index, to=int32),
            locations,
            weights,
        )
        # (N, Lq, M, D) -> (N, Lq, M * D), the op's own output layout
        new_shape = op.Concat(
            op.Shape(locations, start=0, end=2), op.Constant(value_ints=[-1]), axis=0
        )
        return op.Reshape(out, new_shape)

    return {torch.ops.align_detr.ms_deform_attn_forward.default: ms_deform_attn_plugin}


def export_onnx(
    detector: torch.nn.Module,
    images: torch.Tensor,
    image_sizes: torch.Tensor,
    path: str,
    metadata: Dict[str, Any],
    msda: str = "grid_sample",
    program: Optional[torch.export.ExportedProgram] = None,
) -> None:
    """Writes the detector as an ONNX file (opset 18, dynamic batch and image size).

    Args:
        detector, images, image_sizes: as for :func:`trace`.
        path: the .onnx file to write.
        metadata: stored as JSON in the file's metadata_props under :data:`METADATA_KEY`.
        msda: "grid_sample" (standard ONNX) or "plugin" (TensorRT's plugin node).
        program: a compiled-kernel trace to reuse for "plugin" (made here if None).
    """
    import onnx

    if msda not in MSDA_FLAVOURS:
        raise ValueError(f"msda must be one of {MSDA_FLAVOURS}, got {msda!r}")
    if msda == "grid_sample":
        program = trace(detector, images, image_sizes, kernel="reference")
        table = None
    else:
        program = program or trace(detector, images, image_sizes, kernel="compiled")
        table = _plugin_translation()
    onnx_program = torch.onnx.export(
        program,
        (),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=["images", "image_sizes"],
        output_names=["boxes", "scores", "labels"],
        custom_translation_table=table,
        verbose=False,
    )
    model = onnx_program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    onnx.save(model, path)


def onnx_metadata(path: str) -> Dict[str, Any]:
    """The metadata stored by :func:`export_onnx` (empty if none)."""
    import onnx

    model = onnx.load(path, load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}
