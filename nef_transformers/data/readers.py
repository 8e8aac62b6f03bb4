"""Readers for released neural-field weights: the Neural Field Arena (fit-a-nef, HDF5) and HyperDiffusion
(one torch ``.pth`` state dict per shape). Both produce a canonical weight `datasets.Dataset`
(`make_weight_dataset`): flat float32 ``weights`` in `SirenSpec` order, ``label``, ``index``, and metadata.

- Neural Field Arena (https://github.com/samuelepapa/neural-field-arena, fitted with
  https://github.com/samuelepapa/fit-a-nef): ``NEF_PATH/<DATASET>/<NEF>/nefs_<start>-<end>.hdf5`` with ``params``
  ``(n, P)`` float32 in Flax layout (per layer bias *before* kernel, kernels ``(in, out)``), ``param_config`` (a
  ``(1,)`` string dataset holding the JSON list of ``[name, shape]`` in flattening order) and ``labels``; beside
  them ``nef.json`` (architecture) and an optional ``metadata.json`` (per-file parameter mean/std).
- HyperDiffusion (https://github.com/Rgtemze/HyperDiffusion): ``MLP3D`` state dicts ``layers.{l}.weight``
  ``(out, in)`` / ``layers.{l}.bias``: a ReLU MLP on the NeRF positional encoding of the coordinates
  (`positional_encoding`), occupancy logits.

Axis legend: ``b`` fields, ``p`` flat parameters.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fields.spec import SirenSpec
from .images import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD
from .metadata import attach_metadata, make_weight_dataset

logger = logging.getLogger(__name__)

# Rows converted at once: ~64 MB of float32 per chunk, whatever the width of a field.
CHUNK_BYTES = 1 << 26

# The Arena's fixed row ranges per split (ANCHORS.md), keyed by the lower-cased <DATASET> folder name.
ARENA_SPLITS = {
    "mnist": {"train": (0, 55000), "val": (55000, 60000), "test": (60000, 70000)},
    "cifar10": {"train": (0, 45000), "val": (45000, 50000), "test": (50000, 60000)},
    "microimagenet": {"train": (0, 45000), "val": (45000, 50000), "test": (50000, 60000)},
    "shapenet": {"train": (0, 27840), "val": (27840, 31320), "test": (31320, 34800)},
}

# What the Arena's image data sets need to be rendered: fit-a-nef's normalisation (dataset/image_dataset/utils.py)
# and image shape. MicroImageNet is 64×64 RGB as in images.py; its ten classes are fit-a-nef's selection order.
ARENA_IMAGE_SOURCES = {
    "mnist": {"image_shape": [28, 28, 1], "mean": list(MNIST_MEAN), "std": list(MNIST_STD),
              "class_names": [str(d) for d in range(10)]},
    "cifar10": {"image_shape": [32, 32, 3], "mean": list(CIFAR10_MEAN), "std": list(CIFAR10_STD),
                "class_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                                "truck"]},
    "microimagenet": {"image_shape": [64, 64, 3], "mean": [0.4643375754356384, 0.4339415729045868, 0.38213176727294923],
                      "std": [0.18949764454628706, 0.18707174788855566, 0.21445986703967326],
                      "class_names": ["amphibian", "electronic_equipment", "birds", "primates", "dogs", "cats",
                                      "houses", "fungus", "trucks", "cars"]},
}

_ARENA_FILE = re.compile(r"^(?P<name>.+)_(?P<start>\d+)-(?P<end>\d+)\.hdf5$")
_FLAX_KERNEL_NET = re.compile(r"^kernel_net_(?P<layer>\d+)\.linear\.(?P<kind>kernel|bias)$")
_FLAX_OUTPUT = re.compile(r"^output_linear\.(?P<kind>kernel|bias)$")
_TORCH_LAYER = re.compile(r"^layers\.(?P<layer>\d+)\.(?P<kind>weight|bias)$")


def _chunk_rows(num_params: int) -> int:
    return max(1, CHUNK_BYTES // (4 * num_params))


def _assemble(chunks: Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]], spec: SirenSpec, shared_init, source: dict):
    """Build one weight dataset from ``(weights (b, p), labels (b,), index (b,))`` chunks without a second full copy:
    each chunk becomes its own Arrow table and the tables are concatenated, not copied."""
    from datasets import concatenate_datasets

    parts = [make_weight_dataset(weights, labels, spec, None, source={}, index=index) for weights, labels, index in chunks]
    dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return attach_metadata(dataset, spec, shared_init, source)


def _check_finite(weights: np.ndarray, index: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(weights).all(axis=1)
    if bad.any():
        rows = index[bad][:10].tolist()
        raise ValueError(f"{where}: weights of rows {rows} contain NaN or inf; refusing to build a weight dataset")


# ================================================================================ Neural Field Arena (fit-a-nef)
@dataclass(frozen=True)
class _ArenaFile:
    path: Path
    start: int
    end: int


def _list_arena_files(path: Path) -> list[_ArenaFile]:
    if path.is_file():
        candidates = [path]
    elif path.is_dir():
        candidates = sorted(path.glob("*.hdf5"))
        if not candidates:
            raise ValueError(f"{path}: no .hdf5 files in this folder; expected the Neural Field Arena layout "
                             f"NEF_PATH/<DATASET>/<NEF>/nefs_<start>-<end>.hdf5")
    else:
        raise ValueError(f"{path}: no such file or folder")
    files = []
    for candidate in candidates:
        match = _ARENA_FILE.match(candidate.name)
        if match is None:
            raise ValueError(f"{candidate}: file name does not follow the Arena's '<name>_<start>-<end>.hdf5' "
                             f"(e.g. nefs_0-5000.hdf5); the start index is needed to place its rows")
        start, end = int(match["start"]), int(match["end"])
        if end <= start:
            raise ValueError(f"{candidate}: end index {end} is not after start index {start}")
        files.append(_ArenaFile(candidate, start, end))
    files.sort(key=lambda f: f.start)
    for before, after in zip(files, files[1:]):
        if after.start < before.end:
            raise ValueError(f"{before.path.name} ({before.start}-{before.end}) and {after.path.name} "
                             f"({after.start}-{after.end}) overlap: which rows to keep is ambiguous")
    return files


def _open_hdf5(path: Path):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from None


def _read_param_config(handle, path: Path) -> list[tuple[str, tuple[int, ...]]]:
    for key in ("params", "param_config"):
        if key not in handle:
            raise ValueError(f"{path}: no '{key}' dataset (found {sorted(handle.keys())}); an Arena file holds "
                             f"'params', 'param_config' and 'labels'")
    raw = handle["param_config"]
    if raw.shape != (1,):
        raise ValueError(f"{path}: 'param_config' must hold one JSON string (shape (1,)), got shape {raw.shape}")
    try:
        text = raw[0]
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        entries = json.loads(text)
        config = [(str(name), tuple(int(d) for d in shape)) for name, shape in entries]
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{path}: 'param_config' is not a JSON list of [name, shape] pairs: {err}") from None
    return config


def _arena_layers(config: list[tuple[str, tuple[int, ...]]], path: Path) -> dict[int, dict[str, tuple[int, ...]]]:
    """``{layer: {"kernel": shape, "bias": shape}}`` from fit-a-nef SIREN parameter names (output layer last)."""
    hidden: dict[int, dict[str, tuple[int, ...]]] = {}
    output: dict[str, tuple[int, ...]] = {}
    unexpected = []
    for name, shape in config:
        match = _FLAX_KERNEL_NET.match(name) or _FLAX_OUTPUT.match(name)
        if match is None:
            unexpected.append(name)
            continue
        target = output if "layer" not in match.groupdict() else hidden.setdefault(int(match["layer"]), {})
        if match["kind"] in target:
            raise ValueError(f"{path}: parameter {name!r} appears twice in 'param_config'")
        target[match["kind"]] = shape
    if unexpected:
        raise ValueError(f"{path}: 'param_config' has parameters {unexpected} that are not a fit-a-nef SIREN's "
                         f"(kernel_net_<l>.linear.kernel/bias, output_linear.kernel/bias)")
    if not output or not hidden or sorted(hidden) != list(range(len(hidden))):
        raise ValueError(f"{path}: 'param_config' does not describe a SIREN: sine layers {sorted(hidden)} "
                         f"(need 0..L-2 with no gap), output layer {'present' if output else 'missing'}")
    layers = {**hidden, len(hidden): output}
    for layer, params in layers.items():
        if set(params) != {"kernel", "bias"}:
            raise ValueError(f"{path}: layer {layer} has {sorted(params)}, expected both kernel and bias")
    return layers


def _arena_spec_and_permutation(config, path: Path, nef_cfg: dict | None, omega_0: float | None):
    """The `SirenSpec` of an Arena file and ``perm`` with ``canonical[:, j] = flax[:, perm[j]]``."""
    layers = _arena_layers(config, path)
    offsets, start = {}, 0
    for name, shape in config:
        offsets[name] = start
        start += math.prod(shape)
    num_layers = len(layers)
    dims = []
    for layer in range(num_layers):
        kernel, bias = layers[layer]["kernel"], layers[layer]["bias"]
        if len(kernel) != 2 or bias != (kernel[1],):
            raise ValueError(f"{path}: layer {layer} has kernel {kernel} and bias {bias}; expected kernel (in, out) "
                             f"and bias (out,)")
        if dims and kernel[0] != dims[-1][1]:
            raise ValueError(f"{path}: layer {layer} takes {kernel[0]} inputs but layer {layer - 1} gives {dims[-1][1]}")
        dims.append(kernel)
    widths = {out for _, out in dims[:-1]}
    if len(widths) != 1:
        raise ValueError(f"{path}: hidden layers of different widths {[out for _, out in dims[:-1]]} are not a SirenSpec")
    in_dim, hidden_dim, out_dim = dims[0][0], dims[0][1], dims[-1][1]
    if nef_cfg is not None:
        expected = {"hidden_dim": hidden_dim, "num_layers": num_layers, "output_dim": out_dim}
        wrong = {k: (nef_cfg[k], v) for k, v in expected.items() if k in nef_cfg and nef_cfg[k] != v}
        if wrong:
            raise ValueError(f"{path}: nef.json disagrees with the parameter shapes in 'param_config' "
                             f"(nef.json value, shapes' value): {wrong}")
        if omega_0 is not None and float(nef_cfg["omega_0"]) != float(omega_0):
            raise ValueError(f"omega_0={omega_0} was passed but nef.json says {nef_cfg['omega_0']}; drop the argument")
        omega_0 = float(nef_cfg["omega_0"])
    spec = SirenSpec(in_dim=in_dim, out_dim=out_dim, hidden_dim=hidden_dim, num_layers=num_layers,
                     omega_0=omega_0, activation="sine")

    names = {}
    for layer in range(num_layers):
        prefix = f"kernel_net_{layer}.linear" if layer < num_layers - 1 else "output_linear"
        names[f"layers.{layer}.weight"] = f"{prefix}.kernel"
        names[f"layers.{layer}.bias"] = f"{prefix}.bias"
    perm = np.empty(spec.num_params, dtype=np.int64)
    for name, sl, shape in spec.param_slices():
        base = offsets[names[name]]
        if name.endswith(".weight"):
            fan_out, fan_in = shape
            # Flax kernel (in, out) is stored row-major: element [i, o] at i * out + o; canonical is [o, i].
            perm[sl] = base + np.arange(fan_in * fan_out).reshape(fan_in, fan_out).T.reshape(-1)
        else:
            perm[sl] = base + np.arange(shape[0])
    return spec, perm


def _read_nef_json(folder: Path) -> dict | None:
    path = folder / "nef.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        name, params = data["name"], data["params"]
        params = {k: params[k] for k in ("hidden_dim", "num_layers", "omega_0", "output_dim")}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: expected {{\"name\": \"SIREN\", \"params\": {{hidden_dim, num_layers, omega_0, "
                         f"output_dim}}}}: {err!r}") from None
    if name != "SIREN":
        raise ValueError(f"{path}: NeF {name!r} is not supported; only fit-a-nef's SIREN maps onto a SirenSpec")
    return params


def read_arena(path: str | Path, split: str | None = None, omega_0: float | None = None,
               dataset_name: str | None = None):
    """Read Neural Field Arena SIREN weights into a canonical weight `datasets.Dataset`.

    Flax's layout (bias before kernel, kernels ``(in, out)``) becomes the canonical one (``layers.{l}.weight``
    ``(out, in)`` then ``layers.{l}.bias``); the function is unchanged (``siren_forward`` on the result equals
    fit-a-nef's forward pass). Files are converted chunk by chunk.

    Args:
        path (`str` or `Path`):
            One ``nefs_<start>-<end>.hdf5`` file or the folder ``NEF_PATH/<DATASET>/<NEF>/`` holding several, with
            ``nef.json`` beside them.
        split (`str`, *optional*):
            ``"train"``, ``"val"`` or ``"test"``: keep only the rows of that split (the Arena's fixed row ranges of
            MNIST, CIFAR10, MicroImageNet and ShapeNet). None keeps every row.
        omega_0 (`float`, *optional*):
            Needed only when there is no ``nef.json`` (``param_config`` gives every shape but not ``omega_0``).
        dataset_name (`str`, *optional*, defaults to the ``<DATASET>`` folder name):
            Which data set the NeFs were fitted on; picks the split ranges and the source description.

    Returns:
        A weight dataset with columns ``weights``, ``label`` and ``index`` (the global row, ``start + i``); no
        quality column (the release ships no PSNR/IoU). ``shared_init`` is None: fit-a-nef fits from a shared
        initialisation, but the release does not ship it. ``metadata.json`` (per-file parameter mean/std) is not
        read: the weights themselves are stored unnormalised.
    """
    path = Path(path)
    files = _list_arena_files(path)
    folder = path if path.is_dir() else path.parent
    dataset_name = dataset_name or folder.parent.name
    key = dataset_name.lower()

    rows = None
    if split is not None:
        if key not in ARENA_SPLITS:
            raise ValueError(f"no split ranges known for data set {dataset_name!r} (from {folder}); known: "
                             f"{sorted(ARENA_SPLITS)}. Pass dataset_name=... or split=None")
        if split not in ARENA_SPLITS[key]:
            raise ValueError(f"split must be one of {sorted(ARENA_SPLITS[key])}, got {split!r}")
        rows = ARENA_SPLITS[key][split]
        files = [f for f in files if f.start < rows[1] and f.end > rows[0]]
        if not files:
            raise ValueError(f"{path}: no file holds rows {rows[0]}-{rows[1]} of the {split!r} split of {dataset_name}")
        covered = sum(min(f.end, rows[1]) - max(f.start, rows[0]) for f in files)
        if covered < rows[1] - rows[0]:
            logger.warning("%s: the files hold %d of the %d rows of the %r split of %s", path, covered,
                           rows[1] - rows[0], split, dataset_name)

    nef_cfg = _read_nef_json(folder)
    if nef_cfg is None and omega_0 is None:
        raise ValueError(f"{folder}: no nef.json, so omega_0 is unknown (param_config holds only shapes); pass "
                         f"omega_0=... (fit-a-nef's default is 8; check the release's configuration)")

    first_config, spec, perm = None, None, None
    for arena_file in files:
        with _open_hdf5(arena_file.path) as handle:
            config = _read_param_config(handle, arena_file.path)
        if first_config is None:
            first_config = config
            spec, perm = _arena_spec_and_permutation(config, arena_file.path, nef_cfg, omega_0)
        elif config != first_config:
            raise ValueError(f"{arena_file.path}: 'param_config' differs from that of {files[0].path.name}; one "
                             f"dataset holds one architecture")

    def chunks():
        step = _chunk_rows(spec.num_params)
        for arena_file in tqdm(files, desc="reading Arena files", unit="file", disable=len(files) < 2):
            where = str(arena_file.path)
            with _open_hdf5(arena_file.path) as handle:
                params = handle["params"]
                expected_rows = arena_file.end - arena_file.start
                if params.ndim != 2 or params.shape[1] != spec.num_params:
                    width = sum(math.prod(shape) for _, shape in first_config)
                    raise ValueError(f"{where}: 'params' has shape {params.shape} but 'param_config' describes "
                                     f"{width} values per field")
                if params.shape[0] != expected_rows:
                    raise ValueError(f"{where}: the name says rows {arena_file.start}-{arena_file.end} "
                                     f"({expected_rows}) but 'params' holds {params.shape[0]}")
                if not np.issubdtype(params.dtype, np.floating):
                    raise ValueError(f"{where}: 'params' has dtype {params.dtype}, expected float32")
                labels = _read_labels(handle, expected_rows, where)
                lo, hi = 0, expected_rows
                if rows is not None:
                    lo, hi = max(rows[0] - arena_file.start, 0), min(rows[1] - arena_file.start, expected_rows)
                for begin in range(lo, hi, step):
                    stop = min(begin + step, hi)
                    try:
                        block = params[begin:stop]
                    except OSError as err:
                        raise ValueError(f"{where}: rows {begin}-{stop} of 'params' cannot be read (truncated or "
                                         f"corrupt?): {err}") from None
                    weights = np.ascontiguousarray(block[:, perm], dtype=np.float32)  # (b, p) canonical
                    index = np.arange(begin, stop, dtype=np.int64) + arena_file.start
                    _check_finite(weights, index, where)
                    yield weights, labels[begin:stop], index

    source = {"kind": "occupancy" if spec.in_dim == 3 else "image", "name": f"arena/{dataset_name}",
              "format": "neural-field-arena", "split": split,
              "files": [{"file": f.path.name, "start": f.start, "end": f.end} for f in files]}
    if spec.in_dim == 2 and key in ARENA_IMAGE_SOURCES:
        source.update(ARENA_IMAGE_SOURCES[key])
    return _assemble(chunks(), spec, None, source)


def _read_labels(handle, num_rows: int, where: str) -> np.ndarray:
    if "labels" not in handle:
        logger.warning("%s: no 'labels' dataset; labels set to -1 (unknown)", where)
        return np.full(num_rows, -1, dtype=np.int64)
    try:
        labels = np.asarray(handle["labels"][:])
    except OSError as err:
        raise ValueError(f"{where}: 'labels' cannot be read (truncated or corrupt?): {err}") from None
    if labels.ndim == 2 and labels.shape[1] == 1:  # the Arena's own tests write (n, 1)
        labels = labels[:, 0]
    if labels.shape != (num_rows,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: 'labels' must be {num_rows} integers, got shape {labels.shape} dtype {labels.dtype}")
    return labels.astype(np.int64)


# ================================================================================================ HyperDiffusion
def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only: tensors and plain containers only, never arbitrary pickled objects.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, pickle and weights_only errors all mean the same thing here
        raise ValueError(f"{path}: not a readable torch state dict (truncated, corrupt, or holds objects other "
                         f"than tensors): {type(err).__name__}: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return state


def _hyperdiffusion_spec(state: dict[str, torch.Tensor], path: Path, in_dim: int) -> SirenSpec:
    """The `SirenSpec` an ``MLP3D`` state dict describes, every key and shape checked."""
    layers: dict[int, dict[str, tuple[int, ...]]] = {}
    unexpected = []
    for key, tensor in state.items():
        match = _TORCH_LAYER.match(key)
        if match is None:
            unexpected.append(key)
            continue
        layers.setdefault(int(match["layer"]), {})[match["kind"]] = tuple(tensor.shape)
    if unexpected:
        raise ValueError(f"{path}: unexpected keys {unexpected}; a HyperDiffusion MLP3D state dict holds only "
                         f"layers.<l>.weight and layers.<l>.bias")
    if len(layers) < 2 or sorted(layers) != list(range(len(layers))):
        raise ValueError(f"{path}: layers {sorted(layers)} are not 0..L-1 with L >= 2")
    dims = []
    for layer in range(len(layers)):
        weight, bias = layers[layer].get("weight"), layers[layer].get("bias")
        if weight is None or bias is None:
            missing = f"layers.{layer}.weight" if weight is None else f"layers.{layer}.bias"
            raise ValueError(f"{path}: missing key {missing!r}")
        if len(weight) != 2 or bias != (weight[0],):
            raise ValueError(f"{path}: layers.{layer}.weight has shape {weight} and layers.{layer}.bias {bias}; "
                             f"expected (out, in) and (out,)")
        if dims and weight[1] != dims[-1][0]:
            raise ValueError(f"{path}: layers.{layer}.weight has shape {weight}: {weight[1]} inputs, but layer "
                             f"{layer - 1} gives {dims[-1][0]}")
        dims.append(weight)
    hidden = [out for out, _ in dims[:-1]]
    if len(set(hidden)) != 1:
        raise ValueError(f"{path}: hidden layers of different widths {hidden} are not a SirenSpec")
    fan_in = dims[0][1]
    num_frequencies = (fan_in // in_dim - 1) // 2
    if fan_in != in_dim * (1 + 2 * num_frequencies):
        raise ValueError(f"{path}: layers.0.weight has shape {dims[0]}: {fan_in} inputs is not a NeRF encoding of "
                         f"{in_dim}-d coordinates (in_dim * (1 + 2 F))")
    return SirenSpec(in_dim=in_dim, out_dim=dims[-1][0], hidden_dim=hidden[0], num_layers=len(dims),
                     activation="relu", num_frequencies=num_frequencies)


def _flat_state_dict(state: dict[str, torch.Tensor], spec: SirenSpec, path: Path) -> np.ndarray:
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {tensor.dtype}, expected floating point weights")
    try:
        flat = spec.flatten({key: tensor.detach().float()[None] for key, tensor in state.items()})
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return flat[0].numpy()


def _list_hyperdiffusion_files(folder: Path) -> tuple[list[Path], list[int], list[str]]:
    """Shape files, their labels and the class names.

    Layouts: ``folder/*.pth`` (label 0); ``folder/<shape>/checkpoints/model_final.pth`` (or ``model_current.pth``,
    HyperDiffusion's own training output; label 0); ``folder/<class>/*.pth`` (one class per subfolder, labels in
    sorted folder order).
    """
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    flat, classes = [], {}
    for entry in sorted(folder.iterdir()):
        if entry.is_file() and entry.suffix == ".pth":
            flat.append(entry)
        elif entry.is_dir():
            checkpoint = next((entry / "checkpoints" / n for n in ("model_final.pth", "model_current.pth")
                               if (entry / "checkpoints" / n).is_file()), None)
            if checkpoint is not None:
                flat.append(checkpoint)
            elif any(entry.glob("*.pth")):
                classes[entry.name] = sorted(entry.glob("*.pth"))
    if flat and classes:
        raise ValueError(f"{folder}: holds both shape files ({flat[0].name}, ...) and class folders "
                         f"({sorted(classes)}); use one layout")
    if classes:
        names = sorted(classes)
        files = [f for name in names for f in classes[name]]
        labels = [label for label, name in enumerate(names) for _ in classes[name]]
        return files, labels, names
    if not flat:
        raise ValueError(f"{folder}: no .pth state dicts (expected <folder>/*.pth, <folder>/<class>/*.pth or "
                         f"<folder>/<shape>/checkpoints/model_final.pth)")
    return flat, [0] * len(flat), []


def read_hyperdiffusion(folder: str | Path, shared_init_path: str | Path | None = None, in_dim: int = 3,
                        name: str | None = None):
    """Read a folder of HyperDiffusion ``MLP3D`` state dicts into a canonical weight `datasets.Dataset`.

    Each ``.pth`` is loaded with ``torch.load(..., weights_only=True)`` (tensors only, nothing unpickled beyond
    them). The spec is read off the tensors: HyperDiffusion's planes give ``SirenSpec(in_dim=3, out_dim=1,
    hidden_dim=128, num_layers=4, activation="relu", num_frequencies=4)``, 36,737 weights; ``num_frequencies``
    from the first layer's fan-in, ``(fan_in / in_dim - 1) / 2``. Torch's layout is already the canonical one.

    Args:
        folder (`str` or `Path`):
            ``<folder>/*.pth`` (labels 0), ``<folder>/<class>/*.pth`` (one label per subfolder, sorted by name) or
            HyperDiffusion's ``<folder>/<shape>/checkpoints/model_final.pth``. Files are read in sorted order.
        shared_init_path (`str` or `Path`, *optional*):
            The state dict every shape was initialised from. HyperDiffusion initialises every shape from the
            first fitted one, but the folder does not say which that is; without it ``shared_init`` is None.
        in_dim (`int`, *optional*, defaults to 3):
            Coordinate dimension (4 for HyperDiffusion's 4-D animals).
        name (`str`, *optional*, defaults to ``"hyperdiffusion/<folder name>"``):
            The source name stored with the dataset.

    Returns:
        A weight dataset with columns ``weights``, ``label`` and ``index`` (the row in the sorted file list; the
        file names are in the source description under ``files``); outputs are occupancy logits.
    """
    folder = Path(folder)
    files, labels, class_names = _list_hyperdiffusion_files(folder)

    first_state = _load_state_dict(files[0])
    spec = _hyperdiffusion_spec(first_state, files[0], in_dim)
    shared_init = None
    if shared_init_path is not None:
        shared_path = Path(shared_init_path)
        shared_state = _load_state_dict(shared_path)
        shared_spec = _hyperdiffusion_spec(shared_state, shared_path, in_dim)
        if shared_spec != spec:
            raise ValueError(f"{shared_path}: describes {shared_spec}, the folder's shapes {spec}")
        shared_init = _flat_state_dict(shared_state, spec, shared_path)

    labels = np.asarray(labels, dtype=np.int64)

    def chunks():
        step = _chunk_rows(spec.num_params)
        progress = tqdm(total=len(files), desc="reading HyperDiffusion weights", unit="shape", disable=len(files) < 100)
        for begin in range(0, len(files), step):
            stop = min(begin + step, len(files))
            weights = np.empty((stop - begin, spec.num_params), dtype=np.float32)  # (b, p)
            for row, path in enumerate(files[begin:stop]):
                state = first_state if begin + row == 0 else _load_state_dict(path)
                file_spec = _hyperdiffusion_spec(state, path, in_dim)
                if file_spec != spec:
                    raise ValueError(f"{path}: describes {file_spec}, but {files[0].name} describes {spec}")
                weights[row] = _flat_state_dict(state, spec, path)
                if not np.isfinite(weights[row]).all():
                    raise ValueError(f"{path}: weights contain NaN or inf; refusing to build a weight dataset")
                progress.update()
            yield weights, labels[begin:stop], np.arange(begin, stop, dtype=np.int64)
        progress.close()

    source = {"kind": "occupancy", "name": name or f"hyperdiffusion/{folder.name}", "format": "hyperdiffusion",
              "output": "logits", "coordinate_range": [-0.5, 0.5], "class_names": class_names,
              "files": [str(f.relative_to(folder)) for f in files]}
    return _assemble(chunks(), spec, shared_init, source)


__all__ = ["ARENA_SPLITS", "read_arena", "read_hyperdiffusion"]
