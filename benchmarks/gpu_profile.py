"""Where a GPU query's time goes: kernel time against wall time, launches and host waits per query.

The OFT-7B-shaped model of ``gpu_oft7b.py`` (random bfloat16 weights), each strategy at its paper
budget after warm-up queries, profiled with ``torch.profiler`` over a few queries:

* wall ms: the query as the caller sees it (ends with a device synchronisation);
* kernel ms: the GPU's busy time (sum of its kernels, memsets and copies, each counted once);
  wall - kernel is time the GPU waited for the host (Python, launches, host-side scoring);
* launches and waits: kernel launches and host-device synchronisations (explicit ones and
  device-to-host copies) per query;
* the dense query's vision stage split into the image pipeline on the host and the towers.

    python benchmarks/gpu_profile.py                    # on the GPU, writes results/gpu_profile.json
    python benchmarks/gpu_profile.py --smoke            # toy width on the CPU (checks the script)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from gpu_oft7b import INSTRUCTION, OVERRIDES, oft7b
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation.results import write_text
from prunebench.evaluation.runner import StreamRunner
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.versions import environment
from prunebench.models.oft_tiny import build_tiny_oft
from prunebench.plugins.dense import DENSE
from prunebench.plugins.manager import MANAGER

DEFAULT = [DENSE, "random", "fastv", "vla-pruner", "specprune-vla", "tome", "vla-cache", "sparsevlm"]
WAITS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def profile_strategy(engine, name: str, items, warmup: int, device: str) -> dict:
    strategy = MANAGER.create(name, OVERRIDES.get(name, {}))
    runner = StreamRunner(engine, strategy)
    runner.start(INSTRUCTION)
    for item in items[:warmup]:
        runner.step(item)
    timed = items[warmup:]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    walls = []
    with profile(activities=activities) as prof:
        for item in timed:
            sync(device)
            t0 = time.perf_counter()
            runner.step(item)
            sync(device)
            walls.append((time.perf_counter() - t0) * 1e3)
    n = len(timed)
    events = prof.key_averages()
    # device-side events only: an aten op's self device time repeats its kernels' time
    on_device = [e for e in events if e.device_type == DeviceType.CUDA]
    kernel_us = sum(e.self_device_time_total for e in on_device)
    per_query = lambda names: sum(e.count for e in events if e.key in names) / n  # noqa: E731
    waits_ms = sum(e.self_cpu_time_total for e in events if e.key in WAITS) / n / 1e3
    host_copies = sum(e.count for e in events if e.key == "cudaMemcpyAsync") / n
    top = sorted((e for e in events if not e.key.startswith("cuda")), key=lambda e: -e.self_cpu_time_total)[:8]
    kernels = sorted(on_device, key=lambda e: -e.self_device_time_total)[:12]
    return {"strategy": name, "wall_ms": statistics.median(walls), "kernel_ms": kernel_us / n / 1e3,
            "launches": per_query(LAUNCHES), "syncs": per_query(WAITS), "copies": host_copies,
            "sync_wait_ms": waits_ms,
            "top_host_ops": [(e.key, round(e.self_cpu_time_total / n / 1e3, 3), e.count // n) for e in top],
            "top_device_ops": [(e.key[:90], round(e.self_device_time_total / n / 1e3, 3), e.count // n)
                               for e in kernels]}


def vision_split(model, item, device: str, reps: int = 10) -> dict:
    """Dense vision stage: host image pipeline vs towers + projector (synchronised), medians."""
    obs = item.observation
    host, towers = [], []
    with torch.inference_mode():
        for _ in range(reps):
            t0 = time.perf_counter()
            pixels = model.pixel_values(model.preprocess_images(obs))
            sync(device)
            t1 = time.perf_counter()
            model.projector(model.vision_backbone(pixels))
            sync(device)
            host.append((t1 - t0) * 1e3)
            towers.append((time.perf_counter() - t1) * 1e3)
    return {"image_pipeline_ms": statistics.median(host), "towers_projector_ms": statistics.median(towers)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=6, help="profiled queries per strategy")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--strategies", nargs="*", default=DEFAULT)
    parser.add_argument("--smoke", action="store_true", help="toy-width model on the CPU (checks the script)")
    parser.add_argument("--out", default="benchmarks/results/gpu_profile.json")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if not args.smoke and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --smoke", file=sys.stderr)
        return 2
    model = build_tiny_oft(seed=0) if args.smoke else oft7b(device, "sdpa")
    engine = PruningEngine(model)
    items = list(SyntheticStream(n_queries=args.warmup + args.queries, image_size=256, instruction=INSTRUCTION))
    rows = [profile_strategy(engine, n, items, args.warmup, device) for n in args.strategies]
    report = {"command": " ".join([sys.executable, *sys.argv]),
              "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
              "queries": args.queries, "warmup": args.warmup, "environment": environment(str(engine.device)),
              "rows": rows, "vision": vision_split(model, items[0], device)}  # on the warm model
    print(f"\n{report['device']}, under the profiler: per query, medians of wall, means of the rest")
    print(f"{'strategy':14} {'wall ms':>8} {'kernel ms':>9} {'GPU busy':>8} {'launches':>8} "
          f"{'syncs':>6} {'copies':>6} {'sync wait ms':>12}")
    for r in rows:
        print(f"{r['strategy']:14} {r['wall_ms']:8.2f} {r['kernel_ms']:9.2f} "
              f"{r['kernel_ms'] / r['wall_ms']:8.0%} {r['launches']:8.0f} {r['syncs']:6.1f} "
              f"{r['copies']:6.1f} {r['sync_wait_ms']:12.2f}")
    print(f"\ndense vision: image pipeline {report['vision']['image_pipeline_ms']:.2f} ms (host), "
          f"towers + projector {report['vision']['towers_projector_ms']:.2f} ms")
    for r in rows:
        print(f"{r['strategy']}: top host ops (ms/query, calls/query): {r['top_host_ops'][:5]}")
        print(f"{r['strategy']}: top device ops (ms/query, calls/query): {r['top_device_ops'][:8]}")
    write_text(args.out, json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
