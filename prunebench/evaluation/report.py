"""What ``prunebench report`` shows of merged runs (prunebench.evaluation.merge): one row per strategy
config for the plots, the strategy x task success table, and the report file's content.

A row (:func:`runs_frame`) holds the success rate with its 95 % Wilson interval, the keep ratio
(mean visual tokens a layer processed / the visual tokens of a dense query, as a study computes
it), the median query latency with its p10-p90 spread, the mean ms per stage, LLM GFLOPs and the
paired test against dense (Holm-corrected p, ``distinguishable`` when below 1 - confidence).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from prunebench.engine.accounting import STAGES
from prunebench.evaluation.results import EvalResults
from prunebench.plugins.dense import DENSE

ALPHA = 0.05  # the paired tests' level: 1 - their 95 % confidence


def dense_visual_tokens(res: EvalResults) -> int | None:
    """Visual tokens of a dense query of this run's model: what the first removal started from."""
    counts = [q.stages[0].visual_before if q.stages else max(q.visual_per_layer, default=0)
              for e in res.episodes for q in e.queries]
    return max(counts) if counts else None


def runs_frame(merged: dict[str, EvalResults], paired: dict | None = None) -> pd.DataFrame:
    """One row per merged run (strategy config); ``paired``: label -> PairedDifference vs dense."""
    rows = []
    for label, res in merged.items():
        group = res.overall
        q = group.queries if group else None
        lo, hi = group.success_ci95 if group and group.n_episodes else (np.nan, np.nan)
        row = {"label": label, "strategy": res.strategy.name, "dense": res.strategy.name == DENSE,
               "config": json.dumps(res.strategy.config, sort_keys=True, default=str),
               "n_episodes": group.n_episodes if group else 0,
               "success_rate": group.success_rate if group and group.success_rate is not None else np.nan,
               "success_lo": lo, "success_hi": hi}
        if q is not None:
            total = q.latency_ms["total"]
            p10 = getattr(total, "p10", float("nan"))
            n_visual = dense_visual_tokens(res)
            row.update(latency_ms=total.median, latency_hi=total.p90,
                       latency_lo=p10 if np.isfinite(p10) else total.mean,  # files before Stats.p10
                       keep_ratio=q.mean_visual_tokens / n_visual if n_visual else np.nan,
                       visual_tokens=q.mean_visual_tokens, gflops=q.mean_llm_flops / 1e9,
                       **{f"ms_{s}": q.latency_ms[s].mean for s in STAGES if s in q.latency_ms})
        test = (paired or {}).get(label)
        if test is not None and not row["dense"]:
            p_holm = getattr(test, "p_holm", None)
            row.update(difference=test.difference, p_holm=p_holm, not_worse=test.not_worse,
                       distinguishable=None if p_holm is None else bool(p_holm < ALPHA))
        rows.append(row)
    df = pd.DataFrame(rows)
    if "distinguishable" in df:
        df["distinguishable"] = df["distinguishable"].astype(object)
    return df


def _task_order(key: str) -> tuple[str, int]:
    suite, _, task = key.rpartition("/")
    return suite, int(task) if task.isdigit() else -1


def per_task_table(merged: dict[str, EvalResults]) -> pd.DataFrame:
    """Strategy (rows, as labelled) x task ("suite/task_id", columns) success rates; NaN where a
    strategy did not run a task or no episode of it had an outcome."""
    tasks = sorted({k for res in merged.values() for k in res.per_task}, key=_task_order)
    data = {label: [res.per_task[t].success_rate if t in res.per_task else None for t in tasks]
            for label, res in merged.items()}
    return pd.DataFrame.from_dict(data, orient="index", columns=tasks).astype(float)


def report_content(merged: dict[str, EvalResults], rows: list, paired: dict, per_task: pd.DataFrame,
                   delta: float, baseline: str | None, command: str) -> dict:
    """report.json: the rows, the paired statistics, the per-task rates and every input file."""
    inputs = [{"strategy": label, **source} for label, res in merged.items()
              for source in res.config.get("merged_from", [])]
    first = next(iter(merged.values()))
    return {"command": command, "delta": delta, "baseline": baseline,
            "protocol": first.protocol, "model": first.model, "seed": first.seed,
            "attention_backend": first.attention_backend, "inputs": inputs,
            "rows": [r.model_dump(mode="json") for r in rows],
            "paired": {label: p.model_dump(mode="json") for label, p in paired.items()},
            "per_task": json.loads(per_task.to_json(orient="index")),
            "merged": {label: {"episodes": len(res.episodes), "complete": res.complete,
                               "init_state_ids": res.init_state_ids,
                               "overall": res.overall.model_dump(mode="json") if res.overall else None}
                       for label, res in merged.items()}}
