"""Weight datasets: fit a source into a `datasets.Dataset` of SIREN weights, on disk in resumable shards, and
load any weight dataset back (our own folders, the Neural Field Arena release, HyperDiffusion `.pth` folders).

Layout of a fit folder (``nef-transformers fit --out DIR``)::

    DIR/run.json                      # source, SirenSpec, fit settings, field count: checked on resume
    DIR/shards/shard-000000-001024/   # finished shards (each written to a temporary folder, then renamed)
    DIR/dataset/                      # the merged dataset (written last, also by rename)
    DIR/README.md                     # its dataset card (`nef_transformers.data.card`), written with it

A folder without ``dataset/`` is incomplete and never loads as a dataset: `load_nef_dataset` says how many
fields are done and how to resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fields.fit import FitConfig, fit_neural_fields, make_init
from ..fields.spec import SirenSpec
from .card import write_dataset_card
from .metadata import attach_metadata, get_spec, make_weight_dataset, nef_metadata

logger = logging.getLogger(__name__)

RUN_FILE = "run.json"
SHARDS_DIR = "shards"
DATASET_DIR = "dataset"


class IncompleteFitError(RuntimeError):
    """A fit folder whose run has not finished: some shards or the merged dataset are missing."""


def select_indices(num_items: int, num_fields: int | None, seed: int) -> list[int]:
    """Which source rows to fit: all of them in order, or a seeded random subset of ``num_fields``.

    Sources such as the embedded MNIST are sorted by class, so a prefix would be one class only.
    """
    if num_items == 0:
        raise ValueError("the source is empty: nothing to fit")
    if num_fields is None:
        return list(range(num_items))
    if not isinstance(num_fields, int) or num_fields <= 0:
        raise ValueError(f"num_fields must be a positive int, got {num_fields!r}")
    if num_fields > num_items:
        raise ValueError(f"num_fields={num_fields} is more than the source has ({num_items} items)")
    if num_fields == num_items:
        return list(range(num_items))
    return sorted(np.random.default_rng(seed).permutation(num_items)[:num_fields].tolist())


def build_nef_dataset(
    source,
    spec: SirenSpec | None = None,
    config: FitConfig = FitConfig(),
    num_fields: int | None = None,
    indices: Sequence[int] | None = None,
    shared_init: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
    progress=True,
):
    """Fit fields to ``source`` and return them as a weight `datasets.Dataset` (in memory).

    Columns: ``weights`` (float32, length ``spec.num_params``), ``label``, ``psnr`` (images) or ``iou``
    (shapes), ``index`` (row in the source). The `SirenSpec`, the shared initial weights, the source
    description and the fit settings travel with it (`nef_transformers.data.get_spec`, `get_shared_init`).
    Save it with ``dataset.save_to_disk(path)``; `load_nef_dataset(path)` reads it back.
    """
    spec = spec or SirenSpec(in_dim=source.in_dim, out_dim=source.out_dim)
    if indices is None:
        indices = select_indices(len(source), num_fields, config.seed)
    if config.init == "shared" and shared_init is None:
        shared_init = make_init(spec, config, 1)
    result = fit_neural_fields(source, spec, config, indices=indices, shared_init=shared_init, device=device,
                               progress=progress)
    labels = source.labels[np.asarray(indices)]
    return make_weight_dataset(
        result.weights, labels, spec, shared_init if config.init == "shared" else None, source.describe(),
        quality=result.quality, index=indices, fit={**config.to_dict(), "loss_curve": result.loss_curve.tolist()},
    )


# ------------------------------------------------------------------------------------------- fit folders
@contextlib.contextmanager
def _quiet_datasets():
    """Silence `datasets`' own save/load bars inside our loops (they would break the fitting bar)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _save_dataset_atomically(dataset, target: Path) -> None:
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    dataset.save_to_disk(str(tmp))
    if target.exists():  # another process finished the same shard first; keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.replace(tmp, target)


def shard_ranges(num_fields: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_fields)) for start in range(0, num_fields, shard_size)]


