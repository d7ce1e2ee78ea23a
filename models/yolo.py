"""The YAML model graph: `parse_model`, the `Detect` head and `DetectionModel`.

A model YAML lists rows `[from, number, module, args]` (YOLOv5's format). Modules are looked up by name
in `MODULES` or in the backbone registry; nothing in a YAML is evaluated. A backbone row occupies layer
indices 0..4, one slot per stride 2, 4, 8, 16, 32 (slot k holds stride 2**(k+1)); the rows after it are
numbered from 5. See the design page for the full contract.
"""

from __future__ import annotations

import copy
import difflib
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.backbones import BACKBONES, Backbone
from models.backbones.layers import reparameterize_modules
from models.common import SPP, SPPF, C3, BottleneckCSP, Bottleneck, Concat, Conv, DWConv, Focus
from models.heads import DetectAF
from utils.general import make_divisible, resolve_config, yaml_load

LOGGER = logging.getLogger("vitdet." + __name__)

NUM_SLOTS = 5  # backbone slots 0..4 hold strides 2, 4, 8, 16, 32
PROBE_SIZE = 256  # square input used at build time to read strides and check backbone outputs


class Detect(nn.Module):
    """YOLOv5 detection head: a 1x1 conv per level predicting na x (5 + nc) values per cell.

    Train mode returns raw maps [(B, na, ny, nx, 5 + nc)] per level. Eval mode decodes them into
    (B, sum(na*ny*nx), 5 + nc) rows [x, y, w, h (pixels of the input), obj, cls...] with
    xy = (2*sigmoid + grid - 0.5) * stride and wh = (2*sigmoid)**2 * anchor, and returns
    (decoded, raw maps) -- or only `decoded` when `export` is set.
    `anchors` (nl, na, 2) are in stride units once the model is built; `stride` is read from the maps.
    """

    export = False  # set by export.py: return only the decoded tensor

    def __init__(self, nc: int = 80, anchors: list = (), ch: list[int] = (), inplace: bool = True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.register_buffer("stride", torch.ones(self.nl), persistent=False)
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in ch)
        self.inplace = inplace

    def forward(self, x: list[torch.Tensor]):
        z = []
        x = list(x)
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                z.append(self._decode(x[i], i))
        if self.training:
            return x
        return torch.cat(z, 1) if self.export else (torch.cat(z, 1), x)

    def _decode(self, p: torch.Tensor, i: int) -> torch.Tensor:
        """(B, na, ny, nx, no) logits of level i -> (B, na*ny*nx, no) boxes in input pixels.

        The grid is rebuilt on every call from the map size, dtype and device (no cache that could go
        stale after an anchor update, a dtype change or a different input size).
        """
        bs, _, ny, nx, _ = p.shape
        grid, anchor_grid = self._make_grid(nx, ny, i, p.dtype, p.device)
        xy, wh, conf = p.sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + grid) * self.stride[i].to(p.dtype)
        wh = (wh * 2) ** 2 * anchor_grid
        return torch.cat((xy, wh, conf), 4).view(bs, self.na * ny * nx, self.no)

    def _make_grid(self, nx: int, ny: int, i: int, dtype: torch.dtype, device: torch.device):
        shape = 1, self.na, ny, nx, 2
        y = torch.arange(ny, device=device, dtype=dtype)
        x = torch.arange(nx, device=device, dtype=dtype)
        yv, xv = torch.meshgrid(y, x, indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # offset so that xy = 2*sig - 0.5 + cell
        anchor_grid = (self.anchors[i] * self.stride[i]).to(dtype).view(1, self.na, 1, 1, 2).expand(shape)
        return grid, anchor_grid

    def sort_anchors_by_stride(self) -> None:
        """Reverse the anchor order if it runs against the stride order (YOLOv5's check_anchor_order)."""
        area = self.anchors.prod(-1).mean(-1).view(-1)
        da, ds = area[-1] - area[0], self.stride[-1] - self.stride[0]
        if da and da.sign() != ds.sign():
            LOGGER.info("Reversing anchor order to match the stride order")
            self.anchors[:] = self.anchors.flip(0)


class BackboneSlot(nn.Module):
    """Placeholder that keeps layer indices 1..4 for a backbone node; holds no parameters.

    `stride` and `channels` describe the backbone output stored in this slot (channels None when the
    backbone does not produce that stride).
    """

    def __init__(self, slot: int, channels: int | None):
        super().__init__()
        self.slot, self.stride, self.channels = slot, 2 ** (slot + 1), channels

    def forward(self, x):  # never called: DetectionModel fills the slot when the backbone runs
        return x


MODULES: dict[str, type[nn.Module]] = {
    "Conv": Conv,
    "DWConv": DWConv,
    "Bottleneck": Bottleneck,
    "BottleneckCSP": BottleneckCSP,
    "C3": C3,
    "SPP": SPP,
    "SPPF": SPPF,
    "Focus": Focus,
    "Concat": Concat,
    "Detect": Detect,
    "DetectAF": DetectAF,
    "nn.Upsample": nn.Upsample,
    "nn.Identity": nn.Identity,
    "nn.BatchNorm2d": nn.BatchNorm2d,
}
CONV_LIKE = (Conv, DWConv, Bottleneck, BottleneckCSP, C3, SPP, SPPF, Focus)
REPEATS_AS_ARG = (BottleneckCSP, C3)  # `number` goes into the block instead of stacking copies


class ModelConfigError(ValueError):
    """A model YAML that cannot be built; the message names the row."""


def _row_error(i: int, row: Any, message: str) -> ModelConfigError:
    return ModelConfigError(f"model YAML row {i} {row}: {message}")


def _resolve_arg(arg: Any, symbols: dict[str, Any]) -> Any:
    """Replace the symbols a YAML argument may name ('nc', 'anchors', 'None'); leave other values."""
    if isinstance(arg, str) and arg in symbols:
        return symbols[arg]
    return arg


def _absolute_sources(f: int | list[int], i: int) -> list[int]:
    return [j if j >= 0 else i + j for j in ([f] if isinstance(f, int) else f)]


def _lookup_module(name: Any, i: int, row: Any) -> tuple[str, type[nn.Module] | None]:
    """('backbone', None) for registry names, ('module', cls) for MODULES names; errors list close names."""
    if not isinstance(name, str):
        raise _row_error(i, row, f"module must be a name, got {name!r}")
    if name in MODULES:
        return "module", MODULES[name]
    if name in BACKBONES:
        return "backbone", None
    known = list(MODULES) + BACKBONES.names()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise _row_error(i, row, f"unknown module {name!r}.{hint} Known modules: {', '.join(known)}")


def _check_row(i: int, row: Any) -> tuple[Any, int, Any, list]:
    if not (isinstance(row, (list, tuple)) and len(row) == 4):
        raise _row_error(i, row, "expected [from, number, module, args]")
    f, n, m, args = row
    sources = [f] if isinstance(f, int) else f
    if not (isinstance(sources, list) and sources and all(isinstance(j, int) for j in sources)):
        raise _row_error(i, row, f"'from' must be an int or a list of ints, got {f!r}")
    if any(j >= i or (j != -1 and i + j < 0) for j in sources):
        raise _row_error(i, row, f"'from' {f!r} must name earlier layers (0..{i - 1} or negative offsets)")
    if not (isinstance(n, int) and n >= 1):
        raise _row_error(i, row, f"'number' must be a positive int, got {n!r}")
    if not isinstance(args, list):
        raise _row_error(i, row, f"'args' must be a list, got {args!r}")
    return f, n, m, args


def _backbone_request(row: list, name: str, args: list, i: int) -> tuple[str | None, dict]:
    """Split backbone args into (variant, options): [variant], [{arch: v, weights: ...}] or [] (alias)."""
    if len(args) > 1:
        raise _row_error(i, row, f"backbone {name} takes one argument (variant or mapping), got {args}")
    if not args:
        return None, {}
    arg = args[0]
    if isinstance(arg, dict):
        options = dict(arg)
        variant = options.pop("arch", options.pop("variant", None))
        return variant, options
    return str(arg), {}


def _slots_read(rows: list, first: int) -> set[int]:
    """Backbone slots (0..4) that rows after the backbone read; row 5's -1 is the deepest slot (4)."""
    read = set()
    for i in range(first, len(rows)):
        f = rows[i][0]
        read.update(j for j in _absolute_sources(f, i) if j < NUM_SLOTS)
    return read


def _build_backbone_row(rows: list, row: list, i: int):
    """Build the backbone of row 0; returns (module, slot channels list of length 5, slots read)."""
    f, n, name, args = row
    if i != 0:
        raise _row_error(i, row, f"backbone {name} must be the first row (it fills layers 0..4)")
    if f != -1 or n != 1:
        raise _row_error(i, row, f"backbone {name} must read the input (from -1) once (number 1)")
    if len(rows) <= NUM_SLOTS:
        raise _row_error(i, row, "a backbone row must be followed by the rest of the model")
    variant, options = _backbone_request(row, name, args, i)
    read = _slots_read(rows, NUM_SLOTS) | {NUM_SLOTS - 1}  # the deepest slot always feeds row 5
    strides = sorted(2 ** (k + 1) for k in read)
    try:
        backbone = BACKBONES.build(name, variant, out_strides=strides, **options)
    except (ValueError, TypeError) as err:
        readers = _readers_of_slots(rows, read)
        raise _row_error(i, row, f"cannot build backbone {name} for strides {strides} ({readers}): {err}") from err
    produced = dict(zip(backbone.out_strides, backbone.out_channels))
    for k in sorted(read):
        if 2 ** (k + 1) not in produced:
            reader = _first_reader(rows, k)
            raise _row_error(
                reader, rows[reader],
                f"reads layer {k}, the empty backbone slot for stride {2 ** (k + 1)}; {name} produces "
                f"strides {tuple(backbone.out_strides)}",
            )
    if max(backbone.out_strides) != 2 ** NUM_SLOTS:
        raise _row_error(i, row, f"{name}'s deepest output has stride {max(backbone.out_strides)}; the YAML "
                                 f"expects stride {2 ** NUM_SLOTS} in slot {NUM_SLOTS - 1}")
    slot_channels = [produced.get(2 ** (k + 1)) for k in range(NUM_SLOTS)]
    return backbone, slot_channels


def _first_reader(rows: list, slot: int) -> int:
    for i in range(NUM_SLOTS, len(rows)):
        if slot in _absolute_sources(rows[i][0], i):
            return i
    return NUM_SLOTS


def _readers_of_slots(rows: list, slots: set[int]) -> str:
    return ", ".join(f"row {_first_reader(rows, k)} reads slot {k}" for k in sorted(slots))


def _module_args(m, f, n, args, ch, symbols, gd, gw, no, i, row):
    """YOLOv5's channel and repeat arithmetic: returns (args, number, out_channels)."""
    args = [_resolve_arg(a, symbols) for a in args]
    n = max(round(n * gd), 1) if n > 1 else n
    sources = _absolute_sources(f, i)
    in_ch = [ch[j] for j in sources]
    if any(c is None for c in in_ch):
        k = next(j for j, c in zip(sources, in_ch) if c is None)
        raise _row_error(i, row, f"reads layer {k}, an empty backbone slot (stride {2 ** (k + 1)})")
    if m in CONV_LIKE:
        out_ch = args[0] if args else None
        if not (isinstance(out_ch, int) and not isinstance(out_ch, bool) and out_ch > 0):
            raise _row_error(i, row, f"{row[2]}'s first argument is its output channels, a positive integer; "
                                     f"got {out_ch!r}")
        if out_ch != no:
            out_ch = make_divisible(out_ch * gw, 8)
        args = [in_ch[0], out_ch, *args[1:]]
        if m in REPEATS_AS_ARG:
            args.insert(2, n)
            n = 1
    elif m is nn.BatchNorm2d:
        args, out_ch = [in_ch[0]], in_ch[0]
    elif m is Concat:
        out_ch = sum(in_ch)
    elif m is Detect:
        args.append(in_ch)
        if isinstance(args[1], int):  # number of anchors per level: placeholder anchors
            args[1] = [list(range(args[1] * 2))] * len(sources)
        out_ch = None
    elif m is DetectAF:
        args.insert(1, in_ch)  # DetectAF(nc, ch, reg_max=16, branches="conv")
        out_ch = None
    else:
        out_ch = in_ch[0]
    return args, n, out_ch


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _anchors_problem(anchors: Any) -> str | None:
    if isinstance(anchors, int) and not isinstance(anchors, bool):
        return None if anchors > 0 else f"'anchors' must be a positive count or a list of levels, got {anchors}"
    levels_ok = isinstance(anchors, list) and anchors and all(
        isinstance(level, list) and level and len(level) % 2 == 0 and all(_is_number(v) and v > 0 for v in level)
        for level in anchors)
    if not levels_ok:
        return (f"'anchors' must be a list of levels, each an even-length list of positive pixel sizes "
                f"[w0, h0, w1, h1, ...] (or an anchor count), got {anchors!r}")
    return None


def check_model_dict(d: dict) -> None:
    """The top-level keys of a model YAML, all problems in one ModelConfigError: nc a positive int,
    depth_multiple and width_multiple positive numbers, anchors, and backbone/head lists of rows."""
    required = ("nc", "depth_multiple", "width_multiple", "anchors", "backbone", "head")
    if not _uses_anchors(d):
        required = tuple(k for k in required if k != "anchors")  # an anchor-free head needs none
    problems = [f"missing the key {key!r}" for key in required if key not in d]
    if "nc" in d and not (isinstance(d["nc"], int) and not isinstance(d["nc"], bool) and d["nc"] > 0):
        problems.append(f"'nc' (number of classes) must be a positive integer, got {d['nc']!r}")
    for key in ("depth_multiple", "width_multiple"):
        if key in d and not (_is_number(d[key]) and d[key] > 0):
            problems.append(f"{key!r} must be a positive number (e.g. 0.33), got {d[key]!r}")
    if "anchors" in d and (problem := _anchors_problem(d["anchors"])):
        problems.append(problem)
    for key in ("backbone", "head"):
        if key in d and not (isinstance(d[key], list) and d[key]):
            problems.append(f"{key!r} must be a non-empty list of [from, number, module, args] rows")
    if problems:
        raise ModelConfigError("model YAML: " + "; ".join(problems))


def _uses_anchors(d: dict) -> bool:
    """Whether some row of the model dict is the anchor-based Detect (anchor-free YAMLs have no anchors)."""
    rows = [r for key in ("backbone", "head") if isinstance(d.get(key), list) for r in d[key]]
    return any(isinstance(r, (list, tuple)) and len(r) == 4 and r[2] == "Detect" for r in rows)


def parse_model(d: dict, ch: list[int]) -> tuple[nn.Sequential, list[int]]:
    """Build the layers of a model dict (a parsed YAML); returns (nn.Sequential, sorted saved indices)."""
    check_model_dict(d)
    nc, gd, gw, anchors = d["nc"], d["depth_multiple"], d["width_multiple"], d.get("anchors", 0)
    na = len(anchors[0]) // 2 if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    symbols = {"nc": nc, "anchors": anchors, "None": None}
    rows = _layer_rows(list(d["backbone"]) + list(d["head"]))
    layers, save, ch = [], [], list(ch)
    for i, row in enumerate(rows):
        if row is None:
            continue  # slots 1..4, built with the backbone row
        f, n, name, args = _check_row(i, row)
        kind, m = _lookup_module(name, i, row)
        if kind == "backbone":
            backbone, slot_channels = _build_backbone_row(rows, list(row), i)
            layers.append(_tag(backbone, 0, -1, name))
            layers.extend(_tag(BackboneSlot(k, slot_channels[k]), k, -1, "slot") for k in range(1, NUM_SLOTS))
            ch = slot_channels
            continue
        try:
            args, n, out_ch = _module_args(m, f, n, args, ch, symbols, gd, gw, no, i, row)
        except (TypeError, IndexError) as err:
            raise _row_error(i, row, f"its arguments {args} do not fit {name}: {err}") from err
        try:
            module = nn.Sequential(*(m(*args) for _ in range(n))) if n > 1 else m(*args)
        except (TypeError, ValueError) as err:
            raise _row_error(i, row, f"{name}{tuple(args)} failed: {err}") from err
        save.extend(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
        layers.append(_tag(module, i, f, name))
        if i == 0:
            ch = []
        ch.append(out_ch)
    return nn.Sequential(*layers), sorted(set(save))


def _layer_rows(rows: list) -> list:
    """Rows indexed by layer: a backbone in the first row is followed by 4 empty rows for slots 1..4."""
    first = rows[0] if rows else None
    if isinstance(first, (list, tuple)) and len(first) == 4 and isinstance(first[2], str) and first[2] in BACKBONES:
        return [first] + [None] * (NUM_SLOTS - 1) + rows[1:]
    return rows


def _tag(module: nn.Module, i: int, f, type_name: str) -> nn.Module:
    module.i, module.f, module.type = i, f, type_name
    module.np = sum(p.numel() for p in module.parameters())
    return module


def load_model_config(cfg: str | Path | dict) -> dict:
    """A deep copy of the model dict from a dict, a YAML path or a bare name in configs/models/."""
    if isinstance(cfg, dict):
        return copy.deepcopy(cfg)
    path = resolve_config(cfg, "models")
    d = yaml_load(path)
    d.setdefault("yaml_file", path.name)
    return d


class DetectionModel(nn.Module):
    """A YOLOv5-style detector built from a model YAML (path, bare name or dict)."""

    def __init__(self, cfg: str | Path | dict = "yolov5s.yaml", ch: int = 3, nc: int | None = None,
                 anchors: list | None = None):
        super().__init__()
        self.yaml = load_model_config(cfg)
        source = self.yaml.get("yaml_file", "model dict") if isinstance(cfg, dict) else str(cfg)
        try:
            check_model_dict(self.yaml)
        except ModelConfigError as err:
            raise ModelConfigError(f"{source}: {err}") from None
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            self.yaml["anchors"] = anchors
        try:
            self.model, self.save = parse_model(copy.deepcopy(self.yaml), ch=[ch])
        except ModelConfigError as err:
            raise ModelConfigError(f"{source}: {err}") from err.__cause__
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.nc = self.yaml["nc"]
        detect = self.model[-1]
        if not isinstance(detect, (Detect, DetectAF)):
            raise ModelConfigError(f"the last row of the model YAML must be Detect or DetectAF, got "
                                   f"{detect.type}")
        self._init_strides(detect, ch)
        self.stride = detect.stride.clone()
        self._initialize_biases()

    # -- build-time probing ------------------------------------------------------------------
    def _init_strides(self, detect: Detect | DetectAF, ch: int) -> None:
        """Run one probe forward: read Detect's strides from its maps and check the backbone outputs."""
        was_training = self.training
        self.eval()
        with torch.no_grad():
            shapes = self._probe_detect_inputs(torch.zeros(1, ch, PROBE_SIZE, PROBE_SIZE))
        self.train(was_training)
        detect.stride.copy_(torch.tensor([PROBE_SIZE / s[-2] for s in shapes]))
        if isinstance(detect, DetectAF):
            return
        detect.sort_anchors_by_stride()
        detect.anchors /= detect.stride.view(-1, 1, 1)

    def _probe_detect_inputs(self, x: torch.Tensor) -> list[torch.Size]:
        captured = []
        hook = self.model[-1].register_forward_pre_hook(lambda m, args: captured.extend(t.shape for t in args[0]))
        try:
            self._forward_once(x, check=True)
        finally:
            hook.remove()
        return captured

    def _initialize_biases(self) -> None:
        """YOLOv5's prior: objectness ~8 objects per 640 image per level, classes ~0.6/nc."""
        detect = self.model[-1]
        if isinstance(detect, DetectAF):
            detect.initialize_biases()
            return
        for conv, s in zip(detect.m, detect.stride):
            b = conv.bias.view(detect.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5 : 5 + detect.nc] += math.log(0.6 / (detect.nc - 0.99999))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor):
        """Train: list of raw maps (B, na, ny, nx, 5+nc). Eval: (decoded (B, N, 5+nc), raw maps)."""
        return self._forward_once(x)

    def _forward_once(self, x: torch.Tensor, check: bool = False):
        y: list[torch.Tensor | None] = []
        for m in self.model:
            if isinstance(m, BackboneSlot):
                continue  # filled when the backbone ran
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if isinstance(m, Backbone):
                outputs = m(x)
                if check:
                    _check_backbone_outputs(m, outputs, x.shape)
                slots: list[torch.Tensor | None] = [None] * NUM_SLOTS
                for stride, out in zip(m.out_strides, outputs):
                    slots[int(math.log2(stride)) - 1] = out
                y.extend(slots)
                x = outputs[-1]
                continue
            x = m(x)
            y.append(x if m.i in self.save else None)
        return x

    # -- deployment ------------------------------------------------------------------------------
    def fuse(self) -> DetectionModel:
        """Fold every Conv+BN of the neck and reparameterise every backbone, in place (for inference).

        The shared fuse walker calls `reparameterize()` on each outermost module that has one: YOLOv5's
        `Conv` folds its BN, a backbone folds its own blocks. Exact for eval-mode outputs, idempotent.
        """
        reparameterize_modules(self)
        return self

    def info(self, imgsz: int | tuple[int, int] = 640, verbose: bool = False) -> dict[str, float]:
        """Log and return layers, parameters, gradients and GFLOPs at the real input size."""
        from utils.torch_utils import model_info

        return model_info(self, imgsz=imgsz, verbose=verbose)


def _check_backbone_outputs(backbone: Backbone, outputs: list[torch.Tensor], input_shape: torch.Size) -> None:
    """The real outputs of a backbone must match its declared out_strides/out_channels."""
    name = f"{type(backbone).__name__} (layer 0)"
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(backbone.out_strides):
        count = len(outputs) if isinstance(outputs, (list, tuple)) else type(outputs).__name__
        raise ModelConfigError(f"{name} returned {count} outputs but declares strides {backbone.out_strides}")
    h, w = input_shape[-2:]
    for out, stride, channels in zip(outputs, backbone.out_strides, backbone.out_channels):
        expected = (channels, math.ceil(h / stride), math.ceil(w / stride))
        if tuple(out.shape[1:]) != expected:
            raise ModelConfigError(
                f"{name} declares stride {stride} with {channels} channels, i.e. a map of {expected} for a "
                f"{h}x{w} input, but returned {tuple(out.shape[1:])}"
            )


Model = DetectionModel  # YOLOv5's alias
