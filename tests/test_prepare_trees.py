"""tools/prepare_trees.py on a small synthetic VOC folder written here: tiling, clipping,
sliver rule, unique ids, label mapping, idempotence, the held-out-region split (no training tile
overlaps a held-out region); and the trees_* dataset registration."""

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
    # The cross-site protocol: whole training images tiled, whole test images.
    out = tmp_path / "trees"
    jsons = pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200)
    train, val = load(jsons["xsite_train"]), load(jsons["xsite_val"])
    assert train["categories"] == [{"id": 1, "name": "tree", "supercategory": "plant"}]
    files = {im["id"]: im["file_name"] for im in train["images"]}
    assert sorted(files.values()) == ["big_0_0.png", "big_200_0.png"]
    for im in train["images"]:
        assert (im["width"], im["height"]) == (200, 200)
        assert Image.open(out / "xsite_train" / im["file_name"]).size == (200, 200)
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
    assert len(load(jsons["xsite_train"])["annotations"]) == 4


def _overlap(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def test_held_out_regions_never_overlap_training_tiles(voc, tmp_path):
    out = tmp_path / "trees"
    jsons = pt.prepare(str(voc), str(out), ["big"], ["held"], tile=200, holdout=0.3)
    train, val = load(jsons["train"]), load(jsons["val"])
    # Every image contributes to both parts; "big" is 400 wide: split at x = 280.
    assert {im["source"] for im in train["images"]} == {"big", "held"}
    assert {im["source"] for im in val["images"]} <= {"big", "held"}
    held_out = {}
    for im in val["images"]:
        held_out.setdefault(im["source"], []).append(im["window"])
        assert (
            im["window"][0] >= pt.region_of(400 if im["source"] == "big" else 100, "right", 0.3)[0]
        )
    for windows in held_out.values():  # test tiles are adjacent: each crown is scored once
        assert not any(_overlap(a, b) for i, a in enumerate(windows) for b in windows[i + 1 :])
    for im in train["images"]:
        x0, y0, x1, y1 = im["window"]
        assert (im["width"], im["height"]) == (x1 - x0, y1 - y0)
        for window in held_out.get(im["source"], []):
            assert not _overlap(im["window"], window), (im, window)
    big_train = [im["window"] for im in train["images"] if im["source"] == "big"]
    assert max(w[2] for w in big_train) == 280 and min(w[0] for w in big_train) == 0
    # Left part 0..280 in tiles (0, 0, 200, 200) and (80, 0, 280, 200): the crown at x 180..240
    # is a sliver in the first (1/3 visible) and whole in the second, at x 100..160 there.
    files = {im["id"]: im for im in train["images"]}
    second = [
        a["bbox"]
        for a in train["annotations"]
        if files[a["image_id"]]["window"] == [80, 0, 280, 200]
    ]
    assert [100, 20, 60, 60] in second
    # The images' pixels: a held-out tile is the crop of its window.
    src = np.asarray(Image.open(voc / "big.png"))
    for im in val["images"]:
        if im["source"] == "big":
            x0, y0, x1, y1 = im["window"]
            crop = np.asarray(Image.open(out / "val" / im["file_name"]))
            assert np.array_equal(crop, src[y0:y1, x0:x1])
    with pytest.raises(ValueError, match="holdout"):
        pt.prepare(str(voc), str(out), ["big"], ["held"], holdout=1.0)


def test_register_trees(voc, tmp_path):
    from align_detr.data.datasets import register_trees

    pt.prepare(str(voc), str(tmp_path / "trees"), ["big"], ["held"], tile=200)
    names = ["trees_train", "trees_val", "trees_xsite_train", "trees_xsite_val"]
    saved = {}
    for name in names:  # the repo's own data may be registered already
        if name in DatasetCatalog.list():
            saved[name] = (DatasetCatalog[name], MetadataCatalog.get(name).as_dict())
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
    try:
        assert register_trees(str(tmp_path)) == names
        assert len(DatasetCatalog.get("trees_xsite_train")) == 2
        assert MetadataCatalog.get("trees_val").thing_classes == ["tree"]
        assert register_trees(str(tmp_path)) == []  # already there
    finally:
        for name in names:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        for name, (func, meta) in saved.items():
            DatasetCatalog.register(name, func)
            meta.pop("name", None)
            MetadataCatalog.get(name).set(**meta)
