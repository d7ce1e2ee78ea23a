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
  * `convert: {format: voc, source: DIR, split_dir: ImageSets/Main, suffix: ''}` -- a Pascal-VOC folder
    (`source` relative to the repository root) converted on first use into the cache folder, under a
    name that includes a hash of the source path. Delete that folder to convert again. A list of
    such mappings converts several folders into one dataset (VOC2007 + VOC2012 with suffixes).
  * `download:` as a list of archives ({url, sha256?, size?}, see data/download.py): the archives are
    fetched, verified and extracted into the cache folder `<datasets_dir>/<yaml stem>` (or `path`),
    then `convert` runs with its `source` relative to that folder, and the YAML's optional
    `expected: {split: {images: N, labels: N}}` counts are checked. Ready once a marker is written.
    `convert.local` (a folder or a list, relative to the repository root) names an existing copy of
    the convert source: when one exists it is converted as above and nothing is downloaded.
  * `download:` as text is only shown when the data are missing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import yaml

from utils.files import atomic_dir

LOGGER = logging.getLogger(f"vitdet.{__name__}")
REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_CONFIGS = REPO_ROOT / "configs" / "data"
SPLIT_KEYS = ("train", "val", "test")
CONVERT_FORMATS = ("voc",)


class DatasetYamlError(ValueError, KeyError):
    """A dataset YAML that cannot be used. A ValueError; also a KeyError, which a missing key raised
    before this class existed."""

    __str__ = BaseException.__str__  # KeyError's own would print the message as a quoted repr


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
            raise DatasetYamlError(f"{source}: no 'names' (and no 'nc') key")
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


def _source_hash(sources: list[Path]) -> str:
    return hashlib.sha1("\n".join(map(str, sources)).encode()).hexdigest()[:8]


def _archives_spec(cfg: dict) -> list | None:
    """The `download:` list of archives, or None (absent, or only a text hint)."""
    spec = cfg.get("download")
    return spec if isinstance(spec, list) else None


def _local_sources(cfg: dict, yaml_file: Path | None) -> list[Path] | None:
    """The existing `convert.local` copy of each convert source, or None when one is missing."""
    found = []
    for spec in _convert_specs(cfg, yaml_file):
        local = spec.get("local")
        choices = local if isinstance(local, list) else [local] if local else []
        paths = ((REPO_ROOT / Path(str(c)).expanduser()).resolve() for c in choices)
        existing = [p for p in paths if p.is_dir()]
        if not existing:
            return None
        found.append(existing[0])
    return found or None


def _convert_sources(cfg: dict, yaml_file: Path | None) -> list[Path]:
    """Folders the convert step reads when nothing is downloaded: `local` copies, else `source`s."""
    local = _local_sources(cfg, yaml_file) if _archives_spec(cfg) is not None else None
    return local or [(REPO_ROOT / spec["source"]).resolve() for spec in _convert_specs(cfg, yaml_file)]


def _downloads(cfg: dict, yaml_file: Path | None) -> bool:
    """True when the data come from the `download:` archives (no `convert.local` copy on this machine)."""
    if _archives_spec(cfg) is None:
        return False
    return cfg.get("convert") is None or _local_sources(cfg, yaml_file) is None


def _dataset_root(cfg: dict, yaml_file: Path | None) -> Path:
    stem = yaml_file.stem if yaml_file else "dataset"
    if cfg.get("generate") is not None:
        from data.builtin import default_root

        return default_root(datasets_dir())
    if cfg.get("convert") is not None and not _downloads(cfg, yaml_file):
        return datasets_dir() / f"{stem}-{_source_hash(_convert_sources(cfg, yaml_file))}"
    if cfg.get("path") not in (None, ""):
        return (REPO_ROOT / Path(str(cfg["path"])).expanduser()).resolve()
    if _downloads(cfg, yaml_file):
        return datasets_dir() / stem
    return yaml_file.parent if yaml_file else REPO_ROOT


def _convert_specs(cfg: dict, yaml_file: Path | None) -> list[dict]:
    """`convert:` as a list of {format, source, split_dir?, suffix?, local?} mappings (none when absent)."""
    spec = cfg.get("convert")
    if spec is None:
        return []
    specs = spec if isinstance(spec, list) and spec else [spec]
    for one in specs:
        if not isinstance(one, dict) or one.get("format") not in CONVERT_FORMATS or "source" not in one:
            raise ValueError(
                f"{yaml_file}: 'convert' must be a mapping (or a list of them) with format (one of "
                f"{CONVERT_FORMATS}) and source, got {spec!r}"
            )
    return specs


