"""Pareto fronts and hypervolume, computed from prunebench's own trials table (not Optuna's plots).

:func:`trials_table` turns a study's trials (every strategy, the dense baseline included) into one
pandas DataFrame: a row per complete trial with its parameters, metrics, feasibility and two Pareto
masks, ``front`` (non-dominated among its strategy's feasible trials) and ``combined_front``
(non-dominated among all strategies' feasible trials). Hypervolume measures a front against a
reference point: the worst value seen per objective, pushed out by 10 % of the observed range.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from optuna.trial import TrialState

from prunebench.plugins.dense import DENSE
from prunebench.study.definition import METRICS, StudyDefinition
from prunebench.study.storage import load_studies, validated_key


def trials_table(defn: StudyDefinition) -> pd.DataFrame:
    """One row per complete trial of every strategy study (``params`` and ``config`` as JSON)."""
    rows = []
    for strategy, study in load_studies(defn).items():
        study_attrs = study.user_attrs  # closed-loop validations of front trials, if any
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            attrs = t.user_attrs
            row = {"strategy": strategy, "trial": t.number, "dense": strategy == DENSE,
                   "feasible": all(c <= 0 for c in (t.constraints or {}).values()),
                   "duplicate_of": attrs.get("duplicate_of"), "worker": attrs.get("worker"),
                   "completed": t.datetime_complete, "results": attrs.get("results"),
                   "params": json.dumps(t.params, sort_keys=True),
                   "config": json.dumps(attrs.get("config", {}), sort_keys=True)}
            row.update({k: attrs.get(k) for k in METRICS if k != "latency_breakdown_ms"})
            for stage, ms in (attrs.get("latency_breakdown_ms") or {}).items():
                row[f"ms_{stage}"] = ms
            for key, value in (study_attrs.get(validated_key(t.number)) or {}).items():
                if key == "latency_breakdown_ms":
                    row.update({f"validated_ms_{stage}": ms for stage, ms in value.items()})
                elif not isinstance(value, dict):
                    row[f"validated_{key}"] = value
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.sort_values(["strategy", "trial"]).reset_index(drop=True)
    df = _escalated(df)
    values, signs = objective_matrix(df, defn)
    # once fronts are validated, the fronts are drawn among the validated trials only: they rest on
    # the validation's episodes, not on the search's few
    among = df["fidelity"].eq("validated").to_numpy() if df["fidelity"].eq("validated").any() else True
    feasible = df["feasible"].to_numpy() & among
    df["front"] = False
    for _, index in df.groupby("strategy").groups.items():
        index = np.asarray(list(index))
        df.loc[index, "front"] = pareto_mask(values[index], feasible[index])
    df["combined_front"] = pareto_mask(values, feasible)
    _spread(df)
    _versus_dense(df)
    return df


def _escalated(df: pd.DataFrame) -> pd.DataFrame:
    """A validated trial's measurements replace its search ones (kept as ``search_<metric>``)."""
    df["fidelity"] = "search"
    if "validated_results" not in df:
        return df
    validated = df["validated_results"].notna()
    stages = [c[len("validated_"):] for c in df if c.startswith("validated_ms_")]
    for metric in [m for m in METRICS if f"validated_{m}" in df] + stages:
        df[f"search_{metric}"] = df[metric]
        df.loc[validated, metric] = df.loc[validated, f"validated_{metric}"]
    df.loc[validated, "results"] = df.loc[validated, "validated_results"]
    df.loc[validated, "fidelity"] = "validated"
    return df


def _spread(df: pd.DataFrame) -> None:
    """Error-bar columns for the front plots: the success rate's 95 % Wilson interval and the
    latency's p10-p90 over queries."""
    ci = df["success_ci95"] if "success_ci95" in df else pd.Series(None, index=df.index, dtype=object)
    df["success_lo"] = [c[0] if isinstance(c, (list, tuple)) else np.nan for c in ci]
    df["success_hi"] = [c[1] if isinstance(c, (list, tuple)) else np.nan for c in ci]
    df["latency_lo"] = df.get("latency_p10_ms", np.nan)
    df["latency_hi"] = df.get("latency_p90_ms", np.nan)


