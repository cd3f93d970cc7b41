"""User-side check that the engine runs an OpenVLA-OFT checkpoint faithfully.

On a GPU with the real checkpoint and OFT's own code installed (the openvla-oft package, its
transformers fork, timm 0.9.x), ``prunebench check-oft CHECKPOINT --suite S --device cuda`` feeds the
same observations to

* the engine's dense layer loop on our adapter (what every strategy runs on), and
* the checkpoint's own ``OpenVLAForActionPrediction.predict_action`` (remote code, trust_remote_code)
  with OFT's own ``L1RegressionActionHead`` and ``ProprioProjector`` loaded from the .pt files and the
  norm stats of dataset_statistics.json, as OFT's evaluation loads them,

and reports the difference of the predicted action chunks in the head's normalised [-1, 1] units.
Both sides run in the same dtype (bfloat16 on CUDA, float32 on the CPU) and see the same resized,
centre-cropped frames and the same normalised proprio, so the difference measures the model, not the
image pipeline (which `docs/gpu.md` discusses).

``--reference adapter`` compares against the adapter's own ``LlamaModel.forward`` instead: it needs no
OFT code and is what the tests run on the tiny checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.strategy import Observation
from prunebench.models.openvla_oft import PROMPT, OpenVLAOFT
from prunebench.plugins.dense import Dense


def observations(n: int, suite: str | None, size: int = 256, seed: int = 0) -> tuple[list[Observation], str]:
    """The first frame of LIBERO tasks 0..n-1 (official init state 0) when LIBERO is installed and a
    suite is named; synthetic frames otherwise. Returns them and where they came from."""
    from prunebench.evaluation.libero_env import libero_available

    if suite and libero_available():
        from prunebench.evaluation.libero_env import LiberoEnv, tasks

        out = []
        for task in tasks(suite)[:n]:
            env = LiberoEnv(suite, task.task_id, camera_size=size)
            try:
                state = env.reset(0)
                out.append(Observation(images=env.render(), proprio=state.proprio, instruction=task.instruction))
            finally:
                env.close()
        return out, f"LIBERO {suite} tasks 0..{len(out) - 1}, init state 0, {size} px"
    from prunebench.evaluation.streams import SyntheticStream

    stream = SyntheticStream(n_queries=n, seed=seed, image_size=size)
    return [q.observation for q in stream], f"synthetic frames ({size} px, seed {seed})"


class OpenVLAReference:
    """The checkpoint's own predict_action, through OFT's released code, in the adapter's dtype."""

    def __init__(self, root: Path, model: OpenVLAOFT, device: str) -> None:
        try:
            from prismatic.models.action_heads import L1RegressionActionHead
            from prismatic.models.projectors import ProprioProjector
            from transformers import AutoModelForVision2Seq, AutoProcessor
        except ImportError as err:
            raise PrunebenchError(f"--reference openvla needs OpenVLA-OFT's code (pip install -e openvla-oft; "
                                  f"docs/gpu.md): {err}") from None
        from prunebench.models.oft_checkpoint import head_state_dict

        self.model, self.device, self.dtype = model, device, model.dtype
        self.vla = AutoModelForVision2Seq.from_pretrained(str(root), torch_dtype=self.dtype,
                                                          low_cpu_mem_usage=True, trust_remote_code=True).to(device)
        self.vla.vision_backbone.set_num_images_in_input(len(model.cfg.views))
        # as OFT's eval (experiments/robot/openvla_utils.py, _load_dataset_stats): fine-tuning's statistics
        # replace config.json's, which may be only the base model's
        stats = root / "dataset_statistics.json"
        if stats.is_file():
            self.vla.norm_stats = json.loads(stats.read_text())
        self.processor = AutoProcessor.from_pretrained(str(root), trust_remote_code=True)
        d = self.vla.llm_dim
        modules = {
            "action_head": L1RegressionActionHead(input_dim=d, hidden_dim=d, action_dim=model.cfg.action_dim),
            "proprio_projector": ProprioProjector(llm_dim=d, proprio_dim=model.cfg.proprio_dim)}
        for name, module in modules.items():
            module.load_state_dict(head_state_dict(root, name))
            module.to(device, self.dtype).eval()
        self.head, self.proprio_projector = modules["action_head"], modules["proprio_projector"]

    @torch.inference_mode()
    def __call__(self, obs: Observation) -> np.ndarray:
        from PIL import Image

        # the adapter's resized, centre-cropped frames (exact uint8 values) as the processor's input
        images = (self.model.preprocess_images(obs) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        frames = [Image.fromarray(image) for image in images]
        prompt = PROMPT.format(task=obs.instruction.lower())
        inputs = self.processor(prompt, frames[0])
        extra = [self.processor(prompt, f)["pixel_values"] for f in frames[1:]]  # wrist view(s)
        inputs["pixel_values"] = torch.cat([inputs["pixel_values"], *extra], dim=1)
        inputs = inputs.to(self.device, dtype=self.dtype)
        proprio = self.model.normalize_proprio(obs.proprio).numpy()
        actions, _ = self.vla.predict_action(**inputs, unnorm_key=self.model.unnorm_key, proprio=proprio,
                                             proprio_projector=self.proprio_projector, action_head=self.head,
                                             use_film=False)
        return self.model.normalize_q99(np.asarray(actions))


def check(checkpoint: str, *, suite: str | None, device: str, n: int, reference: str,
          tolerance: float, synthetic: bool = False, trust_remote_code: bool = False) -> dict:
    """Run both sides on ``n`` observations; the report has per-observation and overall max |diff|.
    ``reference="openvla"`` runs the checkpoint's own Python code, so it needs ``trust_remote_code``."""
    from prunebench.engine.loop import PruningEngine
    from prunebench.evaluation.versions import environment
    from prunebench.models import load_model
    from prunebench.models.oft_checkpoint import is_oft_checkpoint, resolve

    if reference == "openvla" and not trust_remote_code:  # refused before anything is loaded
        raise PrunebenchError("--reference openvla runs the checkpoint's own Python code "
                              "(trust_remote_code=True); pass --trust-remote-code to allow it, or use "
                              "--reference adapter")
    if not is_oft_checkpoint(checkpoint):
        raise PrunebenchError(f"checkpoint {checkpoint!r} is neither an OpenVLA-OFT directory nor a hub id")
    if reference == "openvla":
        print("note: --reference openvla runs the checkpoint's own Python code (trust_remote_code=True)",
              file=sys.stderr)
    model, info = load_model(checkpoint, suite=suite, device=device)
    engine, dense = PruningEngine(model), Dense()
    if reference == "openvla":
        ref = OpenVLAReference(resolve(checkpoint), model, device)
    else:
        ref = model.predict_normalized
    obs_list, source = observations(n, None if synthetic else suite)
    rows = []
    for i, obs in enumerate(obs_list):
        ours = engine.query(dense, obs).normalized
        theirs = ref(obs)
        diff = np.abs(ours - theirs)
        rows.append({"observation": i, "instruction": obs.instruction, "max_abs_diff": float(diff.max()),
                     "mean_abs_diff": float(diff.mean()),
                     "gripper_agrees": bool((_gripper(ours) == _gripper(theirs)).all())})
    worst = max(r["max_abs_diff"] for r in rows)
    return {"checkpoint": str(checkpoint), "reference": reference, "observations": source,
            "unnorm_key": model.unnorm_key, "dtype": info["dtype"], "device": device,
            "attention_backend": model.attn_implementation, "tolerance": tolerance,
            "max_abs_diff": worst, "passed": worst <= tolerance, "rows": rows,
            "environment": environment(str(engine.device))}


def _gripper(normalized: np.ndarray) -> np.ndarray:
    """The gripper decision of each step (the head predicts it in [0, 1]; OFT's eval splits at 0.5)."""
    return np.sign(normalized[:, -1] - 0.5)


def print_report(report: dict) -> None:
    print(f"{report['checkpoint']} ({report['unnorm_key']}, {report['dtype']} on {report['device']}, "
          f"{report['attention_backend']}) vs {report['reference']}, on {report['observations']}")
    print("obs  max|diff|  mean|diff|  gripper  instruction")
    for r in report["rows"]:
        print(f"{r['observation']:>3}  {r['max_abs_diff']:9.2e}  {r['mean_abs_diff']:10.2e}  "
              f"{'same' if r['gripper_agrees'] else 'DIFF':>7}  {r['instruction'][:50]}")
    verdict = "PASS" if report["passed"] else "FAIL"
    print(f"{verdict}: largest difference {report['max_abs_diff']:.2e} in normalised action units "
          f"(tolerance {report['tolerance']:.0e})")
