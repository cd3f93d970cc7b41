"""Text -> vision attention of the built-in policy for two instructions in the same LIBERO scene.

    python docs/figures/attention_figure.py [--suite libero_object --task 0 --init-state 0]

Renders one official initial state (after the 10 wait steps), then asks the policy with the task's
own instruction and with the instruction naming another object in the same scene. For each, the
task words' attention to every visual token (softmax over all keys, averaged over heads, rows and
layers; prunebench.engine.signals) is drawn over both camera views. Writes
docs/figures/attention_two_instructions.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from prunebench.contract.strategy import Observation  # noqa: E402
from prunebench.engine.signals import attention_to_visual  # noqa: E402
from prunebench.evaluation.libero_env import WAIT_ACTION, WAIT_STEPS, LiberoEnv, tasks  # noqa: E402
from prunebench.models import load_model  # noqa: E402

OUT = Path(__file__).with_name("attention_two_instructions.png")


@torch.inference_mode()
def text_attention(model, obs: Observation) -> np.ndarray:
    """(views, grid, grid) attention of the instruction's task words, averaged over layers."""
    enc = model.encode(obs)
    out = model.llm(inputs_embeds=enc.embeds, output_hidden_states=True)
    positions = torch.arange(enc.embeds.shape[1])[None]
    maps = []
    for layer, h in zip(model.llm.layers, out.hidden_states):
        cos, sin = model.llm.rotary_emb(h, positions)
        maps.append(attention_to_visual(layer, h, cos, sin, enc.layout, ["text"])["text"])
    g = model.cfg.grid
    return torch.stack(maps).mean(0).reshape(len(model.cfg.views), g, g).numpy()


def other_instruction(suite: str, task_id: int, env: LiberoEnv) -> str:
    """The instruction of another task whose object is also in this scene."""
    for t in tasks(suite):
        if t.task_id == task_id:
            continue
        obj = t.instruction.split("pick up the ")[-1].split(" and place")[0].replace(" ", "_")
        if f"{obj}_1_pos" in env.observation:
            return t.instruction
    raise SystemExit("no other task's object is in this scene")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="libero_object")
    parser.add_argument("--task", type=int, default=0)
    parser.add_argument("--init-state", type=int, default=0)
    parser.add_argument("--model", help="MiniOFT safetensors (default: the shipped policy)")
    parser.add_argument("--output", default=str(OUT))
    args = parser.parse_args()

    model, info = load_model(args.model)
    env = LiberoEnv(args.suite, args.task, render_quality="fast", hard_reset=False)
    state = env.reset(args.init_state)
    for _ in range(WAIT_STEPS):
        state = env.step(WAIT_ACTION)
    images = env.render()
    instructions = [env.task.instruction, other_instruction(args.suite, args.task, env)]
    views = model.cfg.views
    maps = [text_attention(model, Observation(images, state.proprio, text)) for text in instructions]
    rows = [(f'"{text.split(" and place")[0]}"', att, "magma") for text, att in zip(instructions, maps)]
    rows.append(("first minus second (red: more for the first)", maps[0] - maps[1], "coolwarm"))
    fig, axes = plt.subplots(len(rows), len(views), figsize=(4.2 * len(views), 4.2 * len(rows)))
    for row, (title, att, cmap) in enumerate(rows):
        for col, view in enumerate(views):
            ax = axes[row, col]
            ax.imshow(images[view])
            size = images[view].shape[0]
            lim = np.abs(att[col]).max() if cmap == "coolwarm" else None
            ax.imshow(att[col], cmap=cmap, alpha=0.55, extent=(0, size, size, 0), interpolation="nearest",
                      vmin=-lim if lim else None, vmax=lim)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{view}: {title}", fontsize=9)
    fig.suptitle(f"Task-word attention to visual tokens (mean over layers and heads)\n"
                 f"{args.suite} task {args.task}, official init state {args.init_state}; "
                 f"policy {Path(info['source']).name}", fontsize=11)
    fig.tight_layout()
    fig.savefig(args.output, dpi=110)
    print(f"wrote {args.output}")
    env.close()


if __name__ == "__main__":
    main()
