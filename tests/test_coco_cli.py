"""COCO-format data named on the command line (DATASETS.TRAIN_JSON / TRAIN_IMAGES / TEST_JSON /
TEST_IMAGES): real exports in the styles of labelme and CVAT, a short train_net.py run that
trains and scores them with pycocotools, --eval-only from the saved config, the demo's class
names, and the messages for bad jsons and a class count that disagrees with the json."""

import json
import os
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import (
    CVAT_CATEGORY_IDS,
    CVAT_CLASS_NAMES,
    ROOT,
    config_path,
    run_train_net,
    tiny_cfg,
    write_cvat_export,
    write_labelme_export,
)

from align_detr.config import ConfigError, load_config
from align_detr.data import DatasetValidationError, load_and_validate_dataset_dicts


def _json_opts(train_json, train_images="", test_json=None, test_images=None):
    opts = ["DATASETS.TRAIN_JSON", train_json, "DATASETS.TRAIN_IMAGES", train_images]
    if test_json:
        opts += ["DATASETS.TEST_JSON", test_json, "DATASETS.TEST_IMAGES", test_images or ""]
    return opts


def _rewrite(path, edit):
    """Applies ``edit`` to the json at ``path`` (in place) and returns the path."""
    with open(path) as f:
        data = json.load(f)
    edit(data)
    with open(path, "w") as f:
        json.dump(data, f)
    return path


def test_labelme_export_registers_with_classes_from_the_json(tmp_path):
    json_file = write_labelme_export(str(tmp_path / "labelme"))
    # TRAIN_IMAGES left empty: labelme's file_name entries are relative to the json's folder.
    cfg = tiny_cfg(*_json_opts(json_file, "", json_file, ""))
    assert cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 2
    assert list(cfg.MODEL.ALIGN_DETR.CLASS_NAMES) == ["red", "green"]
    assert tuple(cfg.DATASETS.TRAIN) == ("coco_json_train",)
    assert tuple(cfg.DATASETS.TEST) == ("coco_json_test",)
    assert cfg.DATASETS.TRAIN_IMAGES == os.path.dirname(json_file)
    assert MetadataCatalog.get("coco_json_test").thing_classes == ["red", "green"]
    dicts = DatasetCatalog.get("coco_json_train")
    assert len(dicts) == 3
    assert all(os.path.isfile(d["file_name"]) for d in dicts)
    # labelme's ids 1, 2 -> contiguous 0, 1; its polygons are loaded as segmentation.
    assert sorted({a["category_id"] for d in dicts for a in d["annotations"]}) == [0, 1]
    assert all(a["segmentation"] for d in dicts for a in d["annotations"])


def test_cvat_export_with_category_id_zero_and_gaps(tmp_path):
    json_file, images = write_cvat_export(str(tmp_path / "cvat"))
    cfg = tiny_cfg(*_json_opts(json_file, images))
    assert cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 3  # every category, the unused one too
    assert list(cfg.MODEL.ALIGN_DETR.CLASS_NAMES) == CVAT_CLASS_NAMES
    meta = MetadataCatalog.get("coco_json_train")
    assert meta.thing_dataset_id_to_contiguous_id == {c: i for i, c in enumerate(CVAT_CATEGORY_IDS)}
    dicts = DatasetCatalog.get("coco_json_train")
    assert sorted({a["category_id"] for d in dicts for a in d["annotations"]}) == [0, 1]
    # The image without annotations: dropped or kept as DATALOADER.FILTER_EMPTY_ANNOTATIONS says.
    assert len(load_and_validate_dataset_dicts(["coco_json_train"], filter_empty=True)) == 3
    assert len(load_and_validate_dataset_dicts(["coco_json_train"], filter_empty=False)) == 4


def test_set_class_count_or_names_that_disagree_with_the_json_is_an_error(tmp_path):
    json_file, images = write_cvat_export(str(tmp_path / "cvat"))
    with pytest.raises(ConfigError, match=r"NUM_CLASSES is 2 but .*has 3 categories"):
        tiny_cfg(*_json_opts(json_file, images), "MODEL.ALIGN_DETR.NUM_CLASSES", "2")
    with pytest.raises(ConfigError, match=r"CLASS_NAMES is \['a', 'b', 'c'\]"):
        tiny_cfg(*_json_opts(json_file, images), "MODEL.ALIGN_DETR.CLASS_NAMES", "['a','b','c']")
    # Agreeing values are fine.
    cfg = tiny_cfg(*_json_opts(json_file, images), "MODEL.ALIGN_DETR.NUM_CLASSES", "3")
    assert cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 3
    # Training and test jsons with other categories.
    other = write_labelme_export(str(tmp_path / "labelme"))
    with pytest.raises(ConfigError, match="different categories"):
        tiny_cfg(*_json_opts(json_file, images, other))


