"""``prunebench suites``, ``demos`` and ``train``: LIBERO's tasks and the built-in policy's training."""

from __future__ import annotations

from pathlib import Path

from prunebench.cli.arguments import non_negative_int
from prunebench.contract.errors import PrunebenchError
from prunebench.runtime.outputs import OVERWRITE_HELP, claim


def cmd_suites(args) -> int:
    from prunebench.evaluation.libero_env import stock_max_steps, suite_names, tasks, unavailable

    names = [args.suite] if args.suite else suite_names()
    for name in names:
        if not args.suite and unavailable(name):  # listed with the reason; a named one is an error
            print(f"{name}  (unavailable: {unavailable(name)})")
            continue
        limit = stock_max_steps(name)
        listed = tasks(name)
        print(f"{name}  ({len(listed)} tasks, max steps {limit if limit else 'none: give --max-steps'})")
        if args.suite:
            for t in listed:
                print(f"  {t.task_id:>2}  {t.instruction}  ({t.n_init_states} init states)")
    return 0


def cmd_demos(args) -> int:
    from prunebench.training.demos import generate, is_dataset, load_demo_config

    cfg = load_demo_config(args.config, suite=args.suite, tasks=args.tasks, per_task=args.per_task,
                           noise=args.noise, render_every=args.render_every, workers=args.workers,
                           seed_offset=args.seed_offset, shuffle_fraction=args.shuffle_fraction)
    out = Path(args.output)
    # resumable: a dataset of ours is continued, but generate() writes config.json and
    # manifest.json, which would destroy a user's files of those names in any other folder
    if out.is_dir() and any(out.iterdir()) and not is_dataset(out):
        raise PrunebenchError(f"{out} is not empty and holds no demo dataset (no config.json from "
                              f"'prunebench demos'); give a new or empty --output")
    claim(out, "demos", True, directory=True)
    manifest = generate(cfg, out)
    for task, row in manifest["tasks"].items():
        print(f"task {task:>2}: {row['demos']} demos, {row['failed']} failed attempts")
    print(f"wrote {args.output}")
    return 0


def cmd_train(args) -> int:
    from prunebench.training.checkpoint import checkpoint_path
    from prunebench.training.train import load_train_config, main_log, train

    cfg = load_train_config(args.config, data=args.data, tasks=args.tasks, steps=args.steps,
                            seed=args.seed, batch_size=args.batch_size, threads=args.threads)
    ckpt = checkpoint_path(args.output)
    if ckpt.exists() and not (args.resume or args.overwrite):
        raise PrunebenchError(f"{ckpt} exists (an unfinished run of {args.output}); pass --resume to "
                              f"continue it or --overwrite to start over")
    # a resumed run writes over the output it wrote before
    output = claim(args.output, "policy", args.overwrite or args.resume, suffix=".safetensors")
    summary = train(cfg, output, log=main_log, resume=args.resume)
    print(f"trained {summary['parameters']:,} parameters on {summary['demos']} demos "
          f"({summary['frames']} frames) in {summary['train_minutes']:.1f} min; "
          f"final val L1 {summary['history'][-1]['val_l1']:.4f}")
    print(f"wrote {output}")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("suites", help="list LIBERO suites (with a name: its tasks)")
    p.add_argument("suite", nargs="?", help="a suite to list the tasks of")
    p.set_defaults(func=cmd_suites)

    p = sub.add_parser(
        "demos", help="generate scripted-expert demonstrations for training the built-in policy",
        description="A privileged-pose expert solves each task from initial states sampled by env seed "
                    "(never the official eval init states), with noise on the executed actions. One "
                    "file per demo: re-running resumes. Needs the libero extra.")
    p.add_argument("--config", help="DemoConfig file (YAML/JSON); flags override it")
    p.add_argument("--suite", help="LIBERO suite (default libero_object)")
    p.add_argument("--tasks", type=int, nargs="+", help="task ids (default: every task)")
    p.add_argument("--per-task", type=int, help="successful demos per task (default 40)")
    p.add_argument("--noise", type=float, help="std of the executed-action noise (default 0.3)")
    p.add_argument("--render-every", type=int, help="keep camera frames every k-th step (default 3)")
    p.add_argument("--workers", type=int, help="parallel processes (default 2)")
    p.add_argument("--seed-offset", type=int, help="shift the env seeds (a different dataset)")
    p.add_argument("--shuffle-fraction", type=float,
                   help="share of demos in which the floor scene's loose objects swap places first, so "
                        "that the policy must find the named object (libero_object; default 0)")
    p.add_argument("-o", "--output", default="data/demos/libero_object",
                   help="dataset directory: new, empty, or a dataset to resume (any other non-empty "
                        "directory is refused)")
    p.set_defaults(func=cmd_demos)

    p = sub.add_parser("train", help="train the built-in policy (MiniOFT) on a demo dataset",
                       description="L1 on 8-step action chunks with augmentation; reproducible "
                                   "from --seed. Writes one safetensors file with the normalisation, "
                                   "and at every evaluation replaces it and a checkpoint beside it "
                                   "(OUTPUT.ckpt), which --resume continues from; the checkpoint is "
                                   "removed once training completes.")
    p.add_argument("--config", help="TrainConfig file (YAML/JSON); flags override it")
    p.add_argument("--data", help="dataset directory from 'prunebench demos'")
    p.add_argument("--tasks", type=non_negative_int, nargs="+",
                   help="train on these tasks of the dataset only (default: all)")
    p.add_argument("--steps", type=int, help="optimiser steps (default 3000)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--threads", type=int, help="torch threads (default 2)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("-o", "--output", required=True,
                   help="weights file (.safetensors; an existing file is refused unless --overwrite or "
                        "--resume)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--overwrite", action="store_true",
                       help=OVERWRITE_HELP + "; an unfinished run's checkpoint is replaced too")
    again.add_argument("--resume", action="store_true",
                       help="continue the unfinished run of --output from OUTPUT.ckpt, with the same "
                            "config, to the same weights as a run never stopped")
    p.set_defaults(func=cmd_train)
