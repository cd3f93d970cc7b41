"""The measurement behind a trial: one strategy config evaluated under the study's evaluation (closed
loop, replay or synthetic), in a worker process that loads the model once for all its trials.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prunebench.plugins.dense import Dense
from prunebench.study.definition import Evaluation, StudyDefinition


class TrialFailed(Exception):
    """An evaluation error that fails one trial (retried), unlike a usage error, which stops."""

    def __init__(self, message: str, traceback: str | None = None) -> None:
        super().__init__(message)
        self.traceback = traceback


class Evaluator:
    """Measures one strategy config under the definition's evaluation (one model per process)."""

    def __init__(self, defn: StudyDefinition) -> None:
        from prunebench.evaluation.contention import set_threads
        from prunebench.models import load_model

        self.defn = defn
        evaluation = defn.evaluation
        set_threads(evaluation.threads)  # replays measure in this process (closed loop sets its own)
        self.model, _ = load_model(evaluation.model, seed=defn.seed, suite=evaluation.closed_loop.get("suite"),
                                   device=evaluation.device)
        self.n_visual = self.model.layout_for(1).n_visual
        self._engine = None

    def __call__(self, strategy: str, config: dict, output: Path,
                 closed_loop: dict | None = None) -> dict[str, Any]:
        evaluation = self.defn.evaluation
        if closed_loop is not None or evaluation.mode == "closed_loop":
            if closed_loop is not None:
                evaluation = Evaluation(mode="closed_loop", model=evaluation.model, device=evaluation.device,
                                        threads=evaluation.threads, closed_loop=closed_loop)
            return self._closed_loop(evaluation, strategy, config, output)
        return self._replay(strategy, config, output)

    def _closed_loop(self, evaluation: Evaluation, strategy: str, config: dict, output: Path) -> dict:
        from prunebench.evaluation.closed_loop import evaluate

        cfg = evaluation.eval_config(strategy, config, self.defn.seed)
        results = evaluate(cfg, output, f"prunebench study run ({self.defn.name})")
        overall = results.overall
        q = overall.queries
        return self._metrics(q, success_rate=overall.success_rate, success_ci95=list(overall.success_ci95),
                             n_episodes=overall.n_episodes, n_errors=overall.n_errors,
                             speedup=(overall.speedup_vs_dense or {}).get("total"),
                             action_error=overall.action_error_vs_dense,
                             contended=overall.contention.contended if overall.contention else None,
                             threads=results.environment.get("torch_threads"),
                             device=results.environment.get("device"))

    def _replay(self, strategy: str, config: dict, output: Path) -> dict:
        from prunebench.engine.loop import PruningEngine
        from prunebench.evaluation.replay import RecordedStream, replay, stream_files
        from prunebench.evaluation.results import write_json
        from prunebench.evaluation.streams import SyntheticStream
        from prunebench.plugins.manager import MANAGER

        evaluation = self.defn.evaluation
        if evaluation.mode == "replay":
            streams = [RecordedStream(p) for p in stream_files(evaluation.streams)]
        else:
            streams = [SyntheticStream(n_queries=evaluation.queries, seed=self.defn.seed,
                                       image_size=self.model.cfg.image_size)]
        if self._engine is None:
            self._engine = PruningEngine(self.model)
            # warm-up, so the first trial does not pay one-off allocation costs in its latency
            replay(self._engine, Dense(), [SyntheticStream(n_queries=2, seed=self.defn.seed + 1,
                   image_size=self.model.cfg.image_size)])
        report = replay(self._engine, MANAGER.create(strategy, config), streams, seed=self.defn.seed,
                        name=strategy)
        write_json(output, report)
        return self._metrics(report.queries, speedup=report.speedup_vs_dense["total"],
                             action_error=report.action_error.mean, contended=report.contention.contended,
                             threads=report.environment["torch_threads"], device=report.environment["device"])

    def _metrics(self, queries, **measured) -> dict[str, Any]:
        """Definitions in prunebench.evaluation.metrics: latency is the median, its breakdown per stage means."""
        total = queries.latency_ms["total"]
        return {"latency_ms": total.median, "latency_p10_ms": total.p10, "latency_p90_ms": total.p90,
                "gflops": queries.mean_llm_flops / 1e9,
                "visual_tokens": queries.mean_visual_tokens,
                "keep_ratio": queries.mean_visual_tokens / self.n_visual,
                "latency_breakdown_ms": {stage: s.mean for stage, s in queries.latency_ms.items()},
                **measured}