def test_without_a_json_the_class_count_is_cocos_or_the_configs():
    assert tiny_cfg().MODEL.ALIGN_DETR.NUM_CLASSES == 80
    assert tiny_cfg("MODEL.ALIGN_DETR.NUM_CLASSES", "2").MODEL.ALIGN_DETR.NUM_CLASSES == 2
    cfg = tiny_cfg("MODEL.ALIGN_DETR.CLASS_NAMES", "['a','b']")
    assert cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 2
    with pytest.raises(ConfigError, match="CLASS_NAMES has 2 names but NUM_CLASSES is 3"):
        tiny_cfg("MODEL.ALIGN_DETR.CLASS_NAMES", "['a','b']", "MODEL.ALIGN_DETR.NUM_CLASSES", "3")


def _bad_export(tmp_path):
    """The CVAT export with one problem of each kind the check knows, some several times."""
    json_file, images = write_cvat_export(str(tmp_path / "cvat"), num_images=6)

    def edit(data):
        anns, imgs = data["annotations"], data["images"]  # 12 annotations, 2 per image
        del imgs[0]["height"]  # a missing field (its annotations 0, 1 are not reported again)
        for a in anns[2:9]:  # 7 boxes outside their image: 5 listed, "and 2 more"
            a["bbox"] = [500.0, 500.0, 10.0, 10.0]
        del anns[10]["bbox"]
        anns[11]["category_id"] = 3  # not among 0, 5, 7
        anns.append(dict(anns[9], id=99, image_id=1234))  # an image the json does not list

    _rewrite(json_file, edit)
    os.remove(os.path.join(images, "frame_000002.png"))  # a missing image file
    return json_file, images


def test_bad_json_is_one_message_naming_the_file_and_first_entries(tmp_path):
    json_file, images = _bad_export(tmp_path)
    with pytest.raises(DatasetValidationError) as e:
        tiny_cfg(*_json_opts(json_file, images))
    msg = str(e.value)
    assert msg.startswith(f"COCO json {json_file} (DATASETS.TRAIN_JSON) has problems")
    assert "image record without height: 1 x, e.g. images[0] image id=1 (frame_000000.png)" in msg
    assert "entirely outside its image" in msg and "7 x" in msg and "(and 2 more)" in msg
    assert "bbox=[500.0, 500.0, 10.0, 10.0] in a 128x128 image" in msg
    assert "category_id not among the categories' ids (0, 5, 7)" in msg
    assert "category_id=3" in msg
    assert (
        "annotation of an image id not in 'images': 1 x, e.g. annotation id=99 (image id=1234)"
        in msg
    )
    assert "annotation without bbox" in msg
    assert f"image file not found under {images}: 1 x, e.g. frame_000002.png" in msg


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "is not valid JSON"),
        ('{"images": []}', "it needs the lists 'annotations', 'categories'"),
        ("[1, 2]", "it needs the lists 'images', 'annotations', 'categories'"),
    ],
)
def test_not_a_coco_json(tmp_path, content, expected):
    path = tmp_path / "x.json"
    path.write_text(content)
    with pytest.raises(DatasetValidationError, match=expected):
        tiny_cfg("DATASETS.TEST_JSON", str(path))


def test_a_test_json_needs_area_for_pycocotools(tmp_path):
    json_file = write_labelme_export(str(tmp_path / "labelme"))
    _rewrite(json_file, lambda d: d["annotations"][0].pop("area"))
    tiny_cfg(*_json_opts(json_file))  # training does not need it
    with pytest.raises(DatasetValidationError, match="pycocotools' evaluation needs 'area'"):
        tiny_cfg("DATASETS.TEST_JSON", json_file)


def test_missing_json_or_image_folder(tmp_path):
    gone = str(tmp_path / "gone.json")
    with pytest.raises(FileNotFoundError, match="DATASETS.TRAIN_JSON not found: .*gone.json"):
        tiny_cfg("DATASETS.TRAIN_JSON", gone)
    # With the classes in the config (a saved config.yaml), the demo can load it without data;
    # train_net's input check names the missing json.
    cfg = tiny_cfg("DATASETS.TRAIN_JSON", gone, "MODEL.ALIGN_DETR.NUM_CLASSES", "2")
    import train_net

    with pytest.raises(FileNotFoundError, match="DATASETS.TRAIN_JSON not found"):
        train_net.check_inputs(cfg)
    json_file = write_labelme_export(str(tmp_path / "labelme"))
    with pytest.raises(FileNotFoundError, match="image folder .* not found: .*nowhere"):
        tiny_cfg(*_json_opts(json_file, str(tmp_path / "nowhere")))