def _generate(cfg: dict, root: Path, yaml_file: Path | None, names: list[str]) -> None:
    from data.builtin import CLASS_NAMES, ensure_builtin

    if cfg["generate"] != "builtin":
        raise ValueError(f"{yaml_file}: unknown generator {cfg['generate']!r} (known: builtin)")
    if tuple(names) != CLASS_NAMES:
        raise ValueError(f"{yaml_file}: names {names} differ from the built-in dataset's {list(CLASS_NAMES)}")
    ensure_builtin(root)


def _convert_all(specs: list[dict], sources: list[Path], out: Path, final: Path, yaml_file: Path | None,
                 names: list[str]) -> None:
    """Convert each VOC source into `out`, a temporary folder that becomes `final` (several sources
    merge into one dataset.yaml)."""
    from data.convert import voc_to_yolo

    for spec, source in zip(specs, sources):
        if not source.is_dir():
            raise FileNotFoundError(f"{yaml_file}: convert source {source} does not exist")
        LOGGER.info(f"Converting {source} (VOC) into {final} (first use)")
        report = voc_to_yolo(source, out, split_dir=spec.get("split_dir", "ImageSets/Main"), names=names,
                             suffix=str(spec.get("suffix", "")))
        report.yaml_file = final / report.yaml_file.name
        LOGGER.info(str(report))


def _convert(cfg: dict, root: Path, yaml_file: Path | None, names: list[str]) -> None:
    """Convert the VOC source(s) into root once (into a temp folder, then renamed into place)."""
    if root.is_dir():
        return
    specs, sources = _convert_specs(cfg, yaml_file), _convert_sources(cfg, yaml_file)
    with atomic_dir(root, replace=False) as tmp:  # a concurrent converter may win the race: keep its copy
        _convert_all(specs, sources, tmp, root, yaml_file, names)


def _download(cfg: dict, root: Path, yaml_file: Path | None, names: list[str], source: str) -> None:
    """Fetch, verify and extract the `download:` archives into root, convert, check counts, mark ready."""
    from data import download

    archives = download.parse_archives(cfg["download"], source)
    if download.is_complete(root, archives):
        return
    with download.preparation_lock(root):
        if not download.is_complete(root, archives):  # another process may have finished meanwhile
            _prepare_download(cfg, root, yaml_file, names, source, archives)


def _prepare_download(cfg: dict, root: Path, yaml_file: Path | None, names: list[str], source: str,
                      archives: list) -> None:
    from data import download

    download.clear_marker(root)  # an older preparation (other archives) is not ready any more
    download.fetch_and_extract(archives, root)
    specs = _convert_specs(cfg, yaml_file)
    if specs:
        sources = [(root / spec["source"]).resolve() for spec in specs]
        if any(not str(s).startswith(str(root.resolve()) + os.sep) for s in sources):
            raise ValueError(f"{source}: a convert source of a download must stay inside {root}, "
                             f"got {sources}")
        staging = root / f".converted-{os.getpid()}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            _convert_all(specs, sources, staging, root, yaml_file, names)
            kept = {a.name for a in archives} | {download.MARKER, download.LOCK}
            download.move_into(staging, root, keep=kept)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if cfg.get("expected") is not None:
        splits = {k: _resolve_split(cfg.get(k), root) for k in SPLIT_KEYS}
        download.check_expected_counts(cfg["expected"], splits, source, root)
    download.mark_complete(root, archives)
    LOGGER.info(f"{source}: data ready in {root}")


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
            hint = f" {cfg['download']}" if isinstance(cfg.get("download"), str) else ""
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
            raise DatasetYamlError(f"dataset {source}: missing '{key}' key")
    names = names_list(cfg.get("names"), cfg.get("nc"), source)
    root = _dataset_root(cfg, yaml_file)
    if cfg.get("generate") is not None:
        _generate(cfg, root, yaml_file, names)
    elif _downloads(cfg, yaml_file):
        _download(cfg, root, yaml_file, names, source)
    elif cfg.get("convert") is not None:
        _convert(cfg, root, yaml_file, names)
    cfg.update({k: _resolve_split(cfg.get(k), root) for k in SPLIT_KEYS})
    cfg.update(path=str(root), names=names, nc=len(names), yaml_file=str(yaml_file) if yaml_file else None)
    _check_exists(cfg, source)
    return cfg
