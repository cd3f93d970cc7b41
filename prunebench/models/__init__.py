"""Models the engine can run: anything that implements :class:`prunebench.VLAModel`
(prunebench/contract/model.py), loaded by ``load_model`` through the model families registered with
the ``prunebench_register_models`` hook (registry.py). Built in (builtin.py): MiniOFT (mini_oft.py,
its files in mini_oft_io.py) and real OpenVLA-OFT checkpoints (openvla_oft.py with oft_modules.py
and oft_images.py, loaded by oft_checkpoint.py)."""

from __future__ import annotations

from prunebench.models.builtin import builtin_weights, shipped_suites
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig
from prunebench.models.registry import check_device, load_model, model_depth, model_device, model_families

__all__ = ["MiniOFT", "MiniOFTConfig", "builtin_weights", "shipped_suites", "check_device", "load_model",
           "model_depth", "model_device", "model_families"]
