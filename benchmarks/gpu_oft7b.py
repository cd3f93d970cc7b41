"""GPU benchmark: an OpenVLA-OFT-7B-shaped model, dense vs every built-in strategy at its paper budget.

The model is the real adapter's structure at full size (DINOv2 ViT-L/14 + SigLIP so400m/14 towers,
2176 -> 8704 -> 4096 projector, Llama-2-7B decoder: 32 layers, 4096 wide, 11008 MLP, 32 heads,
L1 MLP-ResNet head) with random bfloat16 weights: latency does not depend on the weight values, so
no 15 GB download is needed. Queries come from a synthetic 256 px stream (LIBERO's render size; the
adapter resizes and centre-crops to 224 like OFT's eval), all variants interleaved in shuffled order
per round in one process; medians over the timed rounds (the warm-up rounds also cover stateful
warm-ups such as VLA-Pruner's first dense queries). Per stage, with CUDA synchronisation at stage
boundaries: vision (image pipeline, towers, projector, proprio, embeddings), LLM (decoder layers +
final norm), head, overhead (the strategy's schedule, signals, scoring, selection, gathers).

    python benchmarks/gpu_oft7b.py                      # on the GPU, writes results/gpu_oft7b.json
    python benchmarks/gpu_oft7b.py --smoke              # the same script at toy width on the CPU

Target (issue 6): >= 1.6x end-to-end at SpecPrune-VLA's budget (its paper: 1.46x on an A800).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from pydantic import BaseModel

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation import metrics
from prunebench.evaluation.results import write_json
from prunebench.evaluation.runner import run_interleaved
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.tables import compare_rows, format_table
from prunebench.evaluation.versions import environment
from prunebench.models.oft_tiny import build_tiny_oft, tiny_norm_stats, tiny_tokenizer
from prunebench.models.openvla_oft import OFTSpec, OpenVLAOFT
from prunebench.plugins.dense import DENSE
from prunebench.plugins.manager import MANAGER

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32064,
             "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000}
# Paper budgets are the strategies' defaults; ADP's trajectory gate is off so every timed query prunes.
OVERRIDES = {"adp": {"gate": False}}
INSTRUCTION = "pick up the alphabet soup and place it in the basket"


def oft7b(device: str, attn: str) -> OpenVLAOFT:
    spec = OFTSpec(vision_backbone_id="dinosiglip-vit-so-224px", text_config=LLAMA2_7B)
    with torch.device(device):
        model = OpenVLAOFT(spec, tiny_tokenizer(), tiny_norm_stats(), "libero_object_no_noops", attn)
    return model.to(torch.bfloat16).eval()


class GpuBenchmark(BaseModel):
    command: str
    device: str
    model: dict
    rounds: int
    warmup: int
    attention_backend: str
    prompt_tokens: int
    sequence_length: int
    peak_memory_gb: float | None
    environment: dict
    rows: list


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    parser.add_argument("--strategies", nargs="*", help="default: every built-in strategy")
    parser.add_argument("--smoke", action="store_true", help="toy-width model on the CPU (checks the script)")
    parser.add_argument("--out", default="benchmarks/results/gpu_oft7b.json")
    args = parser.parse_args(argv)

    if args.smoke:
        args.device = "cpu"
        model = build_tiny_oft(seed=0, attn_implementation=args.attn)
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or pass --smoke", file=sys.stderr)
        return 2
    else:
        t0 = time.perf_counter()
        model = oft7b(args.device, args.attn)
        print(f"built the OFT-7B-shaped model in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    engine = PruningEngine(model)
    names = [DENSE] + [n for n in (args.strategies or MANAGER.builtin_strategies()) if n != DENSE]
    strategies = {n: MANAGER.create(n, OVERRIDES.get(n, {})) for n in names}
    stream = SyntheticStream(n_queries=args.warmup + args.rounds, image_size=256, instruction=INSTRUCTION)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    results = run_interleaved(engine, strategies, stream)
    timed = {n: rs[args.warmup:] for n, rs in results.items()}
    median_ms = lambda name, stage: metrics.latency_ms([r.record.ms for r in timed[name]], stage)  # noqa: E731
    dense = {stage: median_ms(DENSE, stage) for stage in ("vision", "llm", "head", "total")}
    rows = []
    for row in compare_rows(timed):
        config = strategies[row.strategy].config.model_dump()
        budget = {k: config[k] for k in ("keep_ratio", "gate") if k in config}
        rows.append({**row.model_dump(), "vision_ms": median_ms(row.strategy, "vision"),
                     "head_ms": median_ms(row.strategy, "head"), "budget": str(budget or "paper default")})
    layout = model.encode(next(iter(stream)).observation).layout
    env = environment(str(engine.device))
    gpu = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu (smoke)"
    peak = torch.cuda.max_memory_allocated(args.device) / 2**30 if args.device.startswith("cuda") else None
    print(f"{gpu}: OFT-7B-shaped{' (toy width)' if args.smoke else ''}, {model.dtype}, {args.attn}, "
          f"{layout.length} tokens ({layout.n_visual} visual, P={layout.prompt[1] - layout.prompt[0]}); "
          f"dense query {dense['total']:.1f} ms = vision {dense['vision']:.1f} + LLM {dense['llm']:.1f} + head "
          f"{dense['head']:.1f} ms; {args.rounds} rounds after {args.warmup} warm-up")
    print(format_table(rows, [
        ("strategy", "strategy", ""), ("mean_visual_tokens", "visual tok", ".1f"),
        ("query_ms", "query ms", ".2f"), ("vision_ms", "vision ms", ".2f"),
        ("llm_ms", "LLM ms", ".2f"), ("head_ms", "head ms", ".2f"),
        ("overhead_ms", "overhead ms", ".2f"), ("speedup_total", "e2e speedup", ".2f"),
        ("speedup_llm", "LLM speedup", ".2f"), ("flops_ideal_speedup", "FLOPs-ideal", ".2f"),
        ("budget", "budget", "")]))
    spec_row = next((r for r in rows if r["strategy"] == "specprune-vla"), None)
    if spec_row:
        print(f"SpecPrune-VLA end-to-end speedup {spec_row['speedup_total']:.2f}x (target >= 1.6x)")
    write_json(args.out, GpuBenchmark(
        command=" ".join([sys.executable, *sys.argv]), device=gpu,
        model={"shape": "toy" if args.smoke else "OpenVLA-OFT-7B", "weights": "random",
               "dtype": str(model.dtype), "parameters": sum(p.numel() for p in model.parameters())},
        rounds=args.rounds, warmup=args.warmup, attention_backend=args.attn,
        prompt_tokens=layout.prompt[1] - layout.prompt[0], sequence_length=layout.length,
        peak_memory_gb=peak, environment=env, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
