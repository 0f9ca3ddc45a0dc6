"""The one way saved weights are read: torch.load(weights_only=True), so a file can hold tensors and nothing
that runs. A pickle that asks for a function or class (os.system, a module) is refused in one line."""

import re

import torch

from segnet.errors import SegNetError


def load_tensors(source, name: str, device="cpu"):
    """Tensors (a state dict, or dicts and lists of tensors) from a path or file object; `name` is the file
    the error names."""
    try:
        return torch.load(source, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file or a pickle with code: one line, nothing run
        asked = re.search(r"GLOBAL ([\w.]+)", str(e))
        reason = f"it asks to import {asked[1]}" if asked else " ".join(str(e).split())[:300]
        raise SegNetError(f"{name} is not a file of plain tensors ({reason}): refusing to load it") from e
