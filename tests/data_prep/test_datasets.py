"""Dataset descriptions and their readers, on datasets generated here: a 3-class generic one with colour
masks, one with index masks, a small Cityscapes-layout one; CamVid's built-in description against
segnet.classes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import camvid, iter_samples, prepare, read_manifest
from data_prep.datasets import CAMVID, DatasetDescription, find_pairs, load_pair, read_description
from data_prep.datasets.cityscapes import TRAIN_IDS
from data_prep.shards import dataset_of
from segnet import SegNetError
from segnet.classes import CLASSES, VOID

ROOT = Path(__file__).resolve().parents[2]
COLOURS = {"crack": [255, 0, 0], "rust": [0, 255, 0], "paint": [0, 0, 255]}
VOID_COLOUR, VOID_VALUE = (255, 255, 255), 255
SIZES = {"train": [(24, 32), (20, 28), (24, 32)], "val": [(16, 16), (24, 32)], "test": [(12, 20)]}


def _description(masks: str) -> str:
    classes = "\n".join(f"  - {{name: {n}, color: {c}}}" for n, c in COLOURS.items())
    void = f"void_color: {list(VOID_COLOUR)}" if masks == "color" else f"void: {VOID_VALUE}"
    return f"name: inspection\nlayout: generic\nmasks: {masks}\nclasses:\n{classes}\n{void}\n"


def _label(h: int, w: int, seed: int) -> np.ndarray:
    """Stored indices: 0..2 and void 3, each present."""
    label = np.random.default_rng(seed).integers(0, 4, (h, w)).astype(np.uint8)
    label[0, :4] = [0, 1, 2, 3]
    return label


def make_generic(root: Path, masks: str) -> dict[str, np.ndarray]:
    """images/SPLIT/NAME.{png,jpg} (sizes differ) and masks/SPLIT/NAME.png; returns the expected labels."""
    palette = np.array([*COLOURS.values(), VOID_COLOUR], np.uint8)
    expected = {}
    for split, sizes in SIZES.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            name = f"{split}_{i}"
            image = np.random.default_rng(i).integers(0, 256, (h, w, 3)).astype(np.uint8)
            suffix = ".jpg" if i == 1 else ".png"  # JPEG images are accepted
            Image.fromarray(image).save(root / "images" / split / f"{name}{suffix}")
            label = _label(h, w, len(expected))
            mask = (
                palette[label]
                if masks == "color"
                else np.where(label == 3, VOID_VALUE, label).astype(np.uint8)
            )
            Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")
            expected[name] = label
    (root / "dataset.yaml").write_text(_description(masks))
    return expected


def make_cityscapes(root: Path) -> dict[str, np.ndarray]:
    """leftImg8bit/SPLIT/CITY/*_leftImg8bit.png with gtFine/SPLIT/CITY/*_gtFine_labelIds.png, train and val
    only (Cityscapes' test labels are not public); returns the expected labels (trainIds, void 19)."""
    expected = {}
    for split, cities in {"train": ["aachen", "bochum"], "val": ["frankfurt"]}.items():
        for city in cities:
            for frame in range(2):
                name = f"{city}_000000_{frame:06d}"
                for folder in ("leftImg8bit", "gtFine"):
                    (root / folder / split / city).mkdir(parents=True, exist_ok=True)
                ids = np.random.default_rng(frame).integers(0, 34, (16, 32)).astype(np.uint8)
                ids[0, :3] = [7, 26, 33]  # road, car, bicycle
                image = np.random.default_rng(frame + 10).integers(0, 256, (16, 32, 3)).astype(np.uint8)
                Image.fromarray(image).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
                Image.fromarray(ids).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")
                table = np.full(34, 19, np.uint8)
                for label_id, train_id in TRAIN_IDS.items():
                    table[label_id] = train_id
                expected[name] = table[ids]
    return expected


def _load_all(description: DatasetDescription, root: Path) -> dict[str, dict]:
    return {p.name: load_pair(description, p) for ps in find_pairs(description, root).values() for p in ps}


@pytest.mark.parametrize("masks", ["color", "index"])
def test_generic_dataset_loads_each_mask_as_class_indices_with_void_last(tmp_path, masks):
    expected = make_generic(tmp_path, masks)
    description = read_description(tmp_path / "dataset.yaml")
    assert description.classes == tuple(COLOURS) and description.void_index == 3
    samples = _load_all(description, tmp_path)
    assert set(samples) == set(expected)
    for name, s in samples.items():
        assert s["image"].dtype == np.uint8 and s["image"].shape == (*expected[name].shape, 3)
        assert s["label"].dtype == np.uint8 and np.array_equal(s["label"], expected[name])


def test_cityscapes_label_ids_map_to_the_19_training_classes_and_void(tmp_path):
    expected = make_cityscapes(tmp_path)
    description = read_description(ROOT / "configs" / "datasets" / "cityscapes.yaml")
    pairs = find_pairs(description, tmp_path)
    assert set(pairs) == {"train", "val"}  # no test split: it is optional
    samples = _load_all(description, tmp_path)
    assert set(samples) == set(expected)
    for name, s in samples.items():
        assert np.array_equal(s["label"], expected[name])
        assert s["label"][0, :3].tolist() == [0, 13, 18]


def test_camvid_description_matches_segnet_classes_and_the_palette():
    assert CAMVID.classes == CLASSES and CAMVID.void_index == VOID
    assert len(CAMVID.palette) == len(CLASSES) + 1 and CAMVID.palette[VOID] == (0, 0, 0)  # void black
    assert CAMVID.mask_colors() == camvid.CAMVID32_TO_11  # the original release's colours, void black


def test_camvid_yaml_is_the_built_in_description():
    assert read_description(ROOT / "configs" / "datasets" / "camvid.yaml") == CAMVID


def test_camvid_description_reads_camvid_as_todays_reader(camvid_dir):
    pairs = find_pairs(CAMVID, camvid_dir, limit=2)
    assert {s: len(p) for s, p in pairs.items()} == {"train": 2, "val": 2, "test": 2}
    for pair in pairs["train"]:
        ours, today = load_pair(CAMVID, pair), camvid.load_pair(pair)
        assert np.array_equal(ours["label"], today["label"]) and np.array_equal(ours["image"], today["image"])


def test_another_class_table_in_camvids_layout_is_read_by_its_description(small_camvid):
    """A 2-class table in the SegNet layout: CamVid's 0 and 1 are its classes, void 11; 2 is refused."""
    three = DatasetDescription.from_dict(
        {"name": "two", "layout": "camvid", "classes": [{"name": "a", "color": [1, 1, 1]},
                                                        {"name": "b", "color": [2, 2, 2]}], "void": 11}
    )  # fmt: skip
    pair = find_pairs(three, small_camvid)["train"][0]
    with pytest.raises(
        SegNetError, match=r"has label value 2, outside the class table of 'two' \(expected 0..1, 11\)"
    ):
        load_pair(three, pair)


@pytest.mark.parametrize("description", [CAMVID, read_description(ROOT / "configs/datasets/cityscapes.yaml")])
def test_to_dict_and_from_dict_give_back_the_description(description):
    assert DatasetDescription.from_dict(description.to_dict()) == description


def test_a_manifest_without_a_dataset_reads_as_camvid():
    assert dataset_of({"schema_version": 1, "splits": {}}) is CAMVID
    assert dataset_of({"dataset": CAMVID.to_dict()}) == CAMVID


ONE = "classes:\n  - {name: a, color: [1, 2, 3]}\n"  # a valid one-class table
BAD_DESCRIPTIONS = {
    "unknown key": ("colours: []\n", "unknown key `colours`"),
    "missing classes": ("", "the key `classes` is missing"),
    "class without a colour": ("classes:\n  - {name: a}\n", r"`classes\[0\]`: expected \{name, color"),
    "colour of two values": ("classes:\n  - {name: a, color: [1, 2]}\n", r"`classes\[0\].color`: expected"),
    "colour out of range": ("classes:\n  - {name: a, color: [1, 2, 300]}\n", r"`classes\[0\].color`"),
    "class named twice": (ONE + "  - {name: a, color: [3, 2, 1]}\n", r"`classes\[1\].name`: expected"),
    "void of a class's value": (ONE + "void: 0\n", "`void`: expected a mask value 1..255"),
    "void as text": (ONE + "void: none\n", "`void`: expected a mask value"),
    "unknown layout": ("layout: voc\n" + ONE, "`layout`: expected generic or .*, got 'voc'"),
    "no val split": (ONE + "splits: {train: t}\n", "`splits`: expected a mapping of train, val"),
    "colour map to no class": (ONE + "color_map:\n  - {color: [0, 0, 0], class: b}\n",
                               r"`color_map\[0\].class`: expected one of the classes \(a\)"),
    "not YAML": ("classes: [\n", "is not valid YAML"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_DESCRIPTIONS)
def test_a_bad_description_is_one_line_naming_the_file_and_key(tmp_path, case):
    text, fragment = BAD_DESCRIPTIONS[case]
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\n" + text)
    with pytest.raises(SegNetError, match=fragment) as e:
        read_description(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def _damage(root: Path, how: str) -> str:
    """Damage a generated generic dataset (colour masks) in one way; return what the error must say."""
    mask = root / "masks" / "train" / "train_0.png"
    if how == "mask value outside the class table":
        (root / "dataset.yaml").write_text(_description("index"))
        make_index = np.zeros((24, 32), np.uint8)
        make_index[3, 3] = 7
        for p in (root / "masks").rglob("*.png"):
            Image.fromarray(np.zeros(Image.open(p).size[::-1], np.uint8)).save(p)
        Image.fromarray(make_index).save(mask)
        return f"{mask} has label value 7, outside the class table of 'inspection' (expected 0..2, 255)"
    if how == "mask colour missing from the map":
        rgb = np.asarray(Image.open(mask)).copy()
        rgb[2, 5] = (1, 2, 3)
        Image.fromarray(rgb).save(mask)
        return f"{mask}: colour (1, 2, 3) is missing from the colour map of 'inspection'"
    if how == "image without a mask":
        mask.unlink()
        return f"image {root / 'images' / 'train' / 'train_0.png'} has no mask: expected {mask}"
    if how == "name in two splits":
        (root / "images" / "val" / "val_0.png").rename(root / "images" / "val" / "train_2.png")
        (root / "masks" / "val" / "val_0.png").rename(root / "masks" / "val" / "train_2.png")
        return "share the name 'train_2': a name belongs to one split"
    if how == "empty split":
        for p in (root / "images" / "val").iterdir():
            p.unlink()
        return f"split 'val' is empty: no PNG or JPEG images in {root / 'images' / 'val'}"
    if how == "missing train split":
        for p in (root / "images" / "train").iterdir():
            p.unlink()
        (root / "images" / "train").rmdir()
        return "split 'train' is missing"
    if how == "mask that is a JPEG":
        Image.open(mask).save(mask, format="JPEG")
        return f"{mask} is a JPEG file, expected a PNG"
    if how == "size mismatch":
        Image.open(mask).crop((0, 0, 8, 8)).save(mask)
        return "but its label"
    raise AssertionError(how)


BAD_INPUT = [
    "mask value outside the class table",
    "mask colour missing from the map",
    "image without a mask",
    "name in two splits",
    "empty split",
    "missing train split",
    "mask that is a JPEG",
    "size mismatch",
]


@pytest.mark.parametrize("how", BAD_INPUT)
def test_bad_input_is_one_line_naming_the_file(tmp_path, how):
    make_generic(tmp_path, "color")
    fragment = _damage(tmp_path, how)
    with pytest.raises(SegNetError) as e:
        _load_all(read_description(tmp_path / "dataset.yaml"), tmp_path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, png_declaring):
    make_generic(tmp_path, "color")
    image = tmp_path / "images" / "val" / "val_0.png"
    image.write_bytes(png_declaring(8000, 6000))  # 48 M pixels: under PIL's own limit, over ours
    with pytest.raises(SegNetError, match="declares 8000x6000 pixels, over the limit of 40,000,000"):
        _load_all(read_description(tmp_path / "dataset.yaml"), tmp_path)


def test_cityscapes_layout_refuses_a_description_without_19_classes(tmp_path):
    make_cityscapes(tmp_path)
    path = tmp_path / "three.yaml"
    path.write_text(_description("index").replace("layout: generic", "layout: cityscapes"))
    with pytest.raises(SegNetError, match=f"{path}: `classes`: the cityscapes layout maps to Cityscapes' 19"):
        find_pairs(read_description(path), tmp_path)


@pytest.mark.slow
def test_prepare_writes_a_described_dataset_and_its_description(tmp_path, ray_local):
    expected = make_generic(tmp_path / "src", "color")
    description = read_description(tmp_path / "src" / "dataset.yaml")
    out = tmp_path / "shards"
    prepare(tmp_path / "src", out, shard_size=2, dataset=description)
    manifest = read_manifest(out)
    assert manifest["dataset"] == description.to_dict() and dataset_of(manifest) == description
    assert manifest["classes"] == list(COLOURS) and manifest["void"] == 3
    assert len(manifest["splits"]["train"]["class_pixel_counts"]) == 4
    with Image.open(out / "preview.png") as preview:  # data_prep/preview.py, beside the manifest
        assert 800 <= preview.width <= 4000 and 500 <= preview.height <= 3000
    for split, sizes in SIZES.items():
        samples = list(iter_samples(out, split))
        assert [s["label"].shape for s in samples] == sizes  # sizes differ within the dataset
        assert all(np.array_equal(s["label"], expected[s["name"]]) for s in samples)
    # bad input: one line naming the file, and no manifest
    _damage(tmp_path / "src", "mask colour missing from the map")
    with pytest.raises(SegNetError, match="colour \\(1, 2, 3\\) is missing from the colour map"):
        prepare(tmp_path / "src", out, shard_size=2, dataset=description)
    assert not (out / "manifest.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["mask colour missing from the map", "image without a mask"])
def test_prepare_cli_with_a_dataset_exits_2_with_one_line_and_writes_no_manifest(tmp_path, segnet_cli, how):
    """`segnet prepare --dataset FILE.yaml` on bad input: the file named on one line, nothing written."""
    make_generic(tmp_path / "data", "color")
    fragment = _damage(tmp_path / "data", how)
    out = tmp_path / "shards"
    data = tmp_path / "data"
    run = segnet_cli("prepare", "--source", data, "--dataset", data / "dataset.yaml", "--out", out)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1 and fragment in lines[0], run.stderr
    assert not (out / "manifest.json").exists()
