"""A dataset described in one YAML file: its name, classes and colours, void, layout and split folders.

Shards store a class as its index 0..K-1 and void as K (the last index), whatever value the masks use; the
description says how the masks' values or colours map to those indices. The manifest's `dataset` key holds
`to_dict()`, the description as read.
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from segnet.errors import SegNetError

RGB = tuple[int, int, int]
LAYOUTS = ("generic", "cityscapes", "camvid")
MASKS = ("index", "color")
SPLIT_NAMES = ("train", "val", "test")  # train and val required, test optional
KEYS = ("name", "layout", "masks", "classes", "void", "void_color", "color_map", "splits")
MAX_CLASSES = 255  # void is stored as K in a uint8 label


@dataclass(frozen=True)
class DatasetDescription:
    name: str
    classes: tuple[str, ...]
    colors: tuple[RGB, ...]  # one per class: overlays, legends, and colour masks without a `color_map`
    layout: str = "generic"
    masks: str = "index"  # class-index PNGs, or RGB colour PNGs
    void: int | None = None  # the mask value that is ignored (index masks)
    void_color: RGB | None = None  # the mask colour that is ignored (colour masks)
    color_map: tuple[tuple[RGB, int], ...] | None = None  # mask colour -> class index, when not `colors`
    splits: tuple[tuple[str, str], ...] | None = (
        None  # split -> folder; None: train, val (and test if present)
    )
    source: str = field(default="", compare=False, repr=False)  # the file it was read from, for messages

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def void_index(self) -> int:
        """Where void goes in shards: the last index, K."""
        return len(self.classes)

    @property
    def palette(self) -> tuple[RGB, ...]:
        """K + 1 display colours, void last (its mask colour, else black)."""
        return (*self.colors, self.void_color or (0, 0, 0))

    def mask_colors(self) -> dict[RGB, int]:
        """Colour mask: RGB colour -> stored index, void colour -> K."""
        table = (
            dict(self.color_map) if self.color_map is not None else {c: i for i, c in enumerate(self.colors)}
        )
        if self.void_color is not None:
            table[self.void_color] = self.void_index
        return table

    def to_dict(self) -> dict:
        """The description in the YAML file's own keys (what the manifest's `dataset` holds)."""
        out = {
            "name": self.name,
            "layout": self.layout,
            "masks": self.masks,
            "classes": [
                {"name": n, "color": list(c)} for n, c in zip(self.classes, self.colors, strict=True)
            ],
        }
        if self.void is not None:
            out["void"] = self.void
        if self.void_color is not None:
            out["void_color"] = list(self.void_color)
        if self.color_map is not None:
            out["color_map"] = [{"color": list(c), "class": self.classes[i]} for c, i in self.color_map]
        if self.splits is not None:
            out["splits"] = dict(self.splits)
        return out

    @classmethod
    def from_dict(cls, data, source: str = "the dataset description") -> "DatasetDescription":
        """Checked: an unknown key, a wrong type or a class without a colour is one line naming `source`
        and the key."""
        bad = _complaint(source)
        if not isinstance(data, dict):
            raise SegNetError(f"{source}: expected a mapping with the keys {', '.join(KEYS)}, got {data!r}")
        unknown = [k for k in data if k not in KEYS]
        if unknown:
            raise SegNetError(f"{source}: unknown key `{unknown[0]}`; the keys are: {', '.join(KEYS)}")
        for key in ("name", "classes"):
            if key not in data:
                raise SegNetError(f"{source}: the key `{key}` is missing")
        name = data["name"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise bad("name", "a name of letters, digits, '.', '_' or '-'", name)
        layout, masks = data.get("layout", "generic"), data.get("masks", "index")
        if layout not in LAYOUTS:
            raise bad("layout", " or ".join(LAYOUTS), layout)
        if masks not in MASKS:
            raise bad("masks", " or ".join(MASKS), masks)
        names, colors = _classes(data["classes"], bad)
        void = data.get("void")
        if void is not None and (not _is_int(void) or not len(names) <= void <= 255):
            raise bad("void", f"a mask value {len(names)}..255 (0..{len(names) - 1} are the classes)", void)
        void_color = None if data.get("void_color") is None else _rgb(data["void_color"], "void_color", bad)
        color_map = None
        if data.get("color_map") is not None:
            color_map = _color_map(data["color_map"], names, void_color, bad)
        elif masks == "color" and void_color in colors:
            raise bad("void_color", "a colour that is no class's", list(void_color))
        splits = None if data.get("splits") is None else _splits(data["splits"], bad)
        return cls(name, names, colors, layout, masks, void, void_color, color_map, splits, source=source)


def _complaint(source: str):
    def bad(key: str, expected: str, got=None) -> SegNetError:
        shown = "" if got is None else f", got {got!r}"
        return SegNetError(f"{source}: `{key}`: expected {expected}{shown}")

    return bad


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rgb(value, key: str, bad) -> RGB:
    if not isinstance(value, list) or len(value) != 3 or not all(_is_int(v) and 0 <= v <= 255 for v in value):
        raise bad(key, "[r, g, b] of 0..255", value)
    return (value[0], value[1], value[2])


def _classes(entries, bad) -> tuple[tuple[str, ...], tuple[RGB, ...]]:
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_CLASSES:
        raise bad("classes", f"a list of 1 to {MAX_CLASSES} {{name, color: [r, g, b]}}", entries)
    names, colors = [], []
    for i, entry in enumerate(entries):
        key = f"classes[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"name", "color"}:
            raise bad(key, "{name, color: [r, g, b]} (every class has a colour)", entry)
        if not isinstance(entry["name"], str) or not entry["name"] or entry["name"] in names:
            raise bad(f"{key}.name", "a class name not used before", entry["name"])
        colour = _rgb(entry["color"], f"{key}.color", bad)
        if colour in colors:
            raise bad(f"{key}.color", f"a colour no other class has ({names[colors.index(colour)]} has it)")
        names.append(entry["name"])
        colors.append(colour)
    return tuple(names), tuple(colors)


def _color_map(entries, names, void_color, bad) -> tuple[tuple[RGB, int], ...]:
    if not isinstance(entries, list) or not entries:
        raise bad("color_map", "a list of {color: [r, g, b], class: NAME}", entries)
    color_map, seen = [], {void_color}
    for i, entry in enumerate(entries):
        key = f"color_map[{i}]"
        if not isinstance(entry, dict) or set(entry) != {"color", "class"}:
            raise bad(key, "{color: [r, g, b], class: NAME}", entry)
        if entry["class"] not in names:
            raise bad(f"{key}.class", f"one of the classes ({', '.join(names)})", entry["class"])
        colour = _rgb(entry["color"], f"{key}.color", bad)
        if colour in seen:
            raise bad(f"{key}.color", "a colour not mapped before (nor the void colour)", list(colour))
        seen.add(colour)
        color_map.append((colour, names.index(entry["class"])))
    return tuple(color_map)


def _splits(splits, bad) -> tuple[tuple[str, str], ...]:
    if not isinstance(splits, dict) or not {"train", "val"} <= set(splits) <= set(SPLIT_NAMES):
        raise bad("splits", "a mapping of train, val (and optionally test) to folders", splits)
    for split, folder in splits.items():
        if not isinstance(folder, str) or not folder or folder[0] == "/" or ".." in Path(folder).parts:
            raise bad(f"splits.{split}", "a folder name inside the source", folder)
    return tuple((s, splits[s]) for s in SPLIT_NAMES if s in splits)


def read_description(path: str | Path) -> DatasetDescription:
    """A dataset description from its YAML file (`segnet prepare --dataset FILE.yaml`)."""
    import yaml  # here: the device-only path (`make gpu-check`) reads no YAML

    path = Path(path)
    if not path.is_file():
        raise SegNetError(f"dataset description {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SegNetError(f"{path} is not valid YAML ({' '.join(str(e).split())})") from e
    return DatasetDescription.from_dict(data, source=str(path))
