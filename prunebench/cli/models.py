"""``prunebench check-oft``: the engine against an OpenVLA-OFT checkpoint's own actions."""

from __future__ import annotations

import json

from prunebench.cli.arguments import device_arg, positive_int
from prunebench.runtime.outputs import OVERWRITE_HELP, claim


def cmd_check_oft(args) -> int:
    from prunebench.evaluation.check_oft import check, print_report
    from prunebench.evaluation.results import write_text

    output = claim(args.output, "check_oft", args.overwrite) if args.output else None
    report = check(args.checkpoint, suite=args.suite, device=args.device, n=args.observations,
                   reference=args.reference, tolerance=args.tolerance, synthetic=args.synthetic,
                   trust_remote_code=args.trust_remote_code)
    print_report(report)
    if output:
        write_text(output, json.dumps(report, indent=2))
        print(f"wrote {output}")
    return 0 if report["passed"] else 1


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "check-oft", help="check that the engine reproduces an OpenVLA-OFT checkpoint's own actions",
        description="Runs the engine's dense layer loop and the checkpoint's own predict_action "
                    "(OpenVLA-OFT's released code, --reference openvla) on the same observations and "
                    "reports the largest difference of the predicted action chunks in the head's "
                    "normalised units. Exit status 1 when it exceeds --tolerance. See docs/gpu.md.")
    p.add_argument("checkpoint", help="checkpoint directory or hub id, e.g. "
                                      "moojink/openvla-7b-oft-finetuned-libero-object")
    p.add_argument("--suite", help="LIBERO suite: picks the norm stats and the observations (first "
                                   "frame of each task); without LIBERO, synthetic frames are used")
    p.add_argument("--device", type=device_arg, default="cuda", help="cuda (default) or cpu")
    p.add_argument("--observations", type=positive_int, default=8, help="how many observations (default 8)")
    p.add_argument("--synthetic", action="store_true", help="synthetic frames even when LIBERO is installed")
    p.add_argument("--reference", choices=["openvla", "adapter"], default="openvla",
                   help="openvla: the checkpoint's own remote code (default; needs --trust-remote-code); "
                        "adapter: our module's LlamaModel.forward (no OFT code needed)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow --reference openvla to run the Python code shipped with the checkpoint")
    p.add_argument("--tolerance", type=float, default=0.05,
                   help="largest accepted difference (default 0.05, for bfloat16 on CUDA, where "
                        "kernels differ; float32 on the CPU agrees far closer)")
    p.add_argument("-o", "--output", help="write the report as JSON (an existing file is refused "
                                          "unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)
    p.set_defaults(func=cmd_check_oft)
