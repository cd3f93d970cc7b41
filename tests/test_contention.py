"""Latency you can trust (issue 14): torch threads set and recorded by the process that measured,
the contention rule and its evidence in every results file and table, the device the model really
ran on, and the plugin distribution and version of each strategy."""

import importlib.metadata as md
import json

import numpy as np
import pytest
import torch

from prunebench.cli.main import main
from prunebench.evaluation.closed_loop import EvalConfig, _run_pool, print_summary
from prunebench.evaluation.contention import CPU_SHARE_MIN, LOAD_PER_CORE, default_threads, judge, of_records
from prunebench.evaluation.episode import EpisodeRunner, Job
from prunebench.evaluation.results import ClosedLoopQuery, EpisodeResult, EvalResults, StrategyInfo, read_results


@pytest.fixture(autouse=True)
def keep_torch_threads():
    """Runs here set this process's torch threads; give the other tests theirs back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_env(job):
    """A picklable env factory for worker processes (spawned: they import this module)."""
    from tests.test_closed_loop import FakeEnv

    return FakeEnv(job)


# --------------------------------------------------------------------------- the rule
def test_the_contention_rule_on_given_numbers():
    quiet = judge([9.9, 10.0, 10.0], [10.0, 10.0, 10.0], [0.4, 1.2], cores=2)
    assert not quiet.contended and quiet.reasons == [] and quiet.cpu_share_median == pytest.approx(1.0)
    assert quiet.n_queries == 3 and quiet.load_avg == [0.4, 1.2] and quiet.cpu_share_low == 0.0
    # the querying thread ran half of each query: it waited for a CPU
    busy = judge([5.0, 5.0, 10.0], [10.0, 10.0, 10.0], [1.0], cores=2)
    assert busy.contended and "CPU/wall 0.50" in busy.reasons[0] and busy.cpu_share_low == pytest.approx(2 / 3)
    # the boundary is not contended; a load above LOAD_PER_CORE x cores is
    assert not judge([CPU_SHARE_MIN * 10], [10.0], [LOAD_PER_CORE * 2], cores=2).contended
    # ... when a tenth of the queries waited (the median does not see them) ...
    loaded = judge([10.0] * 8 + [5.0] * 2, [10.0] * 10, [1.0, LOAD_PER_CORE * 2 + 0.1], cores=2)
    assert loaded.contended and "load average 3.10 > 1.5 x 2 cores with 20% of queries" in loaded.reasons[0]
    # ... but not when no query waited: the load is the run's own (workers, render threads)
    assert not judge([10.0] * 10, [10.0] * 10, [LOAD_PER_CORE * 2 + 1.3], cores=2).contended
    assert judge([1.0], [10.0], [LOAD_PER_CORE * 2 + 0.1], cores=2, device="cuda:0").contended
    # on a GPU the querying thread waits for the device: only the load average counts
    assert not judge([1.0], [10.0], [0.5], cores=2, device="cuda:0").contended
    # missing figures (old files, no load average on this OS) are skipped, not guessed
    none = judge([None, None], [10.0, 10.0], [None], cores=2)
    assert not none.contended and none.cpu_share_median is None and none.n_queries == 0


def test_tables_flag_latency_measured_under_contention(capsys):
    def episode(index, cpu_ms):
        queries = [ClosedLoopQuery(tokens_per_layer=[10], visual_per_layer=[8], llm_flops=1.0, dense_llm_flops=1.0,
                                   ms={"total": 10.0}, cpu_ms=cpu_ms) for _ in range(3)]
        return EpisodeResult(suite="libero_object", task_id=index, task="t", instruction="i", init_state_id=0,
                             episode_index=index, seed=0, success=True, steps=5, n_queries=3, wall_s=1.0,
                             threads=1, device="cpu", contention=of_records(queries, [0.5, 0.6], cores=2),
                             queries=queries)

    results = EvalResults(seed=0, config={}, model={}, protocol={}, init_state_ids={}, attention_backend="sdpa",
                          strategy=StrategyInfo(name="none", config={}, position_ids="original"),
                          environment={}, episodes=[episode(0, 9.9), episode(1, 3.0)]).aggregate()
    assert not results.per_task["libero_object/0"].contention.contended
    assert results.per_task["libero_object/1"].contention.contended
    assert results.overall.contention.n_queries == 6 and results.overall.contention.load_avg == [0.5, 0.6] * 2
    print_summary(results)
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[-1] == "contended"
    rows = {line.split()[0]: line.split()[-1] for line in out[2:5]}
    assert rows == {"libero_object/0": "no", "libero_object/1": "yes", "overall": "yes"}  # median 0.645
    assert any(line.startswith("* contended = latency measured on a busy machine") for line in out)


# --------------------------------------------------------------------------- closed loop
def test_episodes_record_the_threads_device_and_evidence_of_the_worker_that_ran_them(tiny_path):
    parent = default_threads(2) + 1  # the parent's count differs from what the workers must use
    torch.set_num_threads(parent)
    cfg = EvalConfig(strategy="random", model=tiny_path, max_steps=8, workers=2)
    episodes: list[EpisodeResult] = []
    _run_pool(cfg, [Job("libero_object", 0, i, i) for i in range(2)], episodes.append, make_env=fake_env)
    assert sorted(e.episode_index for e in episodes) == [0, 1] and torch.get_num_threads() == parent
    for e in episodes:
        assert e.error is None and e.n_queries == 1
        assert e.threads == default_threads(2) != parent and e.device == "cpu"
        assert e.contention.n_queries == 1 and len(e.contention.load_avg) == 2
        assert all(q.cpu_ms > 0 and q.ms["total"] > 0 for q in e.queries)


def test_one_process_episodes_use_the_threads_asked_for(tiny_path):
    torch.set_num_threads(2)
    cfg = EvalConfig(strategy="none", model=tiny_path, max_steps=8, threads=1)
    runner = EpisodeRunner(cfg, make_env=fake_env)
    episode = runner.run(Job("libero_object", 0, 0, 0))
    assert episode.threads == 1 == torch.get_num_threads() and episode.device == "cpu"
    assert episode.queries[0].cpu_ms > 0 and episode.contention.cpu_share_median > 0


# --------------------------------------------------------------------------- streams, compare, replay
def own_version() -> str:
    try:
        return md.version("prunebench")
    except md.PackageNotFoundError:
        return "dev"


def test_a_stream_run_names_threads_device_plugin_and_contention(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", "--strategy", "random", "--queries", "3", "--threads", "1", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1 threads on cpu" in printed and "contention: " in printed
    results = read_results(out)
    assert results.environment["torch_threads"] == 1 and results.environment["device"] == "cpu"
    assert results.environment["git_hash"] is None or len(results.environment["git_hash"]) == 40
    info = results.strategy
    assert (info.plugin, info.distribution, info.version) == ("prunebench.strategies.random", "prunebench",
                                                              own_version())
    assert results.contention.n_queries == 3 and len(results.contention.load_avg) == 2
    assert all(q.cpu_ms > 0 for q in results.queries)


def test_the_stream_comparison_flags_contention_and_names_each_strategy(tmp_path, capsys):
    out = tmp_path / "c.json"
    assert main(["compare", "--queries", "2", "--strategies", "random", "--threads", "1", "-o", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "contended"
    data = json.loads(out.read_text())
    assert data["environment"]["torch_threads"] == 1 and data["environment"]["device"] == "cpu"
    assert data["strategies"]["random"]["distribution"] == "prunebench"
    assert data["strategies"]["none"]["version"] == own_version()
    for row in data["rows"]:
        assert isinstance(row["contended"], bool) and row["contention"]["n_queries"] == 2


def test_a_replay_report_names_what_produced_it(engine):
    from prunebench.evaluation.replay import replay
    from prunebench.evaluation.streams import SyntheticStream
    from prunebench.plugins.manager import MANAGER

    stream = SyntheticStream(n_queries=2, seed=0, image_size=32)
    report = replay(engine, MANAGER.create("random"), [stream], name="random")
    info = report.strategy_info
    assert info.distribution == "prunebench" and info.plugin == "prunebench.strategies.random"
    assert report.environment["device"] == "cpu" and report.environment["torch_threads"] == torch.get_num_threads()
    assert report.contention.n_queries == 4  # the dense and the pruned forwards


def test_study_evaluation_threads_reach_the_closed_loop_config():
    from prunebench.study.definition import Evaluation

    assert Evaluation(threads=1, closed_loop={"suite": "libero_object"}).eval_config("none", {}, 0).threads == 1
    with pytest.raises(ValueError, match="closed_loop.threads is set by the study"):
        Evaluation(closed_loop={"threads": 2})


# --------------------------------------------------------------------------- device
def test_the_device_recorded_is_where_the_weights_are(tiny_model):
    from prunebench.evaluation.versions import environment
    from prunebench.models import MiniOFT, model_device
    from tests.conftest import TINY

    assert model_device(tiny_model) == "cpu"
    assert model_device(MiniOFT(TINY).to("meta")) == "meta"
    assert environment("cuda:1", 3)["device"] == "cuda:1" and environment("cuda:1", 3)["torch_threads"] == 3


def test_mini_oft_builds_its_inputs_on_its_own_device(tiny_model, obs):
    """Under another default device (as on a GPU run, where the model is not on the CPU), every input
    tensor must still be created where the weights are."""
    given = torch.zeros(8, dtype=torch.float64)  # a tensor input, as training passes
    with torch.device("meta"):
        enc = tiny_model.encode(obs)
        actions = tiny_model.normalize_actions(np.zeros((8, 7)))
        proprio = tiny_model.normalize_proprio(given)
    assert enc.embeds.device.type == "cpu" and enc.images.device.type == "cpu"
    assert actions.device.type == "cpu" and proprio.device.type == "cpu" and proprio.dtype == torch.float32
    reference = tiny_model.encode(obs)
    assert torch.equal(enc.embeds, reference.embeds)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_device_cuda_without_cuda_is_one_line_and_exit_2(capsys):
    from prunebench.contract.errors import PrunebenchError
    from prunebench.models import load_model

    assert main(["run", "--strategy", "random", "--queries", "1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --device cuda: CUDA is not available")
    with pytest.raises(PrunebenchError, match="--device cuda:1"):
        load_model(device="cuda:1")


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--strategy", "random", "--threads", "0"])
    assert exit_.value.code == 2 and "--threads" in capsys.readouterr().err
