#!/usr/bin/env python
# Copyright (c) align-detr contributors.
"""Runs our model on an equivalence fixture and reports how far its outputs and losses are from
the official code's.

A fixture (``tests/data/golden_*.pt``, written by ``tools/make_equivalence_fixture.py`` from the
official Align-DETR / detrex code) holds their architecture, their checkpoint (their names),
two real images, their inference outputs (each image alone and both batched) and their training
losses with denoising off. This tool builds our model from the architecture, loads their
checkpoint through the real loading path (``AtomicCheckpointer``: format detection and
conversion, every weight required), and compares.

    python tools/check_equivalence.py tests/data/golden_aligndetr.pt
"""

import argparse
import os
import sys
import tempfile
from typing import Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from align_detr.utils.quiet import quiet_third_party_warnings  # noqa: E402

quiet_third_party_warnings()  # first: some of detectron2's warnings come when it is imported

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

import align_detr.modeling  # noqa: E402,F401  (registers the model)
from align_detr.config import load_config  # noqa: E402
from align_detr.engine import AtomicCheckpointer  # noqa: E402

#: Their loss type names -> ours.
_LOSS_TYPES = {"align": "align", "focal": "focal"}


def config_opts(arch: Dict) -> List[str]:
    """Command-line overrides of configs/Base-AlignDETR.yaml that build their architecture."""
    r = arch["resnet"]
    opts = {
        "MODEL.DEVICE": "cpu",
        "MODEL.WEIGHTS": "",
        "MODEL.PIXEL_MEAN": list(arch["pixel_mean"]),
        "MODEL.PIXEL_STD": list(arch["pixel_std"]),
        "INPUT.FORMAT": arch["input_format"],
        "MODEL.BACKBONE.FREEZE_AT": r["freeze_at"],
        "MODEL.RESNETS.DEPTH": r["depth"],
        "MODEL.RESNETS.STEM_OUT_CHANNELS": r["stem_out_channels"],
        "MODEL.RESNETS.RES2_OUT_CHANNELS": r["res2_out_channels"],
        "MODEL.RESNETS.NUM_GROUPS": r["num_groups"],
        "MODEL.RESNETS.WIDTH_PER_GROUP": r["width_per_group"],
        "MODEL.RESNETS.STRIDE_IN_1X1": r["stride_in_1x1"],
        "MODEL.RESNETS.RES5_DILATION": r["res5_dilation"],
        "MODEL.RESNETS.NORM": r["norm"],
        "MODEL.RESNETS.OUT_FEATURES": list(r["out_features"]),
    }
    a = "MODEL.ALIGN_DETR."
    opts.update(
        {
            a + "D_MODEL": arch["d_model"],
            a + "NHEADS": arch["nheads"],
            a + "NUM_FEATURE_LEVELS": arch["num_feature_levels"],
            a + "IN_FEATURES": list(arch["in_features"]),
            a + "NUM_QUERIES": arch["num_queries"],
            a + "NUM_SELECT": arch["num_select"],
            a + "NUM_CLASSES": arch["num_classes"],
            a + "ENCODER.NUM_LAYERS": arch["enc_layers"],
            a + "ENCODER.N_POINTS": arch["enc_n_points"],
            a + "ENCODER.DIM_FEEDFORWARD": arch["enc_ffn_dim"],
            a + "ENCODER.DROPOUT": arch["dropout"],
            a + "DECODER.NUM_LAYERS": arch["dec_layers"],
            a + "DECODER.N_POINTS": arch["dec_n_points"],
            a + "DECODER.DIM_FEEDFORWARD": arch["dec_ffn_dim"],
            a + "DECODER.DROPOUT": arch["dropout"],
            # models without denoising (H-Deformable-DETR, Conditional DETR) have no "dn" entry
            a + "DN.ENABLED": arch.get("dn", {"enabled": False})["enabled"],
            a + "LOSS.TYPE": _LOSS_TYPES[arch["loss_type"]],
            a + "LOSS.MATCH_K": list(arch["match_k"]),
            a + "MATCHER.COST_CLASS": arch["matcher"]["cost_class"],
            a + "MATCHER.COST_BBOX": arch["matcher"]["cost_bbox"],
            a + "MATCHER.COST_GIOU": arch["matcher"]["cost_giou"],
            a + "LOSS.FOCAL_ALPHA": arch["matcher"]["alpha"],
            a + "LOSS.GAMMA": arch["matcher"]["gamma"],
            a + "LOSS.CLASS_WEIGHT": float(arch["weight_dict_base"]["loss_class"]),
            a + "LOSS.BBOX_WEIGHT": float(arch["weight_dict_base"]["loss_bbox"]),
            a + "LOSS.GIOU_WEIGHT": float(arch["weight_dict_base"]["loss_giou"]),
        }
    )
    if arch["loss_type"] == "align":
        opts[a + "LOSS.TAU"] = arch["tau"]
        opts[a + "LOSS.ALPHA"] = arch["align_alpha"]
    if "num_queries_one2many" in arch:  # H-Deformable-DETR and its hybrid branch
        opts[a + "BASE"] = "HDeformableDETR"
        opts[a + "NUM_QUERIES"] = arch["num_queries_one2one"]
        opts[a + "HYBRID.NUM_QUERIES"] = arch["num_queries_one2many"]
        opts[a + "HYBRID.K"] = arch["k_one2many"]
        opts[a + "HYBRID.WEIGHT"] = arch["lambda_one2many"]
    if arch["model"] == "conditional_detr":
        opts[a + "BASE"] = "ConditionalDETR"
        # their decoder attends the padded memory in training (their encoder masks it)
        opts[a + "CONDITIONAL.DECODER_PADDING_MASK"] = False
    # keys their architecture has no value for (Conditional DETR: no deformable points)
    opts = {k: v for k, v in opts.items() if v is not None}
    return [str(x) for kv in opts.items() for x in kv]


