"""CamVid, the built-in dataset: its description (the SegNet labels' 11 classes, their display colours, void
11, and the original release's 32 colours grouped into the 11), read by today's readers in both layouts."""

from pathlib import Path

from data_prep import camvid
from data_prep.datasets import pairs
from data_prep.datasets.description import DatasetDescription

# The SegNet CamVid palette (Sky .. Bicyclist); void black.
CAMVID_COLORS = {
    "Sky": [128, 128, 128],
    "Building": [128, 0, 0],
    "Pole": [192, 192, 128],
    "Road": [128, 64, 128],
    "Pavement": [60, 40, 222],
    "Tree": [128, 128, 0],
    "SignSymbol": [192, 128, 128],
    "Fence": [64, 64, 128],
    "Car": [64, 0, 128],
    "Pedestrian": [64, 64, 0],
    "Bicyclist": [0, 128, 192],
}
CAMVID_VOID = 11  # "Unlabelled" in the SegNet labels
NAMES = list(CAMVID_COLORS)
CAMVID = DatasetDescription.from_dict(
    {
        "name": "camvid",
        "layout": "camvid",
        "masks": "index",
        "classes": [{"name": n, "color": c} for n, c in CAMVID_COLORS.items()],
        "void": CAMVID_VOID,
        "void_color": [0, 0, 0],
        "color_map": [
            {"color": list(rgb), "class": NAMES[i]}
            for rgb, i in camvid.CAMVID32_TO_11.items()
            if i != CAMVID_VOID
        ],
        "splits": {s: s for s in camvid.SPLITS},
    },
    source="the built-in CamVid description",
)


def find_pairs(description: DatasetDescription, root: Path, limit: int | None) -> dict[str, list[pairs.Pair]]:
    """SegNet's layout (`SPLIT/`, `SPLITannot/`) or the original release's (`SPLIT_labels/NAME_L.png`)."""
    return camvid.find_pairs(root, limit, pairs.split_folders(description, root))


def load_pair(description: DatasetDescription, pair: pairs.Pair) -> dict:
    """CamVid itself through today's reader (its checks and messages); another class table in CamVid's
    layout through the description."""
    if description == CAMVID:
        return camvid.load_pair(pair)
    return pairs.load_pair(description, pair)
