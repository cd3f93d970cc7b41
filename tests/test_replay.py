"""Recorded streams (write, read back) and the replay action-error metric, without a simulator."""

import numpy as np
import pytest

from prunebench import Strategy
from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.replay import RecordedStream, StreamRecorder, replay, stream_files
from prunebench.evaluation.streams import SyntheticStream
from prunebench.plugins.manager import MANAGER


@pytest.fixture
def recorded(tmp_path):
    recorder = StreamRecorder(meta={"suite": "synthetic"})
    for item in SyntheticStream(n_queries=4, seed=3, image_size=32):
        recorder.add(item)
    return recorder, RecordedStream(recorder.save(tmp_path / "s.npz"))


def test_a_stream_reads_back_exactly(recorded):
    recorder, stream = recorded
    assert len(stream) == 4 and stream.history_frames == 7 and stream.describe()["suite"] == "synthetic"
    for a, b in zip(recorder.items, stream):
        assert a.step_index == b.step_index and a.observation.instruction == b.observation.instruction
        assert np.array_equal(a.observation.proprio, b.observation.proprio)
        for view in a.observation.images:
            assert np.array_equal(a.observation.images[view], b.observation.images[view])
            assert all(np.array_equal(f[view], g[view]) for f, g in zip(a.frames, b.frames))
        assert [e.step_index for e in a.env_steps] == [e.step_index for e in b.env_steps]
        assert all(np.array_equal(e.action, f.action) for e, f in zip(a.env_steps, b.env_steps))


def test_replay_error_is_zero_for_dense_and_grows_as_tokens_go(engine, recorded):
    _, stream = recorded
    dense = replay(engine, MANAGER.create("none"), [stream], name="none")
    assert dense.n_queries == 4 and dense.action_error.mean == 0.0
    errors = [replay(engine, MANAGER.create("random", {"keep_ratio": k}), [stream], name="random")
              .action_error.mean for k in (0.75, 0.1)]
    assert 0 < errors[0] < errors[1]


def test_replay_refuses_a_strategy_that_needs_more_history(engine, recorded, tmp_path):
    _, stream = recorded

    class Needs8(Strategy):
        name = "needs8"
        history_frames = 8

    with pytest.raises(PrunebenchError, match="needs 8 .*--record-history 8"):
        replay(engine, Needs8(), [stream], name="needs8")


def test_stream_file_errors_are_one_line(tmp_path):
    with pytest.raises(PrunebenchError, match="stream file not found"):
        RecordedStream(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(PrunebenchError, match="not a prunebench stream file"):
        RecordedStream(tmp_path / "junk.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunebenchError, match="no stream files"):
        stream_files([tmp_path / "empty"])