def _versus_dense(df: pd.DataFrame) -> None:
    """For the combined front's closed-loop points: the success difference to the dense baseline
    on the same episodes (paired, prunebench.evaluation.paired) and whether it is significant after
    Holm's correction over those points (``distinguishable``)."""
    from prunebench.evaluation.paired import compare_to_baseline
    from prunebench.evaluation.report import ALPHA

    for column in ("success_diff", "success_diff_lo", "success_diff_hi", "p_holm", "distinguishable"):
        df[column] = None
    dense = df[df["dense"]]
    points = df[df["combined_front"] & ~df["dense"]]
    if dense.empty or points.empty or not df["success_rate"].notna().any():
        return
    runs = {DENSE: _episodes(dense["results"].iloc[0])}
    runs.update({str(i): _episodes(path) for i, path in points["results"].items()})
    if not runs[DENSE] or not all(runs.values()):
        return
    for i, paired in compare_to_baseline(runs, baseline=DENSE).items():
        if paired.n_pairs:
            index = int(i)
            df.at[index, "success_diff"] = paired.difference
            df.at[index, "success_diff_lo"], df.at[index, "success_diff_hi"] = paired.ci95
            df.at[index, "p_holm"] = paired.p_holm
            df.at[index, "distinguishable"] = bool(paired.p_holm < ALPHA)


def _episodes(path) -> list:
    """The episodes of a closed-loop results file ([] for a replay or synthetic trial's file)."""
    from pathlib import Path

    from prunebench.evaluation.results import EpisodeResult

    if not isinstance(path, str) or not Path(path).exists():
        return []
    data = json.loads(Path(path).read_text())
    return [EpisodeResult.model_validate(e) for e in data.get("episodes", [])]


def objective_matrix(df: pd.DataFrame, defn: StudyDefinition) -> tuple[np.ndarray, np.ndarray]:
    """The objectives as a matrix to *minimise* (maximised ones negated), and the signs used."""
    signs = np.array([-1.0 if d == "maximize" else 1.0 for d in defn.directions])
    return df[defn.objectives].to_numpy(dtype=float) * signs, signs


def pareto_mask(values: np.ndarray, feasible: np.ndarray | None = None) -> np.ndarray:
    """Non-dominated rows of ``values`` (all objectives minimised) among the feasible ones."""
    n = len(values)
    feasible = np.ones(n, bool) if feasible is None else np.asarray(feasible, bool)
    mask = np.zeros(n, bool)
    for i in np.flatnonzero(feasible):
        others = values[feasible]
        dominated = np.any(np.all(others <= values[i], axis=1) & np.any(others < values[i], axis=1))
        mask[i] = not dominated
    return mask


def reference_point(values: np.ndarray) -> np.ndarray:
    """Worst value per (minimised) objective plus 10 % of its range (or 1 where the range is 0)."""
    worst, best = values.max(axis=0), values.min(axis=0)
    span = worst - best
    return worst + np.where(span > 0, 0.1 * span, 1.0)


def hypervolume(points: np.ndarray, reference: np.ndarray) -> float:
    """Volume dominated by ``points`` (minimised) and bounded by ``reference``; exact, by slicing
    on the first objective (fine for the few dozen points of a study)."""
    points = np.asarray(points, float)
    points = points[np.all(points < reference, axis=1)]
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    points = points[np.argsort(points[:, 0])]
    volume = 0.0
    for i, x in enumerate(points[:, 0]):
        upper = points[i + 1, 0] if i + 1 < len(points) else reference[0]
        if upper > x:
            volume += (upper - x) * hypervolume(points[: i + 1, 1:], reference[1:])
    return volume


def hypervolume_history(df: pd.DataFrame, defn: StudyDefinition) -> pd.DataFrame:
    """Hypervolume after each trial (in completion order), per strategy and for all combined,
    against one reference point for the whole table; only feasible trials count."""
    values, _ = objective_matrix(df, defn)
    reference = reference_point(values)
    rows = []
    ordered = df.assign(_row=np.arange(len(df))).sort_values("completed")
    groups = [(s, g) for s, g in ordered.groupby("strategy") if s != DENSE] + [("combined", ordered)]
    for name, group in groups:
        seen = []
        for count, (row, feasible) in enumerate(zip(group["_row"], group["feasible"]), start=1):
            if feasible:
                seen.append(values[row])
            hv = hypervolume(np.array(seen), reference) if seen else 0.0
            rows.append({"strategy": name, "trials": count, "hypervolume": hv})
    return pd.DataFrame(rows)
