"""Recorded observation streams and the replay-fidelity metric.

A closed-loop run can record, per episode, everything a policy saw and did: the camera images at
every query, the extra frames rendered before each query (for history-based strategies), the proprio,
and every executed env step (action, end-effector pose) in order. The file is one compressed ``.npz``
(images as uint8 arrays) with a JSON header.

Replaying a stream feeds the dense model and a pruned one the *same* observations, query by query,
with the env-step events and frames in between (so strategies with state or histories see the
temporal context they would see live), and reports the action error of the pruned model per query:
the mean L1 distance to the dense actions, unnormalised. It needs no simulator, which makes it the
cheap objective for searches; closed-loop success remains the real one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from pydantic import BaseModel, Field

from prunebench.contract.errors import PrunebenchError
from prunebench.contract.strategy import EnvStep, Observation, Strategy
from prunebench.evaluation import metrics
from prunebench.evaluation.contention import Contention
from prunebench.evaluation.results import QuerySummary, Stats, StrategyInfo
from prunebench.evaluation.streams import StreamQuery
from prunebench.plugins.dense import Dense

FORMAT = "prunebench-stream/1"


@dataclass
class StreamRecorder:
    """Collects one episode's :class:`StreamQuery` items and writes them as one file."""

    meta: dict = field(default_factory=dict)
    items: list[StreamQuery] = field(default_factory=list)

    def add(self, item: StreamQuery) -> None:
        self.items.append(item)

    def save(self, path: str | Path) -> Path:
        if not self.items:
            raise PrunebenchError("nothing to save: the stream has no queries")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        views = list(self.items[0].observation.images)
        arrays: dict[str, np.ndarray] = {
            "proprio": np.stack([q.observation.proprio for q in self.items]).astype(np.float32),
            "step_index": np.array([q.step_index for q in self.items], dtype=np.int64),
            "frame_offsets": np.cumsum([0] + [len(q.frames) for q in self.items]),
            "event_offsets": np.cumsum([0] + [len(q.env_steps) for q in self.items]),
        }
        events = [e for q in self.items for e in q.env_steps]
        arrays["event_step"] = np.array([e.step_index for e in events], dtype=np.int64)
        arrays["event_action"] = np.array([e.action for e in events], dtype=np.float64).reshape(-1, 7)
        arrays["event_eef_pos"] = np.array([e.eef_pos for e in events], dtype=np.float64).reshape(-1, 3)
        quats = [e.eef_quat if e.eef_quat is not None else np.full(4, np.nan) for e in events]
        arrays["event_eef_quat"] = np.array(quats, dtype=np.float64).reshape(-1, 4)
        for view in views:
            arrays[f"image_{view}"] = np.stack([q.observation.images[view] for q in self.items])
            frames = [f[view] for q in self.items for f in q.frames]
            shape = self.items[0].observation.images[view].shape
            arrays[f"frames_{view}"] = np.stack(frames) if frames else np.zeros((0, *shape), np.uint8)
        header = {"format": FORMAT, "views": views,
                  "instructions": [q.observation.instruction for q in self.items],
                  "history_frames": min((len(q.frames) for q in self.items[1:]), default=0), **self.meta}
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez_compressed(tmp, header=np.array(json.dumps(header)), **arrays)
        tmp.replace(path)
        return path


