"""Raw patch pixels of camera frames on the model's own patch grid (``QueryContext.patch_pixels``
and the ``PIXELS`` signal): what pixel-based strategies such as SpecPrune-VLA compare across frames."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from prunebench.contract.strategy import Observation


def patch_pixels_of(model, obs: Observation,
                    current: torch.Tensor) -> Callable[[dict[str, np.ndarray]], torch.Tensor]:
    """``QueryContext.patch_pixels`` of one query: a frame through the model's own preprocessing
    (``preprocess_images``) and patch grid (``patch_pixels``); the current frame reuses its
    preprocessed ``current`` images. Memoised per frame object for the query."""
    memo: dict[int, tuple[dict, torch.Tensor]] = {}

    def patch_pixels(images: dict[str, np.ndarray]) -> torch.Tensor:
        hit = memo.get(id(images))
        if hit is not None and hit[0] is images:
            return hit[1]
        if images is obs.images:
            pre = current
        else:
            pre = model.preprocess_images(Observation(images, obs.proprio, obs.instruction))
        value = model.patch_pixels(pre)
        memo[id(images)] = (images, value)
        return value

    return patch_pixels