def build_from_fixture(fixture: Dict, tmp_dir: str, *extra_opts):
    """Our model of the fixture's architecture, with their checkpoint loaded from a file through
    the checkpointer every entry point uses."""
    cfg = load_config(
        os.path.join(ROOT, "configs", "Base-AlignDETR.yaml"),
        config_opts(fixture["arch"]) + list(extra_opts),
    )
    model = build_model(cfg)
    path = os.path.join(tmp_dir, "official.pth")
    torch.save(fixture["checkpoint"], path)
    AtomicCheckpointer(model, require_all=True).load(path)
    return model


def model_inputs(fixture: Dict, with_targets: bool = False) -> List[Dict]:
    """Their batched_inputs as detectron2 input dicts."""
    out = []
    for x in fixture["inputs"]["batched_inputs"]:
        d = {"image": x["image"], "height": x["height"], "width": x["width"]}
        if with_targets:
            inst = Instances(tuple(x["instances"]["image_size"]))
            inst.gt_boxes = Boxes(x["instances"]["gt_boxes"])
            inst.gt_classes = x["instances"]["gt_classes"]
            d["instances"] = inst
        out.append(d)
    return out


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1.0)).max()) if a.numel() else 0.0


def compare_inference(model, fixture: Dict, setting: str) -> Dict[str, float]:
    """Max differences between our outputs and theirs for "single_0", "single_1" or "batched".

    Returns:
        per-query logits / boxes of every decoder layer and of the encoder's picks (max abs),
        the kept detections' scores (max abs) and boxes (max relative to max(|box|, 1 px)), and
        whether the labels agree (0 or 1).
    """
    inputs = model_inputs(fixture)
    if setting.startswith("single_"):
        inputs = [inputs[int(setting[-1])]]
    seen = {}
    hook = model.transformer.register_forward_hook(lambda m, i, o: seen.update(out=o))
    model.eval()
    try:
        with torch.no_grad():
            results = model(inputs)
    finally:
        hook.remove()
    theirs = fixture["inference"][setting]
    enc = seen["out"]["enc"]
    # two-stage models: the encoder's picks; Conditional DETR: the queries' reference points
    extra = ("enc_logits", "enc_boxes") if enc is not None else ("reference",)
    diffs = {"layer_logits": 0.0, "layer_boxes": 0.0, **{k: 0.0 for k in extra}}
    diffs.update({"scores": 0.0, "boxes": 0.0})
    labels_equal = True
    for b, (res, ref) in enumerate(zip(results, theirs)):
        for layer, out in enumerate(seen["out"]["layers"]):
            diffs["layer_logits"] = max(
                diffs["layer_logits"],
                float((out["pred_logits"][b] - ref["layer_logits"][layer]).abs().max()),
            )
            diffs["layer_boxes"] = max(
                diffs["layer_boxes"],
                float((out["pred_boxes"][b] - ref["layer_boxes"][layer]).abs().max()),
            )
        if enc is not None:
            diffs["enc_logits"] = max(
                diffs["enc_logits"], float((enc["pred_logits"][b] - ref["enc_logits"]).abs().max())
            )
            diffs["enc_boxes"] = max(
                diffs["enc_boxes"], float((enc["pred_boxes"][b] - ref["enc_boxes"]).abs().max())
            )
        else:
            ours_ref = seen["out"]["reference"][b]
            diffs["reference"] = max(
                diffs["reference"], float((ours_ref - ref["reference"]).abs().max())
            )
        inst, want = res["instances"], ref["instances"]
        if len(inst) != len(want["scores"]):
            raise AssertionError(f"{setting}: {len(inst)} detections, theirs {len(want['scores'])}")
        diffs["scores"] = max(diffs["scores"], float((inst.scores - want["scores"]).abs().max()))
        diffs["boxes"] = max(diffs["boxes"], _max_rel(inst.pred_boxes.tensor, want["boxes"]))
        labels_equal &= bool(torch.equal(inst.pred_classes, want["labels"]))
    diffs["labels_equal"] = float(labels_equal)
    return diffs


def compare_losses(model, fixture: Dict) -> Dict[str, float]:
    """Relative differences of every loss term they report (denoising off) and of the total."""
    model.train()
    torch.manual_seed(0)
    losses = model(model_inputs(fixture, with_targets=True))
    theirs = {k: v.reshape(()) for k, v in fixture["train"]["loss_dict"].items()}
    diffs = {}
    for key, ref in theirs.items():
        if key.startswith(("loss_class_dn", "loss_bbox_dn", "loss_giou_dn")):
            assert float(ref) == 0.0  # their zero DN terms (denoising off)
            continue
        diffs[key] = float((losses[key].detach() - ref).abs() / ref.abs().clamp(min=1e-12))
    missing = set(losses) - set(theirs)
    if missing:
        raise AssertionError(f"loss terms they do not have: {sorted(missing)}")
    total = sum(v.detach() for v in losses.values())
    ref_total = fixture["train"]["total_loss"].reshape(())
    diffs["total"] = float((total - ref_total).abs() / ref_total.abs())
    return diffs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("fixture")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    fixture = torch.load(args.fixture, weights_only=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = build_from_fixture(fixture, tmp)
        batched = build_from_fixture(fixture, tmp, "MODEL.ALIGN_DETR.TEST_PADDING_MASK", "False")
    for setting in fixture["inference"]:
        net = batched if setting == "batched" else model
        diffs = compare_inference(net, fixture, setting)
        print(f"inference {setting}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    diffs = compare_losses(model, fixture)
    print("losses (relative): " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


if __name__ == "__main__":
    main()
