"""OpenVLA-OFT's image pipeline for LIBERO frames: what its evaluation does to a camera frame before
the vision backbone (resize as the RLDS training data was, then a centre crop)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

CROP_AREA = 0.9  # training used random crops of 90 % area; evaluation centre-crops the same box


def resize_like_rlds(image: np.ndarray, size: int) -> np.ndarray:
    """OFT's resize_image_for_policy: JPEG round trip, then Lanczos-3 with antialiasing, to uint8.

    OFT does this with TensorFlow; we use PIL (JPEG quality 95 as TF's default, LANCZOS = Lanczos-3
    with antialiasing). On real LIBERO frames the result is up to 17 grey levels from TF's (1.1 on
    average), almost all of it from the two JPEG codecs (docs/gpu.md); LIBERO frames must be resized
    (256 -> 224)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    decoded = Image.open(buffer).convert("RGB")
    return np.asarray(decoded.resize((size, size), Image.LANCZOS))


def center_crop(image: np.ndarray, area: float = CROP_AREA) -> np.ndarray:
    """TensorFlow's crop_and_resize of the central box of side sqrt(area), bilinear, back to the same
    size, through float [0, 1], then convert_image_dtype back to uint8 (x * 255.5, truncated)."""
    h, w = image.shape[:2]
    side = math.sqrt(area)
    lo, hi = (1 - side) / 2, (1 + side) / 2
    x = torch.tensor(image, dtype=torch.float32) / 255.0

    def sample_axis(n: int):  # TF: y1*(n-1) + i*(y2-y1)*(n-1)/(crop-1), and crop == n here
        coords = lo * (n - 1) + torch.arange(n, dtype=torch.float64) * (hi - lo)
        low = coords.floor().long().clamp(0, n - 1)
        high = coords.ceil().long().clamp(0, n - 1)
        return low, high, (coords - coords.floor()).float()

    top, bottom, fy = sample_axis(h)
    left, right, fx = sample_axis(w)
    rows_top, rows_bottom = x[top], x[bottom]
    fx = fx[None, :, None]
    upper = rows_top[:, left] + (rows_top[:, right] - rows_top[:, left]) * fx
    lower = rows_bottom[:, left] + (rows_bottom[:, right] - rows_bottom[:, left]) * fx
    out = (upper + (lower - upper) * fy[:, None, None]).clamp(0, 1)
    return (out * 255.5).to(torch.uint8).numpy()


def oft_frame(image: np.ndarray, size: int) -> np.ndarray:
    """A camera frame (uint8 HxWx3, already rotated 180 degrees like OFT's get_libero_image) as the
    policy sees it: resized to ``size`` if needed, then centre-cropped (center_crop=True)."""
    if image.shape[0] != size or image.shape[1] != size:
        image = resize_like_rlds(image, size)
    return center_crop(image)
