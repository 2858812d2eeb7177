"""utils/heif_planes.py is an accelerator that may switch itself off (no usable libheif binding): then
phone photos decode through pillow-heif's RGB, correctly but ~15 % slower, and tests/test_heif_planes.py
skips. This module does not skip: with the pillow-heif that requirements.txt pins, the fast path must be
on, so an upgrade that silently disables it fails here (then fix the binding for the new libheif, or
keep the previous pin)."""
import importlib.metadata
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def pinned_pillow_heif() -> str:
    m = re.search(r"^pillow-heif==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert m, "requirements.txt must pin pillow-heif (the planes binding is checked against that version)"
    return m.group(1)


def test_the_pinned_pillow_heif_is_installed():
    assert importlib.metadata.version("pillow-heif") == pinned_pillow_heif()


def test_the_planes_fast_path_is_active_with_the_pinned_pillow_heif():
    import pillow_heif

    from utils import heif_planes
    from utils.images import decode_reduced
    assert heif_planes.libheif() is not None, (
        f"utils/heif_planes found no usable libheif binding with pillow-heif {pinned_pillow_heif()} "
        f"(libheif {pillow_heif.libheif_version()}): HEIC uploads now take the slower pillow-heif RGB path")
    rng = np.random.default_rng(0)
    buf = pillow_heif.from_pillow(Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)))
    out = io.BytesIO()
    buf.save(out, quality=80)
    reduced = decode_reduced(out.getvalue(), "p.heic", max_pixels=10**8, min_side=200)
    assert isinstance(reduced._full, heif_planes.Planes), "decode_reduced did not take the planes path"


@pytest.mark.parametrize("module", ["utils/heif_planes.py"])
def test_heif_planes_imports_no_private_name_of_images(module):
    import ast
    tree = ast.parse((ROOT / module).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "utils.images":
            assert not [a.name for a in node.names if a.name.startswith("_")], ast.dump(node)