class RecordedStream:
    """A recorded episode, iterable as :class:`StreamQuery` items (like the synthetic stream)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise PrunebenchError(f"stream file not found: {self.path}")
        try:
            with np.load(self.path, allow_pickle=False) as data:
                self.header = json.loads(str(data["header"]))
                self._arrays = {k: data[k] for k in data.files if k != "header"}
        except (OSError, ValueError, KeyError) as err:
            raise PrunebenchError(f"{self.path}: not a prunebench stream file ({err})") from None
        if self.header.get("format") != FORMAT:
            raise PrunebenchError(f"{self.path}: format {self.header.get('format')!r}, expected {FORMAT}")

    @property
    def history_frames(self) -> int:
        """Frames available before every query after the first (what strategies may ask for)."""
        return int(self.header["history_frames"])

    def __len__(self) -> int:
        return len(self._arrays["step_index"])

    def describe(self) -> dict:
        keep = ("suite", "task_id", "task", "init_state_id", "episode_index", "camera_size")
        return {"kind": "recorded", "path": str(self.path), "n_queries": len(self),
                "history_frames": self.history_frames,
                **{k: self.header[k] for k in keep if k in self.header}}

    def __iter__(self) -> Iterator[StreamQuery]:
        a, views = self._arrays, self.header["views"]
        fo, eo = a["frame_offsets"], a["event_offsets"]
        for i in range(len(self)):
            events = [EnvStep(step_index=int(a["event_step"][j]), action=a["event_action"][j],
                              eef_pos=a["event_eef_pos"][j],
                              eef_quat=None if np.isnan(a["event_eef_quat"][j]).any() else a["event_eef_quat"][j])
                      for j in range(eo[i], eo[i + 1])]
            frames = [{v: a[f"frames_{v}"][j] for v in views} for j in range(fo[i], fo[i + 1])]
            obs = Observation(images={v: a[f"image_{v}"][i] for v in views}, proprio=a["proprio"][i],
                              instruction=self.header["instructions"][i])
            yield StreamQuery(obs, step_index=int(a["step_index"][i]), env_steps=events, frames=frames)


def stream_files(paths: list[str | Path]) -> list[Path]:
    """Files given directly, or every ``*.npz`` under given directories, in name order."""
    out: list[Path] = []
    for p in map(Path, paths):
        out.extend(sorted(p.glob("*.npz")) if p.is_dir() else [p])
    if not out:
        raise PrunebenchError(f"no stream files in {', '.join(map(str, paths))}")
    return out


# --------------------------------------------------------------------------- the metric
class StreamReplay(BaseModel):
    source: dict
    action_error: list[float]  # per query: prunebench.evaluation.metrics.action_error


class ReplayReport(BaseModel):
    """Action error of a strategy vs the dense model over recorded streams (same process, interleaved)."""

    strategy: str
    n_streams: int
    n_queries: int
    action_error: Stats  # over all queries
    speedup_vs_dense: dict[str, float]  # prunebench.evaluation.metrics.speedups, total and llm
    queries: QuerySummary
    # what produced it: the strategy's config, plugin, distribution and version; versions, git
    # hash, device and torch threads; whether the machine was busy while it was timed
    strategy_info: StrategyInfo | None = None
    environment: dict = Field(default_factory=dict)
    contention: Contention | None = None
    streams: list[StreamReplay]


def replay(engine, strategy: Strategy, streams: list[RecordedStream], seed: int = 0,
           name: str = "strategy") -> ReplayReport:
    """Replay ``streams`` through the dense model and ``strategy``, interleaved query by query."""
    import torch

    from prunebench.evaluation.contention import load_average, of_records
    from prunebench.evaluation.runner import run_interleaved
    from prunebench.evaluation.versions import environment

    load_start = load_average()
    per_stream, dense_ms, ms, records, timed = [], [], [], [], []
    for index, stream in enumerate(streams):
        if strategy.history_frames > stream.history_frames:
            raise PrunebenchError(
                f"{stream.describe().get('path', 'the stream')} holds {stream.history_frames} frames "
                f"before each query; strategy {name!r} needs {strategy.history_frames} (record with --record-history "
                f"{strategy.history_frames})")
        # the live episode's seeds (episode.Job.seed_key); streams recorded before it: their position
        out = run_interleaved(engine, {"dense": Dense(), name: strategy}, stream,
                              seed=seed, episode=getattr(stream, "header", {}).get("seed_key", index))
        dense, pruned = out["dense"], out[name]
        per_stream.append(StreamReplay(source=stream.describe(), action_error=[
            metrics.action_error(p.normalized, d.normalized) for p, d in zip(pruned, dense)]))
        dense_ms += [d.record.ms for d in dense]
        ms += [p.record.ms for p in pruned]
        records += [p.record for p in pruned]
        timed += [r.record for r in dense + pruned]
    errors = [v for s in per_stream for v in s.action_error]
    device = str(engine.device)
    return ReplayReport(strategy=name, n_streams=len(streams), n_queries=len(errors),
                        action_error=Stats.of(errors), speedup_vs_dense=metrics.speedups(dense_ms, ms),
                        queries=QuerySummary.of(records),
                        strategy_info=StrategyInfo.of(strategy.name or name, strategy),
                        environment=environment(device, torch.get_num_threads()),
                        contention=of_records(timed, [load_start, load_average()], device=device),
                        streams=per_stream)
