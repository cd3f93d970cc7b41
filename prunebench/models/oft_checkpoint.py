"""Read (and, for tests, write) OpenVLA-OFT checkpoints in the released file layout.

A checkpoint directory (or hub id, fetched with huggingface_hub when it is installed) holds:

    config.json                          vision_backbone_id, text_config (Llama), norm_stats (may be
                                         only the base model's)
    model.safetensors[.index.json]       vision_backbone.*, projector.*, language_model.* (sharded)
    proprio_projector--<step>_checkpoint.pt   torch state dict, keys prefixed "module." (DDP)
    action_head--<step>_checkpoint.pt         likewise
    dataset_statistics.json              norm stats written by fine-tuning (read first)
    tokenizer files                      read with transformers.AutoTokenizer

Normalisation statistics come from dataset_statistics.json, else config.json (see read_norm_stats),
and are chosen by suite: ``<suite>``, then ``<suite>_no_noops`` (as OFT's eval does), or the only key
when the checkpoint has one.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from prunebench.contract.errors import PrunebenchError
from prunebench.models.openvla_oft import OFTSpec, OpenVLAOFT
from prunebench.runtime.inputs import parse_file

HEAD_FILES = {"proprio_projector": "proprio_projector--{step}_checkpoint.pt",
              "action_head": "action_head--{step}_checkpoint.pt"}


def is_oft_checkpoint(source: str | Path) -> bool:
    """A local directory with an OFT config.json, or a hub id (``owner/name``: nothing by that name
    here, and not a .safetensors file name)."""
    path = Path(source)
    if path.is_dir():
        return (path / "config.json").is_file() and "vision_backbone_id" in _read_json(path / "config.json")
    hub_id = re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) is not None
    return hub_id and not path.exists() and path.suffix != ".safetensors"


def resolve(source: str | Path) -> Path:
    """The local directory of a checkpoint: as given, or downloaded from the hub."""
    path = Path(source)
    if path.is_dir():
        return path
    return Path(_from_hub(source, lambda hub: hub.snapshot_download(str(source))))


def read_config(source: str | Path) -> dict:
    """A checkpoint's config.json, with its ``text_config`` (the Llama config) checked; from the
    hub only that file is fetched, not the weights."""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    else:
        path = Path(_from_hub(source, lambda hub: hub.hf_hub_download(str(source), "config.json")))
    config = _read_json(path)
    if not isinstance(config.get("text_config"), dict):
        raise PrunebenchError(f"{path}: no 'text_config' object (the Llama config)")
    return config


def _from_hub(source: str | Path, fetch) -> str:
    """``fetch(huggingface_hub)``, or one line that names the checkpoint (not installed, network,
    auth, unknown repo)."""
    try:
        import huggingface_hub
    except ImportError:
        raise PrunebenchError(f"checkpoint {source!r} is not a directory and huggingface_hub is not "
                              "installed to fetch it") from None
    try:
        return fetch(huggingface_hub)
    except Exception as err:  # noqa: BLE001 - one line that names the checkpoint
        raise PrunebenchError(f"checkpoint {source!r}: could not download ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''})") from None


def read_norm_stats(root: Path) -> tuple[dict, str]:
    """The normalisation statistics and the file they came from. Fine-tuning writes the LIBERO statistics
    to dataset_statistics.json, and OFT's evaluation replaces the model's (config.json's, possibly only
    the base model's) by that file whenever it exists (openvla-oft's experiments/robot/openvla_utils.py,
    ``_load_dataset_stats``); config.json's are used only without it."""
    path = root / "dataset_statistics.json"
    if path.is_file():
        return _read_json(path), path.name
    stats = _read_json(root / "config.json").get("norm_stats")
    if not stats:
        raise PrunebenchError(f"checkpoint {root} has no dataset_statistics.json and no norm_stats in config.json")
    return stats, "config.json"


def unnorm_key(norm_stats: dict, suite: str | None, source: str = "checkpoint") -> str:
    keys = sorted(norm_stats)
    if suite is None:
        if len(keys) == 1:
            return keys[0]
        raise PrunebenchError(f"{source} has norm stats for several datasets ({', '.join(keys)}); "
                              "name the suite")
    for key in (suite, f"{suite}_no_noops"):
        if key in norm_stats:
            return key
    raise PrunebenchError(f"{source} has no norm stats for suite {suite!r}; it has: {', '.join(keys)}")


