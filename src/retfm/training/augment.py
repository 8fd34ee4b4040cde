"""Pre-training augmentations, batched on the tensor's device, straight from packed uint8 images.

No image is decoded or converted to PIL in the loop: a batch of packed ``(B, H, W, 3)`` uint8
images becomes crops with one ``grid_sample`` per view, and the photometric augmentations are
tensor arithmetic. Every random draw comes from the global torch CPU generator, so a
checkpoint's RNG state reproduces the views of a resumed run exactly.

- MAE (RETFound): one random resized crop at the input size and a horizontal flip.
- DINOv2: multi-crop (2 global + N local views) with the DINO photometric recipe: colour jitter
  (brightness 0.4, contrast 0.4, saturation 0.2; p 0.8), grayscale (p 0.2), Gaussian blur
  (p 1.0 / 0.1 / 0.5 for global 1 / global 2 / local views) and solarisation (p 0.2, global 2).
  Departures from torchvision's pipeline: no hue jitter (a hue rotation of a fundus photograph
  makes no retina), the jitter factors are applied in a fixed order (torchvision shuffles it)
  and the blur's sigma is scaled to the crop (torchvision's 9-pixel kernel is for 224 px).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from retfm.models.encoder import Preprocessing


def random_resized_crop_flip(
    x: torch.Tensor,
    *,
    size: int | None = None,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, size, size) (``size`` defaults to H).

    Each sample gets a crop of area fraction ``U(scale)`` and aspect ``exp(U(log ratio))``
    (clamped to the image rather than re-drawn, torchvision re-draws up to 10 times), resized to
    ``size`` with bilinear sampling, and a horizontal flip with probability 1/2. One
    ``grid_sample`` does crop, resize and flip for the whole batch.
    """
    b, c, h, _ = x.shape
    out = size or h
    area = torch.empty(b).uniform_(*scale)
    aspect = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1])).exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # fractions of the side
    hh = (area / aspect).sqrt().clamp(max=1.0)
    cx = torch.rand(b) * (1 - w) + w / 2
    cy = torch.rand(b) * (1 - hh) + hh / 2
    flip = torch.where(torch.rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = hh
    theta[:, 1, 2] = 2 * cy - 1
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [b, c, out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def mae_batch(images_uint8: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> augmented, normalised (B, 3, H, W) float32 (MAE's view).

    Normalising before the crop is the same as after: bilinear resampling is a convex
    combination of pixels and normalisation is a per-channel affine map, so they commute.
    """
    return random_resized_crop_flip(prep.normalise(images_uint8))


# --------------------------------------------------------------------- photometric (DINO)
_LUMA = (0.299, 0.587, 0.114)


def _per_sample(b: int, p: float, device: torch.device) -> torch.Tensor:
    """(B, 1, 1, 1) float mask: 1 where a sample gets the augmentation (probability ``p``)."""
    return (torch.rand(b) < p).float().view(b, 1, 1, 1).to(device)


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def colour_jitter(
    x: torch.Tensor,
    *,
    p: float = 0.8,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.2,
) -> torch.Tensor:
    """x in [0, 1], (B, 3, H, W): brightness, contrast and saturation factors drawn from
    ``U(1 - s, 1 + s)`` per sample, applied (in that order) to a share ``p`` of the batch."""
    b = x.shape[0]

    def factor(s: float) -> torch.Tensor:
        return torch.empty(b).uniform_(1 - s, 1 + s).view(b, 1, 1, 1).to(x)

    on = _per_sample(b, p, x.device)
    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    y = (x * fb).clamp(0, 1)
    mean = _gray(y).mean(dim=(2, 3), keepdim=True)
    y = ((y - mean) * fc + mean).clamp(0, 1)
    g = _gray(y)
    y = ((y - g) * fs + g).clamp(0, 1)
    return on * y + (1 - on) * x


def random_grayscale(x: torch.Tensor, p: float = 0.2) -> torch.Tensor:
    on = _per_sample(x.shape[0], p, x.device)
    return on * _gray(x).expand_as(x) + (1 - on) * x


def gaussian_blur(
    x: torch.Tensor, p: float, sigma: tuple[float, float] = (0.1, 2.0), ref_size: int = 224
) -> torch.Tensor:
    """Blur a share ``p`` of the batch with sigma ``U(sigma)`` (in pixels of a ``ref_size`` crop,
    scaled to this crop's size): one separable grouped convolution for the whole batch."""
    b, c, h, w = x.shape
    on = _per_sample(b, p, x.device)
    s = torch.empty(b).uniform_(*sigma) * (h / ref_size)
    radius = max(1, math.ceil(3 * sigma[1] * h / ref_size))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-(t.view(1, -1) ** 2) / (2 * s.clamp(min=1e-3).view(-1, 1).to(x.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0).to(x.device)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(b * c, 1, 1, -1),
                 groups=b * c)  # fmt: skip
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(b * c, 1, -1, 1),
                 groups=b * c)  # fmt: skip
    return on * y.view(b, c, h, w) + (1 - on) * x


def solarize(x: torch.Tensor, p: float, threshold: float = 0.5) -> torch.Tensor:
    on = _per_sample(x.shape[0], p, x.device)
    return on * torch.where(x >= threshold, 1 - x, x) + (1 - on) * x


def _normalise(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    mean = torch.tensor(prep.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def multi_crop(
    images_uint8: torch.Tensor,
    prep: Preprocessing,
    *,
    local_crops: int,
    local_size: int,
    global_scale: tuple[float, float],
    local_scale: tuple[float, float],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H, W, 3) uint8 -> global views (2B, 3, H, H) and local views (N*B, 3, s, s)
    (``None`` when N = 0), normalised; view-major (view 0 of every image, then view 1, ...)."""
    x = images_uint8.permute(0, 3, 1, 2).float().div_(255.0)
    views = []
    for i, (blur, sol) in enumerate(((1.0, 0.0), (0.1, 0.2))):
        v = random_resized_crop_flip(x, scale=global_scale)
        v = random_grayscale(colour_jitter(v))
        v = gaussian_blur(v, blur)
        views.append(solarize(v, sol) if i == 1 else v)
    glob = _normalise(torch.cat(views), prep)
    if local_crops == 0:
        return glob, None
    locs = []
    for _ in range(local_crops):
        v = random_resized_crop_flip(x, size=local_size, scale=local_scale)
        locs.append(gaussian_blur(random_grayscale(colour_jitter(v)), 0.5))
    return glob, _normalise(torch.cat(locs), prep)
