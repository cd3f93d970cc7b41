"""Engine benchmark: does removing tokens give the speedup its FLOPs promise, and what does
scoring cost?

For keep ratios 1.0 / 0.75 / 0.5 / 0.25, removal before the LLM and after layer 2, and every
built-in strategy (the paper methods at their own insertion points: see ``paper_variants``),
measured in one process with all variants interleaved in shuffled order per
round (so machine noise hits all alike):

* LLM speedup     = median dense LLM ms / median pruned LLM ms (decoder layers + final norm)
* FLOPs-ideal     = dense LLM FLOPs / pruned LLM FLOPs (prunebench/engine/accounting.py)
* ratio           = LLM speedup / FLOPs-ideal
* overhead %      = median pruning overhead (schedule + signals + score + select + gather)
                    / median query time

Usage: python benchmarks/engine.py [--rounds 30] [--shape shipped|llm-heavy] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from prunebench.engine.loop import PruningEngine
from prunebench.evaluation import metrics
from prunebench.evaluation.results import write_json
from prunebench.evaluation.runner import run_interleaved
from prunebench.evaluation.streams import SyntheticStream
from prunebench.evaluation.tables import format_table
from prunebench.evaluation.versions import environment
from prunebench.models import load_model
from prunebench.models.mini_oft import MiniOFT, MiniOFTConfig
from prunebench.plugins.dense import DENSE, Dense
from prunebench.plugins.manager import MANAGER
from prunebench.runtime.inputs import parse_overrides

KEEP_RATIOS = (1.0, 0.75, 0.5, 0.25)
# the shape of the first built-in model: 12x12 patches per view, the LLM most of a query
LLM_HEAVY = MiniOFTConfig(image_size=96, patch_size=8, hidden_size=256, n_layers=8, n_heads=4,
                          intermediate_size=688)
POINTS = (-1, 2)  # before the LLM, after layer 2


def paper_variants(name: str, n_layers: int) -> list[tuple[str, float | str, dict]] | None:
    """(where, keep, config) of the paper methods at their own insertion points; None for others.
    Per-query gating and warm-ups are off (ADP's gate) or over before timing starts (VLA-Pruner's
    3 dense queries = the warm-up rounds), so every timed query is a pruned one."""
    from prunebench import scale_layer

    if name == "specprune-vla":  # its budget comes from frame differences and attention top-k
        return [("static+dynamic", "paper", {}), ("static", "paper", {"dynamic": False}),
                ("dynamic", "paper", {"static": False})]
    if name == "vla-pruner":
        return [(f"after_layer_{scale_layer(3, n_layers)}", k, {"keep_ratio": k}) for k in KEEP_RATIOS]
    if name == "adp":
        return [("before_llm", k, {"keep_ratio": k, "gate": False}) for k in KEEP_RATIOS]
    if name == "lightvla-free":  # no budget: the union of the patch queries' picks
        return [("before_llm", "paper", {})]
    if name in ("sparsevlm", "tome"):  # several stages at their own layers, keep_ratio at the last
        return [("stages", k, {"keep_ratio": k}) for k in KEEP_RATIOS]
    if name == "vla-cache":  # reuse, not removal: its budget comes from frame similarity
        return [("reuse", "paper", {})]
    return None


def configure(name: str, keep: float, point: int, extra: dict) -> dict | None:
    """Config putting a strategy's removal at ``point`` (plus the ``extra`` fields it has);
    None if it cannot prune there."""
    fields = MANAGER.get(name).Config.model_fields
    config = {k: v for k, v in extra.items() if k in fields}
    if "keep_ratio" in fields:
        config["keep_ratio"] = keep
    if "after_layer" in fields:
        config["after_layer"] = point
    elif "layer" in fields:
        if point < 0:
            return None  # needs attention from a layer that has run
        config["layer"] = point
    elif point != -1 or "keep_ratio" not in fields:
        return None
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--strategies", nargs="*", help="default: every built-in strategy")
    parser.add_argument("--model", help="MiniOFT safetensors (default: built-in)")
    parser.add_argument("--shape", choices=["shipped", "llm-heavy"], default="shipped",
                        help="llm-heavy: a random 8-layer, d=256 model with 144 patches per view, "
                             "where the LLM dominates the query as on OpenVLA-OFT")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="extra config field for every strategy that has it, e.g. rows=prefill")
    parser.add_argument("--out", default="benchmarks/results/engine.json")
    args = parser.parse_args(argv)

    extra = parse_overrides(args.set)
    if args.shape == "llm-heavy":
        model = MiniOFT.random(LLM_HEAVY, seed=0)
        model_info = {"source": "random", "config": LLM_HEAVY.model_dump(), "trained": False}
    else:
        model, model_info = load_model(args.model)
    engine = PruningEngine(model)
    names = args.strategies or MANAGER.builtin_strategies()
    variants = {(DENSE, 1.0, "dense"): Dense()}
    for name in names:
        paper = paper_variants(name, model.n_layers)
        if paper is not None:
            for where, keep, config in paper:
                variants[(name, keep, where)] = MANAGER.create(name, {**config, **{
                    k: v for k, v in extra.items() if k in MANAGER.get(name).Config.model_fields}})
            continue
        for keep in KEEP_RATIOS:
            for point in POINTS:
                config = configure(name, keep, point, extra)
                if config is not None:
                    where = "before_llm" if point < 0 else f"after_layer_{point}"
                    variants[(name, keep, where)] = MANAGER.create(name, config)
    stream = SyntheticStream(n_queries=args.warmup + args.rounds, image_size=model.cfg.image_size)
    results = run_interleaved(engine, variants, stream)  # shuffled order per round

    def stats(key):
        rs = results[key][args.warmup:]
        ms = [r.record.ms for r in rs]
        return {"llm": metrics.latency_ms(ms, "llm"), "total": metrics.latency_ms(ms),
                "overhead": metrics.latency_ms(ms, "overhead"),
                "flops": float(np.mean([r.record.llm_flops for r in rs])),
                "visual": float(np.mean([np.mean(r.record.visual_per_layer) for r in rs]))}

    dense = stats((DENSE, 1.0, "dense"))
    rows = []
    for key in variants:
        if key[0] == DENSE:
            continue
        s = stats(key)
        speedup, ideal = dense["llm"] / s["llm"], dense["flops"] / s["flops"]
        rows.append({"strategy": key[0], "keep_ratio": key[1], "where": key[2],
                     "visual_tokens": s["visual"], "llm_ms": s["llm"], "query_ms": s["total"],
                     "llm_speedup": speedup, "flops_ideal": ideal, "ratio": speedup / ideal,
                     "end_to_end_speedup": dense["total"] / s["total"],
                     "overhead_pct": 100 * s["overhead"] / s["total"]})
    env = environment(str(engine.device))
    print(f"dense: LLM {dense['llm']:.2f} ms, query {dense['total']:.2f} ms; {args.rounds} rounds; "
          f"backend {engine.attention_backend}; {env['torch_threads']} threads; model "
          f"{model_info['source']}")
    print(format_table(rows, [
        ("strategy", "strategy", ""), ("where", "where", ""), ("keep_ratio", "keep", ".2f"),
        ("visual_tokens", "visual tok", ".1f"), ("llm_ms", "LLM ms", ".2f"),
        ("llm_speedup", "LLM speedup", ".2f"), ("flops_ideal", "FLOPs-ideal", ".2f"),
        ("ratio", "ratio", ".2f"), ("end_to_end_speedup", "e2e speedup", ".2f"),
        ("overhead_pct", "overhead %", ".2f")]))

    from pydantic import BaseModel

    class EngineBenchmark(BaseModel):
        command: str
        rounds: int
        dense: dict
        model: dict
        attention_backend: str
        environment: dict
        rows: list

    write_json(args.out, EngineBenchmark(
        command=" ".join([sys.executable, *sys.argv]), rounds=args.rounds, dense=dense, model=model_info,
        attention_backend=engine.attention_backend, environment=env, rows=rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