def load_oft(source: str | Path, *, suite: str | None = None, device: str = "cpu",
             dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa") -> OpenVLAOFT:
    """Build the adapter from a checkpoint: every tensor it needs is loaded, or a one-line error."""
    root = resolve(source)
    config = read_config(root)
    norm_stats, stats_file = read_norm_stats(root)
    spec = OFTSpec(vision_backbone_id=config["vision_backbone_id"],
                   image_size=config.get("image_sizes", [224])[0], text_config=config["text_config"])
    tokenizer = _tokenizer(root)
    key = unnorm_key(norm_stats, suite, f"checkpoint's {stats_file}")
    with torch.device(device):
        model = OpenVLAOFT(spec, tokenizer, norm_stats, key, attn_implementation)
    model.to(dtype)  # the rotary inv_freq buffers stay float32 (OpenVLAOFT._apply)
    wanted = model.state_dict()
    loaded: set[str] = set()
    for state in _weight_files(root):
        state = {k: v for k, v in state.items() if not _unused(k, spec)}
        state = {k.replace(".gamma", ".scale_factor"): v for k, v in state.items()}  # timm's own name
        unexpected = sorted(set(state) - set(wanted))
        if unexpected:
            raise PrunebenchError(f"checkpoint {root}: unexpected tensor {unexpected[0]!r} "
                                  f"(and {len(unexpected) - 1} more); is it an OpenVLA-OFT checkpoint?")
        for key, value in state.items():
            if value.shape != wanted[key].shape:
                raise PrunebenchError(f"checkpoint {root}: tensor {key!r} has shape {tuple(value.shape)}, "
                                      f"the model expects {tuple(wanted[key].shape)}")
        model.load_state_dict(state, strict=False)
        loaded |= set(state)
    missing = sorted(set(wanted) - loaded)
    if missing:
        raise PrunebenchError(f"checkpoint {root} lacks tensor {missing[0]!r} (and {len(missing) - 1} more)")
    return model.eval()


def _tokenizer(root: Path):
    """The checkpoint's fast tokenizer, by the class its tokenizer_config.json names (AutoTokenizer
    would first parse config.json, whose model_type "openvla" only OFT's remote code knows)."""
    import transformers

    name = _read_json(root / "tokenizer_config.json").get("tokenizer_class") or "PreTrainedTokenizerFast"
    for candidate in (f"{name.removesuffix('Fast')}Fast", name):  # the fast class first
        if hasattr(transformers, candidate):
            return getattr(transformers, candidate).from_pretrained(str(root))
    if (root / "tokenizer.json").is_file():  # e.g. a class name from a newer transformers
        return transformers.PreTrainedTokenizerFast.from_pretrained(str(root))
    raise PrunebenchError(f"checkpoint {root}: tokenizer class {name!r} is not in transformers")


def _unused(key: str, spec: OFTSpec) -> bool:
    """Tensors the forward never reads: the LM head, and each tower's last block, final norm and
    pooling head (OFT takes the second-to-last block's output)."""
    if key.startswith("language_model.lm_head."):
        return True
    for name, tower in zip(("featurizer", "fused_featurizer"), spec.towers):
        prefix = f"vision_backbone.{name}."
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return rest.startswith((f"blocks.{tower.depth - 1}.", "norm.", "attn_pool.", "head.", "fc_norm."))
    return False


def _weight_files(root: Path):
    """Every state dict of the checkpoint, one at a time (shards are large)."""
    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise PrunebenchError(f"{index}: no 'weight_map' of tensor names to shard files")
        shards = sorted(set(weight_map.values()))
    else:
        shards = [p.name for p in sorted(root.glob("*.safetensors"))]
    if not shards:
        raise PrunebenchError(f"checkpoint {root} has no *.safetensors weights")
    for shard in shards:
        with _bad_file(root / shard):
            state = load_file(str(root / shard))
        yield state
    for module in HEAD_FILES:
        yield {f"{module}.{k}": v for k, v in head_state_dict(root, module).items()}


def head_state_dict(root: Path, module: str) -> dict:
    """The state dict of ``proprio_projector`` or ``action_head`` from its .pt file (the latest step),
    without the DDP "module." prefix."""
    pattern = HEAD_FILES[module]
    files = sorted(root.glob(pattern.format(step="*")),
                   key=lambda p: int(re.search(r"--(\d+)_", p.name).group(1)))
    if not files:
        raise PrunebenchError(f"checkpoint {root} has no {pattern.format(step='<step>')} (L1-regression "
                              "OFT checkpoints ship one)")
    with _bad_file(files[-1]):
        state = torch.load(files[-1], map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise PrunebenchError(f"{files[-1]}: expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _read_json(path: Path) -> dict:
    """A checkpoint's JSON object, or one line naming the file (and the line of a syntax error)."""
    if not path.is_file():
        raise PrunebenchError(f"checkpoint file missing: {path}")
    data = parse_file(path)
    if not isinstance(data, dict):
        raise PrunebenchError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@contextmanager
def _bad_file(path: Path):
    """A weights file that cannot be loaded (truncated, not safetensors / torch) as one line naming it."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - safetensors, pickle and zip errors have no common base
        first = (str(err).strip().splitlines() or [""])[0].split(". ")[0]  # torch's run on and on
        raise PrunebenchError(f"{path}: cannot be loaded ({type(err).__name__}: {first})") from None


def write_checkpoint(model: OpenVLAOFT, root: str | Path, *, step: int = 1, shard_size: int = 1 << 20,
                     extra_tensors: dict | None = None) -> Path:
    """Save ``model`` in the released layout (sharded safetensors with an index, DDP-prefixed .pt
    heads, config.json with norm stats, tokenizer), plus ``extra_tensors`` in the shards (tensors a
    release has that the adapter skips). Used to test the loader without the 15 GB files."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not k.startswith(tuple(HEAD_FILES))}
    state.update(extra_tensors or {})
    shards, current, size = [], {}, 0
    for key, value in state.items():
        current[key] = value
        size += value.numel() * value.element_size()
        if size >= shard_size:
            shards.append(current)
            current, size = {}, 0
    shards += [current] if current else []
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for module, pattern in HEAD_FILES.items():
        sub = getattr(model, module).state_dict()
        torch.save({f"module.{k}": v for k, v in sub.items()}, root / pattern.format(step=step))
    config = {"architectures": ["OpenVLAForActionPrediction"], "model_type": "openvla",
              "vision_backbone_id": model.cfg.vision_backbone_id, "image_sizes": [model.cfg.image_size] * 2,
              "use_fused_vision_backbone": True, "text_config": model.cfg.text_config,
              "norm_stats": model.norm_stats}
    (root / "config.json").write_text(json.dumps(config, indent=1))
    (root / "dataset_statistics.json").write_text(json.dumps(model.norm_stats, indent=1))
    model.tokenizer.save_pretrained(str(root))
    return root