def _run_script(argv, timeout=300, env=None):
    """Runs a script of the repository (``argv[0]``) in a fresh Python, from the repo root."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.run(
        [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_bad_json_stops_train_net_before_any_process_starts(tmp_path):
    json_file, images = _bad_export(tmp_path)
    # --num-gpus 2 on a machine without GPUs: launch() would fail; the json check comes first.
    argv = ["train_net.py", "--num-gpus", "2", "--config-file", config_path("tiny_test.yaml")]
    proc = _run_script(argv + _json_opts(json_file, images))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count(f"COCO json {json_file}") == 1
    assert "entirely outside its image" in proc.stderr


def test_train_eval_only_and_demo_on_a_cvat_json(tmp_path):
    """One train_net.py command trains and scores (pycocotools) a json with category ids 0, 5, 7;
    --eval-only and the demo read the run's saved config.yaml and see the same data and names."""
    json_file, images = write_cvat_export(str(tmp_path / "cvat"))
    out_dir = str(tmp_path / "out")
    base = ["--config-file", config_path("tiny_test.yaml")]
    run_train_net(base + _json_opts(json_file, images, json_file, images) + ["OUTPUT_DIR", out_dir])
    with open(os.path.join(out_dir, "metrics.json")) as f:
        last = [json.loads(line) for line in f][-1]
    assert "bbox/AP50" in last  # scored after training

    saved = os.path.join(out_dir, "config.yaml")
    weights = os.path.join(out_dir, "model_final.pth")
    res = run_train_net(["--config-file", saved, "--eval-only", "MODEL.WEIGHTS", weights])
    assert 0.0 <= res["bbox"]["AP"] <= 100.0
    with open(os.path.join(out_dir, "inference", "coco_instances_results.json")) as f:
        detections = json.load(f)
    # Predictions are written with the json's own category ids, as pycocotools scores them.
    assert detections and {d["category_id"] for d in detections} <= set(CVAT_CATEGORY_IDS)

    cfg = load_config(saved, ["MODEL.WEIGHTS", weights])
    assert cfg.DATASETS.TEST_JSON == json_file and cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 3
    from align_detr.engine.predictor import Predictor

    assert Predictor(cfg).metadata.thing_classes == CVAT_CLASS_NAMES


def test_two_processes_register_the_json_each(tmp_path):
    """--num-gpus 2 (gloo on CPU): every process that launch() spawns loads the config and so
    registers the json itself; training and the distributed evaluation run on it."""
    json_file = write_labelme_export(str(tmp_path / "labelme"), num_images=4)
    out_dir = str(tmp_path / "out")
    argv = ["train_net.py", "--num-gpus", "2", "--dist-url", "auto"]
    argv += ["--config-file", config_path("tiny_test.yaml"), *_json_opts(json_file, "", json_file)]
    argv += ["SOLVER.MAX_ITER", "2", "SOLVER.STEPS", "(1,)", "OUTPUT_DIR", out_dir]
    proc = _run_script(argv, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out_dir, "metrics.json")) as f:
        last = [json.loads(line) for line in f][-1]
    assert "bbox/AP50" in last


def test_code_that_builds_a_config_without_load_config_keeps_cocos_80():
    """detectron2's convention (get_cfg + add_align_detr_config + merge) still gets 80 classes;
    only load_config treats an unset NUM_CLASSES as "from the data"."""
    from detectron2.config import get_cfg

    from align_detr.config import add_align_detr_config

    cfg = get_cfg()
    add_align_detr_config(cfg)
    cfg.merge_from_file(config_path("tiny_test.yaml"))
    assert cfg.MODEL.ALIGN_DETR.NUM_CLASSES == 80


def test_an_explicit_80_is_checked_against_the_json(tmp_path):
    json_file = write_labelme_export(str(tmp_path / "labelme"))
    with pytest.raises(ConfigError, match="NUM_CLASSES is 80 but"):
        tiny_cfg(*_json_opts(json_file), "MODEL.ALIGN_DETR.NUM_CLASSES", "80")
