"""A study's fronts with error bars, escalated fidelity, and points told apart from dense (paired)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from prunebench.study.pareto import _escalated, _spread, _versus_dense, pareto_mask


def _episodes_file(path, outcomes: list[bool]) -> str:
    episodes = [{"suite": "libero_object", "task_id": k % 5, "task": "t", "instruction": "i",
                 "init_state_id": k // 5, "episode_index": k, "seed": 0, "success": won, "steps": 10,
                 "n_queries": 2, "wall_s": 1.0} for k, won in enumerate(outcomes)]
    path.write_text(json.dumps({"episodes": episodes}))
    return str(path)


def test_validated_measurements_replace_the_search_ones(tmp_path):
    df = pd.DataFrame([
        {"strategy": "none", "trial": 0, "dense": True, "success_rate": 0.9, "latency_ms": 10.0,
         "success_ci95": [0.6, 1.0], "results": "a", "validated_results": "va", "validated_success_rate": 0.85,
         "validated_success_ci95": [0.75, 0.92], "validated_latency_ms": 11.0, "validated_ms_llm": 5.0},
        {"strategy": "fastv", "trial": 3, "dense": False, "success_rate": 1.0, "latency_ms": 8.0,
         "success_ci95": [0.7, 1.0], "results": "b", "validated_results": None, "validated_success_rate": None,
         "validated_success_ci95": None, "validated_latency_ms": None, "validated_ms_llm": None},
    ])
    df["ms_llm"] = [6.0, 4.0]
    out = _escalated(df)
    assert out["fidelity"].tolist() == ["validated", "search"]
    assert out.loc[0, "success_rate"] == 0.85 and out.loc[0, "search_success_rate"] == 0.9
    assert out.loc[0, "results"] == "va" and out.loc[1, "results"] == "b"
    assert list(out.loc[0, "success_ci95"]) == [0.75, 0.92] and out.loc[0, "ms_llm"] == 5.0
    assert out.loc[1, "success_rate"] == 1.0 and out.loc[1, "ms_llm"] == 4.0  # not validated: unchanged
    _spread(out)
    assert out.loc[0, "success_lo"] == 0.75 and out.loc[1, "success_hi"] == 1.0


def test_front_points_are_told_apart_from_dense_on_paired_episodes(tmp_path):
    dense = [True] * 40
    same = [True] * 39 + [False]  # one episode lost: not distinguishable
    worse = [True] * 20 + [False] * 20  # 20 lost, none won: distinguishable after Holm
    df = pd.DataFrame([
        {"strategy": "none", "trial": 0, "dense": True, "combined_front": True, "success_rate": 1.0,
         "results": _episodes_file(tmp_path / "d.json", dense)},
        {"strategy": "fastv", "trial": 1, "dense": False, "combined_front": True, "success_rate": 0.975,
         "results": _episodes_file(tmp_path / "s.json", same)},
        {"strategy": "random", "trial": 2, "dense": False, "combined_front": True, "success_rate": 0.5,
         "results": _episodes_file(tmp_path / "w.json", worse)},
        {"strategy": "random", "trial": 3, "dense": False, "combined_front": False, "success_rate": 0.1,
         "results": None},
    ])
    _versus_dense(df)
    assert df.loc[1, "distinguishable"] is False and df.loc[2, "distinguishable"] is True
    assert df.loc[3, "distinguishable"] is None  # not on the combined front: not tested
    assert np.isclose(df.loc[2, "success_diff"], -0.5)
    assert df.loc[2, "success_diff_lo"] < -0.5 < df.loc[2, "success_diff_hi"] < 0
    assert df.loc[1, "p_holm"] >= df.loc[2, "p_holm"]


def test_pareto_mask_ignores_infeasible_points():
    values = np.array([[1.0, 1.0], [0.5, 0.5], [2.0, 0.1]])
    assert pareto_mask(values, np.array([True, False, True])).tolist() == [True, False, True]
