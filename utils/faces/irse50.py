"""IR-SE50 ArcFace (facexlib's ``recognition_arcface_ir_se50.pth``), written in torch here because facexlib
does not import beside this project's CPU torch (it reaches for torchvision).

InfiniteYou's projection was trained on this network's 512-d space, not on InsightFace's glintr100: the
reference code aligns a 112 px chip with InsightFace's ``norm_crop`` from the 5 detected key points, keeps
it in **BGR** order (it aligns the OpenCV image), scales it to [-1, 1] and takes the L2-normalised output.

The module tree mirrors facexlib's ``Backbone(50, mode="ir_se")`` so the published file loads with
``strict=True`` under its own key names:

* ``input_layer``: Conv 3x3 (3 -> 64, no bias) . BatchNorm2d . PReLU
* ``body.N``: bottleneck_IR_SE units, stages of (64, 3), (128, 4), (256, 14), (512, 3), the first unit of each
  stage with stride 2; ``shortcut_layer`` is a 1x1 max-pool (a stride-2 subsample) when the width stays,
  else ``0`` Conv 1x1 + ``1`` BatchNorm2d; ``res_layer``: ``0`` BN . ``1`` Conv 3x3 . ``2`` PReLU . ``3`` Conv 3x3
  (stride) . ``4`` BN . ``5`` SE (``fc1``/``fc2``: 1x1 convs without bias, reduction 16)
* ``output_layer``: ``0`` BatchNorm2d . ``1`` Dropout . ``2`` Flatten . ``3`` Linear(512 x 7 x 7 -> 512) .
  ``4`` BatchNorm1d; then the L2 norm.

``widths`` / ``units`` are parameters only so the tiny stand-in (utils/models/tiny_infiniteyou.py) can be a
smaller network of the same layout; the embedding stays 512-d and the input 112 px.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

CHIP = 112
EMBED_DIM = 512
WIDTHS = (64, 128, 256, 512)
UNITS = (3, 4, 14, 3)
SE_REDUCTION = 16
WEIGHT_FILE = "recognition_arcface_ir_se50.pth"


@functools.cache
def _classes():
    """The torch classes, built on first use (nothing heavy at import)."""
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, channels: int) -> None:
            super().__init__()
            self.fc1 = nn.Conv2d(channels, max(1, channels // SE_REDUCTION), 1, bias=False)
            self.fc2 = nn.Conv2d(max(1, channels // SE_REDUCTION), channels, 1, bias=False)

        def forward(self, x):
            w = x.mean(dim=(2, 3), keepdim=True)
            return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(w))))

    class Unit(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.shortcut_layer = (nn.MaxPool2d(1, stride) if cin == cout else
                                   nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))
            self.res_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, 1, 1, bias=False),
                                           nn.PReLU(cout), nn.Conv2d(cout, cout, 3, stride, 1, bias=False),
                                           nn.BatchNorm2d(cout), SE(cout))

        def forward(self, x):
            return self.res_layer(x) + self.shortcut_layer(x)

    class IRSE(nn.Module):
        def __init__(self, widths: Sequence[int], units: Sequence[int]) -> None:
            super().__init__()
            self.input_layer = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                             nn.BatchNorm2d(widths[0]), nn.PReLU(widths[0]))
            body, cin = [], widths[0]
            for width, n in zip(widths, units):
                body += [Unit(cin, width, 2)] + [Unit(width, width, 1) for _ in range(n - 1)]
                cin = width
            self.body = nn.Sequential(*body)
            side = CHIP // 2 ** len(widths)
            self.output_layer = nn.Sequential(nn.BatchNorm2d(cin), nn.Dropout(0.0), nn.Flatten(),
                                              nn.Linear(cin * side * side, EMBED_DIM), nn.BatchNorm1d(EMBED_DIM))

        def forward(self, x):
            y = self.output_layer(self.body(self.input_layer(x)))
            return y / y.norm(dim=1, keepdim=True)

    return IRSE


def build(widths: Sequence[int] = WIDTHS, units: Sequence[int] = UNITS):
    """An IR-SE network in eval mode, randomly initialised."""
    return _classes()(tuple(widths), tuple(units)).eval()


def shape_from_state(state: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(widths, units) of a state dict in this layout: a stage starts at unit 0 and wherever the width
    changes (stage widths grow; published file: (64, 128, 256, 512), (3, 4, 14, 3))."""
    n = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("body."))
    widths: list[int] = []
    units: list[int] = []
    for i in range(n):
        w = int(state[f"body.{i}.res_layer.1.weight"].shape[0])
        if not widths or w != widths[-1]:
            widths.append(w)
            units.append(0)
        units[-1] += 1
    return tuple(widths), tuple(units)


def load(path, device: str = "cpu", dtype=None):
    """The network of a facexlib weight file (a plain state dict), strict; the file's own widths/units."""
    import torch
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "input_layer.0.weight" not in state:
        raise ValueError("not an IR-SE ArcFace state dict (no input_layer.0.weight)")
    widths, units = shape_from_state(state)
    net = build(widths, units)
    net.load_state_dict(state, strict=True)
    return net.to(device=device, dtype=dtype or torch.float32).eval()


def chip(crop_rgb: np.ndarray, kps: Any) -> np.ndarray:
    """The 112 px ArcFace chip of a face (InsightFace's ``norm_crop`` on its 5 key points), BGR uint8."""
    from insightface.utils import face_align
    bgr = np.ascontiguousarray(np.asarray(crop_rgb)[:, :, ::-1])
    return face_align.norm_crop(bgr, landmark=np.asarray(kps, dtype=np.float64).reshape(5, 2), image_size=CHIP)


def embed(net, chips: Sequence[np.ndarray]) -> np.ndarray:
    """[N, 512] unit vectors of BGR uint8 chips, as the reference code feeds them: /255, then 2x - 1."""
    import torch
    x = torch.from_numpy(np.stack([np.asarray(c) for c in chips])).permute(0, 3, 1, 2).float() / 255.0
    p = next(net.parameters())
    with torch.inference_mode():
        out = net((2 * x - 1).to(device=p.device, dtype=p.dtype))
    return out.float().cpu().numpy()
