"""Camera-frame utilities strategies may use (frame differencing needs the same patch grid as the
model's visual tokens).

Images are resized to the patch grid the way MiniOFT preprocesses them (bilinear, antialiased),
then cut into ``patch x patch`` pixel blocks in raster order, so patch ``i`` of a view is visual
token ``view.start + i``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def patch_vectors(image: np.ndarray, rows: int, cols: int, patch: int = 8) -> torch.Tensor:
    """uint8 HxWx3 -> (rows*cols, patch*patch*3) raw pixel vectors (0..255)."""
    x = torch.as_tensor(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0
    if x.shape[-2:] != (rows * patch, cols * patch):
        x = F.interpolate(x, size=(rows * patch, cols * patch), mode="bilinear", antialias=True,
                          align_corners=False).clamp(0, 1)
    x = (x[0] * 255.0).round()
    x = x.unfold(1, patch, patch).unfold(2, patch, patch)  # (3, rows, cols, p, p)
    return x.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3 * patch * patch)


def patch_similarity(current: np.ndarray, previous: np.ndarray, rows: int, cols: int,
                     patch: int = 8) -> torch.Tensor:
    """Cosine similarity per patch between two frames of one camera, shape (rows*cols,)."""
    a, b = patch_vectors(current, rows, cols, patch), patch_vectors(previous, rows, cols, patch)
    return F.cosine_similarity(a, b, dim=-1, eps=1e-6)
