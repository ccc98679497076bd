"""tools/prepare_trees.py on a small synthetic VOC folder written here: tiling, clipping,
sliver rule, unique ids, label mapping, idempotence; and the trees_* dataset registration."""

import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import load_script
from PIL import Image

pt = load_script("tools/prepare_trees.py")

VOC = """<annotation><filename>{name}.tif</filename>
<size><width>{w}</width><height>{h}</height><depth>3</depth></size>{objects}</annotation>"""
OBJ = (
    "<object><name>{label}</name><bndbox><xmin>{0}</xmin><ymin>{1}</ymin><xmax>{2}</xmax>"
    "<ymax>{3}</ymax></bndbox></object>"
)


def write_voc(folder, name, w, h, objects):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder, name + ".png")
    )
    xml = VOC.format(
        name=name, w=w, h=h, objects="".join(OBJ.format(*b, label=lab) for lab, b in objects)
    )
    with open(os.path.join(folder, name + ".xml"), "w") as f:
        f.write(xml)


@pytest.fixture
def voc(tmp_path):
    src = tmp_path / "voc"
    src.mkdir()
    # 400x200 cut into two 200x200 tiles at x = 0 and x = 200.
    write_voc(
        src,
        "big",
        400,
        200,
        [
            ("Tree", (10, 10, 50, 60)),  # inside tile 0
            ("Tree", (180, 20, 240, 80)),  # 1/3 in tile 0 (dropped there), 2/3 in tile 1
            ("Tree", (197, 100, 260, 140)),  # 3 px sliver in tile 0, 60 of 63 px in tile 1
            ("Tree", (300, 150, 340, 152)),  # 2 px high: a sliver everywhere
        ],
    )
    write_voc(src, "held", 100, 80, [("Dead", (5, 5, 30, 30)), ("Alive", (60, 40, 120, 79))])
    return src


def load(path):
    with open(path) as f:
        return json.load(f)


def test_tile_origins_and_clip_box():
    assert pt.tile_origins(400, 400) == [0]
    assert pt.tile_origins(300, 400) == [0]
    assert pt.tile_origins(1000, 400) == [0, 300, 600]
    assert pt.tile_origins(2299, 400)[-1] == 1899
    win = (100, 100, 200, 200)
    assert pt.clip_box((110, 120, 150, 160), win, 0.5, 4) == (10, 20, 50, 60)
    assert pt.clip_box((80, 120, 130, 160), win, 0.5, 4) == (0, 20, 30, 60)  # 60% inside
    assert pt.clip_box((60, 120, 110, 160), win, 0.5, 4) is None  # 20% inside
    assert pt.clip_box((110, 120, 112, 160), win, 0.0, 4) is None  # 2 px wide
    assert pt.clip_box((110, 120, 110, 160), win, 0.0, 0.0) is None  # empty


def test_prepare_tiles_clips_and_drops(voc, tmp_path):
    out = tmp_path / "trees"
    jsons = pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200)
    train, val = load(jsons["train"]), load(jsons["val"])
    assert train["categories"] == [{"id": 1, "name": "tree", "supercategory": "plant"}]
    files = {im["id"]: im["file_name"] for im in train["images"]}
    assert sorted(files.values()) == ["big_0_0.png", "big_200_0.png"]
    for im in train["images"]:
        assert (im["width"], im["height"]) == (200, 200)
        assert Image.open(out / "train" / im["file_name"]).size == (200, 200)
    boxes = {}
    for a in train["annotations"]:
        boxes.setdefault(files[a["image_id"]], []).append(a["bbox"])
        assert a["category_id"] == 1 and a["iscrowd"] == 0
        assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])
    assert boxes["big_0_0.png"] == [[10, 10, 40, 50]]
    assert boxes["big_200_0.png"] == [[0, 20, 40, 60], [0, 100, 60, 40]]
    for split in (train, val):
        ids = [a["id"] for a in split["annotations"]]
        assert len(set(ids)) == len(ids)
        assert len({im["id"] for im in split["images"]}) == len(split["images"])
    # Held-out images are whole; every label is "tree"; boxes are clipped to the image.
    assert [im["file_name"] for im in val["images"]] == ["held.png"]
    assert [a["bbox"] for a in val["annotations"]] == [[5, 5, 25, 25], [60, 40, 40, 39]]
    assert {a["category_id"] for a in val["annotations"]} == {1}


def test_prepare_is_idempotent(voc, tmp_path, capsys):
    out = tmp_path / "trees"
    jsons = pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200)
    before = os.path.getmtime(jsons["train"])
    assert pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200) == jsons
    assert os.path.getmtime(jsons["train"]) == before
    assert "already prepared" in capsys.readouterr().out
    # Other options rebuild.
    pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200, min_visible=0.1)
    assert len(load(jsons["train"])["annotations"]) == 4


def test_register_trees(voc, tmp_path):
    from align_detr.data.datasets import register_trees

    pt.prepare(str(voc), str(tmp_path / "trees"), ["big"], ["held"], tile=200)
    saved = {}
    for name in ("trees_train", "trees_val"):  # the repo's own data may be registered already
        if name in DatasetCatalog.list():
            saved[name] = (DatasetCatalog[name], MetadataCatalog.get(name).as_dict())
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    try:
        assert register_trees(str(tmp_path)) == ["trees_train", "trees_val"]
        assert len(DatasetCatalog.get("trees_train")) == 2
        assert MetadataCatalog.get("trees_val").thing_classes == ["tree"]
        assert register_trees(str(tmp_path)) == []  # already there
    finally:
        for name in ("trees_train", "trees_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        for name, (func, meta) in saved.items():
            DatasetCatalog.register(name, func)
            meta.pop("name", None)
            MetadataCatalog.get(name).set(**meta)
