"""Dataset YAML: find it, read it, resolve its paths, prepare generated/converted data (check_dataset).

The YAML is YOLOv5's:

    path: ../datasets/coco    # dataset root (see below)
    train: images/train2017   # folder, .txt list of images, or a list of those; relative to `path`
    val: images/val2017
    test: test-dev2017.txt    # optional
    names: {0: person, 1: bicycle}   # or a list; nc is derived (a given nc must agree)

Rules where YOLOv5 users might guess differently:
  * `path` relative: relative to the repository root (as YOLOv5 resolves it against its own root),
    so `../datasets/coco` is a folder beside the repository. Absent: the YAML's own folder (the
    datasets our converters write carry no `path` and can be moved).
  * `generate: builtin` -- the built-in dataset; `path` is the cache folder (see datasets_dir()) and
    the data are generated there on first use.
  * `convert: {format: voc, source: DIR, split_dir: ImageSets/Main}` -- a Pascal-VOC folder (`source`
    relative to the repository root) converted on first use into the cache folder, under a name
    that includes a hash of the source path. Delete that folder to convert again.
  * `download:` is only text shown when the data are missing; nothing is ever downloaded or run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import yaml

from utils.files import atomic_dir

LOGGER = logging.getLogger(f"vitdet.{__name__}")
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_CONFIGS = REPO_ROOT / "configs" / "data"
SPLIT_KEYS = ("train", "val", "test")
CONVERT_FORMATS = ("voc",)


def datasets_dir() -> Path:
    """Where generated and converted datasets live: $VITDET_DATASETS, else ~/.cache/vitdet/datasets."""
    env = os.environ.get("VITDET_DATASETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vitdet" / "datasets"


def resolve_data_yaml(data: str | Path) -> Path:
    """A dataset YAML path; a bare name (with or without .yaml) is also looked up in configs/data/."""
    p = Path(data).expanduser()
    candidates = [p] if p.suffix else [p.with_suffix(".yaml"), p.with_suffix(".yml")]
    if len(p.parts) == 1:
        candidates += [DATA_CONFIGS / c.name for c in candidates]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    known = ", ".join(sorted(f.name for f in DATA_CONFIGS.glob("*.yaml")))
    raise FileNotFoundError(
        f"dataset YAML '{data}' not found (looked for {', '.join(map(str, candidates))}); "
        f"configs/data has: {known}"
    )


def read_yaml(yaml_file: Path) -> dict:
    """The YAML's mapping; a clear error when the file is not a mapping."""
    with open(yaml_file, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    if not isinstance(content, dict):
        kind = type(content).__name__
        raise ValueError(f"{yaml_file}: expected a mapping with train/val/names, got {kind}")
    return content


def names_list(names, nc, source: str) -> list[str]:
    """`names` as a list or {id: name} (ids 0..n-1) -> list of str; checks a given `nc` agrees."""
    if names is None:
        if nc is None:
            raise KeyError(f"{source}: no 'names' (and no 'nc') key")
        names = [f"class{i}" for i in range(int(nc))]
    if isinstance(names, dict):
        try:
            by_id = {int(k): str(v) for k, v in names.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: 'names' keys must be integer class ids ({e})") from None
        if sorted(by_id) != list(range(len(by_id))):
            last = len(by_id) - 1
            raise ValueError(f"{source}: 'names' ids must be 0..{last} without gaps, got {sorted(by_id)}")
        names = [by_id[i] for i in range(len(by_id))]
    elif isinstance(names, (list, tuple)):
        names = [str(n) for n in names]
    else:
        raise ValueError(f"{source}: 'names' must be a list or a mapping, got {type(names).__name__}")
    if nc is not None and int(nc) != len(names):
        raise ValueError(f"{source}: nc={nc} but 'names' has {len(names)} entries")
    if not names:
        raise ValueError(f"{source}: 'names' is empty")
    return names


def _source_hash(source: Path) -> str:
    return hashlib.sha1(str(source).encode()).hexdigest()[:8]


def _dataset_root(cfg: dict, yaml_file: Path | None) -> Path:
    if cfg.get("generate") is not None:
        from data.builtin import default_root

        return default_root(datasets_dir())
    if cfg.get("convert") is not None:
        source = (REPO_ROOT / _convert_spec(cfg, yaml_file)["source"]).resolve()
        stem = yaml_file.stem if yaml_file else "dataset"
        return datasets_dir() / f"{stem}-{_source_hash(source)}"
    if cfg.get("path") not in (None, ""):
        return (REPO_ROOT / Path(str(cfg["path"])).expanduser()).resolve()
    return yaml_file.parent if yaml_file else REPO_ROOT


def _convert_spec(cfg: dict, yaml_file: Path | None) -> dict:
    spec = cfg["convert"]
    if not isinstance(spec, dict) or spec.get("format") not in CONVERT_FORMATS or "source" not in spec:
        raise ValueError(
            f"{yaml_file}: 'convert' must be a mapping with format (one of {CONVERT_FORMATS}) and source, "
            f"got {spec!r}"
        )
    return spec


def _generate(cfg: dict, root: Path, yaml_file: Path | None, names: list[str]) -> None:
    from data.builtin import CLASS_NAMES, ensure_builtin

    if cfg["generate"] != "builtin":
        raise ValueError(f"{yaml_file}: unknown generator {cfg['generate']!r} (known: builtin)")
    if tuple(names) != CLASS_NAMES:
        raise ValueError(f"{yaml_file}: names {names} differ from the built-in dataset's {list(CLASS_NAMES)}")
    ensure_builtin(root)


def _convert(cfg: dict, root: Path, yaml_file: Path | None, names: list[str]) -> None:
    """Convert the VOC source into root once (into a temp folder, then renamed into place)."""
    if root.is_dir():
        return
    from data.convert import voc_to_yolo

    spec = _convert_spec(cfg, yaml_file)
    source = (REPO_ROOT / spec["source"]).resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"{yaml_file}: convert source {source} does not exist")
    LOGGER.info(f"Converting {source} (VOC) into {root} (first use)")
    with atomic_dir(root, replace=False) as tmp:  # a concurrent converter may win the race: keep its copy
        report = voc_to_yolo(source, tmp, split_dir=spec.get("split_dir", "ImageSets/Main"), names=names)
    report.yaml_file = root / report.yaml_file.name
    LOGGER.info(str(report))


def _resolve_split(value, root: Path):
    """A split entry (str or list) -> absolute str (or list of str); None stays None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [str((root / Path(str(v)).expanduser()).resolve()) for v in value]
    return str((root / Path(str(value)).expanduser()).resolve())


def _check_exists(cfg: dict, source: str) -> None:
    """train/val paths must exist; a missing optional test split is dropped with a warning."""
    for key in SPLIT_KEYS:
        value = cfg.get(key)
        paths = value if isinstance(value, list) else [value] if value else []
        missing = [p for p in paths if not os.path.exists(p)]
        if missing and key == "test":
            LOGGER.warning(f"dataset {source}: test path {missing[0]} does not exist; no test split")
            cfg["test"] = None
        elif missing:
            hint = f" {cfg['download']}" if cfg.get("download") else ""
            raise FileNotFoundError(f"dataset {source}: '{key}' path {missing[0]} does not exist.{hint}")


def check_dataset(data: str | Path | dict) -> dict:
    """Read and resolve a dataset YAML (path, bare name in configs/data/, or an already-read dict).

    Returns the YAML's keys plus: path (str, absolute root), train/val/test (absolute str or list of
    str; test may be None), names (list of str), nc (int), yaml_file (str or None). Generates or
    converts the data first when the YAML says so. Raises FileNotFoundError naming a missing path.
    """
    if isinstance(data, dict):
        cfg, yaml_file = dict(data), Path(data["yaml_file"]) if data.get("yaml_file") else None
    else:
        yaml_file = resolve_data_yaml(data)
        cfg = read_yaml(yaml_file)
    source = str(yaml_file) if yaml_file else "(dict)"
    for key in ("train", "val"):
        if key not in cfg:
            raise KeyError(f"dataset {source}: missing '{key}' key")
    names = names_list(cfg.get("names"), cfg.get("nc"), source)
    root = _dataset_root(cfg, yaml_file)
    if cfg.get("generate") is not None:
        _generate(cfg, root, yaml_file, names)
    elif cfg.get("convert") is not None:
        _convert(cfg, root, yaml_file, names)
    cfg.update({k: _resolve_split(cfg.get(k), root) for k in SPLIT_KEYS})
    cfg.update(path=str(root), names=names, nc=len(names), yaml_file=str(yaml_file) if yaml_file else None)
    _check_exists(cfg, source)
    return cfg
