"""Merging closed-loop results files: shards of one run (``--tasks``, ``first_init_state`` +
``--episodes``, other processes or machines) and repeated runs, into one :class:`EvalResults` per
strategy config.

Files merge only when they measured the same thing: the same protocol (apart from the fields that
only say which episodes ran), model, run seed and episode-seed policy, prunebench version,
attention backend and schema. A group (one strategy with one config) takes every episode of its
files once: an episode key (suite, task, init state, seed) seen twice is refused, since counting it
twice would narrow every interval. Aggregates are recomputed from the episodes
(:meth:`EvalResults.aggregate`); ``config["merged_from"]`` lists the files that went in.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import ValidationError

from prunebench.contract.errors import PrunebenchError
from prunebench.evaluation.results import EvalResults

# protocol fields that say which episodes ran, not how: shards of one run differ in them.
# dense_reference is off for the dense baseline itself, so it is compared within a strategy only.
SELECTION_FIELDS = ("suite", "stock_max_steps", "tasks", "episodes", "first_init_state", "init_state_ids")
_MISSING = "<missing>"  # a key a file lacks is a value of its own (older files have no episode_seed)


def read_eval_file(path: str | Path) -> EvalResults:
    """One closed-loop results file, or one line naming it and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PrunebenchError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise PrunebenchError(f"{path}: a directory, not a results file") from None
    except OSError as err:
        raise PrunebenchError(f"{path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrunebenchError(f"{path}: not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("kind") != "libero_eval":
        raise PrunebenchError(f"{path}: not a closed-loop results file (no kind 'libero_eval'; "
                              f"written by 'prunebench run --suite' or 'prunebench compare --suite')")
    try:
        return EvalResults.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise PrunebenchError(f"{path}: field '{field}': {first['msg']}") from None


def _identity(res: EvalResults, same_strategy: bool) -> dict:
    """What two files must share to be merged or compared, flattened to 'field' -> value."""
    protocol = {k: v for k, v in res.protocol.items() if k not in SELECTION_FIELDS}
    if not same_strategy:
        protocol.pop("dense_reference", None)
    if res.protocol.get("max_steps") == res.protocol.get("stock_max_steps"):
        protocol["max_steps"] = "stock"  # each suite's own stock limit
    out = {f"protocol.{k}": v for k, v in protocol.items()}
    out["protocol.episode_seed"] = res.protocol.get("episode_seed", _MISSING)
    # the weights by their hash where recorded: the path of one file differs between machines
    ignored = {"device", "source"} if res.model.get("sha256") else {"device"}
    out.update({f"model.{k}": v for k, v in res.model.items() if k not in ignored})
    out["seed"] = res.seed
    out["environment.versions.prunebench"] = (res.environment.get("versions") or {}).get("prunebench", _MISSING)
    out["attention_backend"] = res.attention_backend
    out["schema_version"] = res.schema_version
    return out


def check_compatible(a: EvalResults, a_path, b: EvalResults, b_path, same_strategy: bool) -> None:
    """One line naming the first field that differs, and the two files."""
    ia, ib = _identity(a, same_strategy), _identity(b, same_strategy)
    for key in sorted(set(ia) | set(ib)):
        va, vb = ia.get(key, _MISSING), ib.get(key, _MISSING)
        if va != vb:
            raise PrunebenchError(f"field '{key}' differs: {_short(va)} in {a_path}, {_short(vb)} in {b_path}; "
                                  f"runs merge only when they measured the same thing")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def _config_key(res: EvalResults) -> tuple[str, str]:
    return res.strategy.name, json.dumps(res.strategy.config, sort_keys=True, default=str)


def _labels(keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """The strategy name; with the config fields that tell its configs apart when it has several."""
    out = {}
    for name, config in keys:
        siblings = [json.loads(c) for n, c in keys if n == name]
        if len(siblings) == 1:
            out[(name, config)] = name
            continue
        mine = json.loads(config)
        differ = sorted(k for k in set().union(*siblings) if len({json.dumps(s.get(k)) for s in siblings}) > 1)
        out[(name, config)] = f"{name}[{','.join(f'{k}={mine.get(k)}' for k in differ)}]"
    return out


def merge_results(paths: list[str | Path], allow_incomplete: bool = False) -> dict[str, EvalResults]:
    """One merged :class:`EvalResults` per strategy config, labelled by strategy name (plus a config
    suffix such as ``fastv[keep_ratio=0.25]`` when one strategy comes with several configs)."""
    from prunebench.evaluation.paired import episode_key

    if not paths:
        raise PrunebenchError("no results files given")
    files = [(str(p), read_eval_file(p)) for p in paths]
    for path, res in files:
        if not res.complete and not allow_incomplete:
            why = "interrupted" if res.interrupted else f"aborted: {res.aborted}" if res.aborted else "not finished"
            raise PrunebenchError(f"{path}: field 'complete' is false ({why}); --partial merges the "
                                  f"episodes it finished")
    first_path, first = files[0]
    for path, res in files[1:]:
        check_compatible(first, first_path, res, path, same_strategy=_config_key(res) == _config_key(first))
    groups: dict[tuple[str, str], list[tuple[str, EvalResults]]] = {}
    for path, res in files:
        groups.setdefault(_config_key(res), []).append((path, res))
    labels = _labels(list(groups))
    merged = {}
    for key, members in groups.items():
        for path, res in members[1:]:  # dense_reference too, within one strategy
            check_compatible(members[0][1], members[0][0], res, path, same_strategy=True)
        merged[labels[key]] = _merge_group(members, episode_key)
    return merged


def _merge_group(members: list[tuple[str, EvalResults]], episode_key) -> EvalResults:
    seen: dict[tuple, str] = {}
    episodes, init_ids = [], {}
    for path, res in members:
        for e in res.episodes:
            k = episode_key(e)
            if k in seen:
                where = f"{seen[k]} and {path}" if seen[k] != path else f"{path} (twice)"
                raise PrunebenchError(f"field 'episodes': episode (suite, task_id, init_state_id, seed) = "
                                      f"{tuple(k)} of {res.strategy.name} is in {where}; each episode counts once")
            seen[k] = path
            episodes.append(e)
        for task, ids in res.init_state_ids.items():
            init_ids[task] = sorted(set(init_ids.get(task, [])) | set(ids))
    base = members[0][1]
    sources = [{"file": path, "created": r.created, "command": r.command, "complete": r.complete,
                "episodes": len(r.episodes), "tasks": sorted(r.init_state_ids),
                "device": r.environment.get("device"), "torch_threads": r.environment.get("torch_threads"),
                "cores": r.environment.get("cores"), "platform": r.environment.get("platform"),
                "git_hash": r.environment.get("git_hash")} for path, r in members]
    eval_s = sum(r.eval_s for _, r in members)
    merged = base.model_copy(deep=True, update={
        "complete": all(r.complete for _, r in members),
        "interrupted": any(r.interrupted for _, r in members),
        "aborted": next((r.aborted for _, r in members if r.aborted), None),
        "init_state_ids": dict(sorted(init_ids.items())), "eval_s": eval_s,
        # episodes per hour of the shards' summed run time (shards run in parallel go faster)
        "episodes_per_hour": 3600 * len(episodes) / max(eval_s, 1e-9),
        "episodes": sorted(episodes, key=lambda e: (e.suite, e.task_id, e.init_state_id, e.seed)),
    })
    merged.config = {**merged.config, "merged_from": sources}
    return merged.aggregate()