def _shard_name(start: int, end: int) -> str:
    return f"shard-{start:06d}-{end:06d}"


def check_writable(out_dir: Path) -> None:
    """Fail before any work when ``out_dir`` cannot be created or written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"0" * 4096)
        probe.unlink()
    except OSError as error:
        raise OSError(f"cannot write to the output folder {out_dir}: {error}") from error


def _check_run(out_dir: Path, run: dict) -> None:
    """Refuse to mix runs: an existing fit folder must hold the same source, spec and settings."""
    run_file = out_dir / RUN_FILE
    if not run_file.exists():
        leftovers = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
        if leftovers:
            raise ValueError(f"output folder {out_dir} is not empty and is not a nef_transformers fit folder "
                             f"(found {leftovers[:5]}); choose an empty or new --out")
        return
    previous = json.loads(run_file.read_text(encoding="utf-8"))
    if previous.get("spec") != run["spec"]:
        raise ValueError(
            f"output folder {out_dir} holds fields of another SirenSpec ({SirenSpec.from_dict(previous['spec'])}); "
            f"this run asks for {SirenSpec.from_dict(run['spec'])}. Choose another --out or delete the folder."
        )
    differing = sorted(key for key in run if previous.get(key) != run[key])
    if differing:
        details = "; ".join(f"{k}: folder has {previous.get(k)!r}, this run {run[k]!r}" for k in differing)
        raise ValueError(f"output folder {out_dir} holds another fitting run ({details}). "
                         f"Re-run with the same settings to resume, or choose another --out.")


def fit_to_disk(
    source,
    out_dir: str | Path,
    spec: SirenSpec | None = None,
    config: FitConfig = FitConfig(),
    num_fields: int | None = None,
    shard_size: int = 1024,
    device: str | torch.device = "cpu",
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
    progress: bool = True,
):
    """Fit ``source`` into a fit folder, resumably, and return the merged weight dataset.

    Finished shards are kept: an interrupted run started again with the same settings refits only the missing
    shards. With ``num_processes > 1`` (``accelerate launch``), process ``k`` fits shards ``k, k + P, ...``,
    ``wait_for_everyone`` is called, and process 0 merges; every process returns the merged dataset.
    """
    from datasets import concatenate_datasets, load_from_disk

    out_dir = Path(out_dir)
    spec = spec or SirenSpec(in_dim=source.in_dim, out_dim=source.out_dim)
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    indices = select_indices(len(source), num_fields, config.seed)
    run = {"source": source.describe(), "spec": spec.to_dict(), "fit": config.to_dict(),
           "num_fields": len(indices), "shard_size": shard_size, "source_size": len(source)}
    run = json.loads(json.dumps(run))  # compare as stored (tuples become lists)
    check_writable(out_dir)
    _check_run(out_dir, run)
    if wait_for_everyone is not None:
        # every process checks the folder as it was before anyone writes: all pass or all raise, none hangs
        wait_for_everyone()
    if process_index == 0:
        _atomic_write_text(out_dir / RUN_FILE, json.dumps(run, indent=2, sort_keys=True))
    dataset_dir = out_dir / DATASET_DIR
    shards_dir = out_dir / SHARDS_DIR
    shards_dir.mkdir(exist_ok=True)
    shared_init = make_init(spec, config, 1) if config.init == "shared" else None
    ranges = shard_ranges(len(indices), shard_size)
    with _quiet_datasets():
        if not dataset_dir.exists():
            _fit_shards(source, out_dir, spec, config, indices, ranges, shared_init, device, process_index,
                        num_processes, wait_for_everyone, progress)
        return load_nef_dataset(out_dir)


def _fit_shards(source, out_dir, spec, config, indices, ranges, shared_init, device, process_index, num_processes,
                wait_for_everyone, progress):
    from datasets import concatenate_datasets, load_from_disk

    dataset_dir = out_dir / DATASET_DIR
    shards_dir = out_dir / SHARDS_DIR
    mine = [r for k, r in enumerate(ranges) if k % num_processes == process_index]
    todo = [r for r in mine if not (shards_dir / _shard_name(*r)).exists()]
    done = sum(end - start for start, end in mine) - sum(end - start for start, end in todo)
    if done:
        logger.info("resuming: %d of %d fields of this process already fitted", done,
                    sum(end - start for start, end in mine))
    bar = tqdm(total=sum(end - start for start, end in mine) * config.steps, initial=done * config.steps,
               desc=f"fitting {len(indices)} fields" + (f" [process {process_index}]" if num_processes > 1 else ""),
               unit="step", disable=not progress, position=process_index, smoothing=0.05)
    for start, end in todo:
        shard = build_nef_dataset(source, spec, config, indices=indices[start:end], shared_init=shared_init,
                                  device=device, progress=bar)
        _save_dataset_atomically(shard, shards_dir / _shard_name(start, end))
    bar.close()
    if wait_for_everyone is not None:
        wait_for_everyone()
    if process_index == 0 and not dataset_dir.exists():
        missing = [r for r in ranges if not (shards_dir / _shard_name(*r)).exists()]
        if missing:
            raise IncompleteFitError(f"{len(missing)} shard(s) of {out_dir} are missing after fitting: {missing[:5]}")
        parts = [load_from_disk(str(shards_dir / _shard_name(*r))) for r in ranges]
        merged = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
        curves = [np.asarray(nef_metadata(p)["fit"]["loss_curve"]) * len(p) for p in parts]
        fit = {**config.to_dict(), "loss_curve": (np.sum(curves, axis=0) / len(merged)).tolist()}
        merged = attach_metadata(merged, spec, shared_init, source.describe(), fit)
        _save_dataset_atomically(merged, dataset_dir)
        write_dataset_card(merged, out_dir)
    if wait_for_everyone is not None:
        wait_for_everyone()


# ---------------------------------------------------------------------------------------------- loading
def load_nef_dataset(path: str | Path, **reader_kwargs):
    """Load a weight dataset: a fit folder, a ``save_to_disk`` folder, a Neural Field Arena HDF5 file or
    folder, or a folder of HyperDiffusion ``.pth`` state dicts. Always returns a `datasets.Dataset` whose
    metadata gives its `SirenSpec` (`get_spec`) and shared init (`get_shared_init`).
    """
    from datasets import load_from_disk

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no weight dataset at {path}")
    if path.is_dir() and (path / DATASET_DIR).is_dir():
        return _load_saved(path / DATASET_DIR)
    if path.is_dir() and (path / RUN_FILE).exists():
        run = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
        ranges = shard_ranges(run["num_fields"], run["shard_size"])
        done = sum(e - s for s, e in ranges if (path / SHARDS_DIR / _shard_name(s, e)).exists())
        raise IncompleteFitError(
            f"{path} is an unfinished fit ({done} of {run['num_fields']} fields fitted): re-run the same "
            f"`nef-transformers fit ... --out {path}` to resume"
        )
    if path.is_dir() and (path / "state.json").exists() and (path / "dataset_info.json").exists():
        return _load_saved(path)
    from .readers import read_arena, read_hyperdiffusion

    if path.suffix in (".hdf5", ".h5") or (path.is_dir() and any(path.glob("*.hdf5"))):
        return read_arena(path, **reader_kwargs)
    if path.is_dir() and any(path.rglob("*.pth")):
        return read_hyperdiffusion(path, **reader_kwargs)
    raise ValueError(f"{path} is not a weight dataset: expected a fit folder, a save_to_disk folder, "
                     f"Neural Field Arena .hdf5 files or HyperDiffusion .pth files")


def _load_saved(path: Path):
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except Exception as error:
        raise ValueError(f"cannot load the weight dataset at {path}: {error}") from error
    spec = get_spec(dataset)  # raises a clear error for datasets without our metadata
    if "weights" not in dataset.column_names:
        raise ValueError(f"{path} has no 'weights' column (columns: {dataset.column_names})")
    length = dataset.features["weights"].length
    if length != spec.num_params:
        raise ValueError(f"{path}: weights have length {length}, its {spec} needs {spec.num_params}")
    return dataset
