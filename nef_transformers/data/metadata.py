"""What a weight dataset carries besides its columns: the `SirenSpec`, the shared initial weights, the source
description (kind, normalisation, image shape, class names) and the fit settings.

It is stored as JSON in ``dataset.info.description`` under the key ``"nef_transformers"``, which
`datasets` keeps through ``save_to_disk``/``load_from_disk``, ``select``, ``shuffle``, splits and
concatenation, so any loaded dataset knows how to rebuild and render each of its fields.

Columns of a weight dataset: ``weights`` (fixed-length float32, canonical order), ``label`` (int64),
``psnr`` (images) or ``iou`` (shapes) (float32), ``index`` (int64, row in the source).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from ..fields.spec import SirenSpec

METADATA_KEY = "nef_transformers"
FORMAT_VERSION = 1


def make_weight_features(num_params: int, quality_column: str | None):
    """The `datasets.Features` of a weight dataset with ``num_params`` weights per field."""
    from datasets import Features, List, Value

    columns = {"weights": List(Value("float32"), length=num_params), "label": Value("int64")}
    if quality_column is not None:
        columns[quality_column] = Value("float32")
    columns["index"] = Value("int64")
    return Features(columns)


def make_weight_dataset(
    weights: torch.Tensor | np.ndarray,
    labels,
    spec: SirenSpec,
    shared_init: torch.Tensor | np.ndarray | None,
    source: dict,
    quality: dict[str, Any] | None = None,
    index=None,
    fit: dict | None = None,
):
    """Assemble a weight `datasets.Dataset` (Arrow-built fixed-length column) with its metadata attached.

    Args:
        weights: ``(b, p)`` flat weights in canonical order.
        labels: ``(b,)`` class labels (``-1`` where unknown).
        spec: the architecture the weights belong to.
        shared_init: ``(p,)`` the initial weights every field started from, or None (random init / unknown).
        source: the source description (``kind`` ``"image"`` or ``"occupancy"``, normalisation, ...).
        quality: ``{"psnr": (b,)}`` or ``{"iou": (b,)}``; None when unknown (imported weights).
        index: ``(b,)`` row of each field in its source; defaults to ``arange(b)``.
        fit: the fit settings, stored for reference.
    """
    import pyarrow as pa
    from datasets import Dataset

    weights = torch.as_tensor(weights, dtype=torch.float32)
    spec.check_weights(weights)
    if not torch.isfinite(weights).all():
        rows = torch.nonzero(~torch.isfinite(weights).all(1)).flatten().tolist()
        raise ValueError(f"weights of fields {rows[:10]} contain NaN or inf; refusing to build a weight dataset")
    num_fields = weights.shape[0]
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    index = np.arange(num_fields, dtype=np.int64) if index is None else np.asarray(index, dtype=np.int64).reshape(-1)
    if len(labels) != num_fields or len(index) != num_fields:
        raise ValueError(f"{num_fields} fields but {len(labels)} labels and {len(index)} indices")
    quality = quality or {}
    if len(quality) > 1:
        raise ValueError(f"one quality column expected (psnr or iou), got {sorted(quality)}")
    quality_column = next(iter(quality), None)

    flat = pa.array(weights.numpy().reshape(-1), type=pa.float32())
    arrays = {"weights": pa.FixedSizeListArray.from_arrays(flat, spec.num_params), "label": pa.array(labels)}
    if quality_column is not None:
        values = np.asarray(torch.as_tensor(quality[quality_column]).float().numpy()).reshape(-1)
        if len(values) != num_fields:
            raise ValueError(f"{num_fields} fields but {len(values)} {quality_column} values")
        arrays[quality_column] = pa.array(values, type=pa.float32())
    arrays["index"] = pa.array(index)
    # Built with the final schema: no cast pass, and Arrow shares the numpy memory instead of copying it.
    schema = make_weight_features(spec.num_params, quality_column).arrow_schema
    dataset = Dataset(pa.Table.from_arrays(list(arrays.values()), schema=schema))
    return attach_metadata(dataset, spec, shared_init, source, fit)


def attach_metadata(dataset, spec: SirenSpec, shared_init, source: dict, fit: dict | None = None):
    """Store the spec, shared init, source description and fit settings in ``dataset.info.description``."""
    if shared_init is not None:
        shared_init = torch.as_tensor(shared_init, dtype=torch.float32).reshape(-1)
        if shared_init.numel() != spec.num_params:
            raise ValueError(f"shared init has {shared_init.numel()} values, {spec} has {spec.num_params} parameters")
        # float32 -> Python float (a double) -> JSON repr is exact, and so is the way back.
        shared_init = [float(v) for v in shared_init.tolist()]
    payload = {
        "format_version": FORMAT_VERSION,
        "spec": spec.to_dict(),
        "shared_init": shared_init,
        "source": source,
        "fit": fit or {},
    }
    dataset.info.description = json.dumps({METADATA_KEY: payload})
    return dataset


def nef_metadata(dataset) -> dict:
    """The metadata dict of a weight dataset; a clear error for a dataset that is not one."""
    text = dataset.info.description or ""
    try:
        payload = json.loads(text)[METADATA_KEY]
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            "this dataset carries no nef_transformers metadata (SirenSpec, shared init): build it with "
            "build_nef_dataset / `nef-transformers fit`, or load it with load_nef_dataset"
        ) from None
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"weight dataset format version {payload.get('format_version')} is not supported "
                         f"(this nef_transformers reads version {FORMAT_VERSION})")
    return payload


def get_spec(dataset) -> SirenSpec:
    """The `SirenSpec` of a weight dataset."""
    return SirenSpec.from_dict(nef_metadata(dataset)["spec"])


def get_shared_init(dataset) -> torch.Tensor | None:
    """The ``(p,)`` shared initial weights of a weight dataset, or None when its fields had no shared init."""
    values = nef_metadata(dataset)["shared_init"]
    return None if values is None else torch.tensor(values, dtype=torch.float32)


def get_source_info(dataset) -> dict:
    """The source description of a weight dataset (``kind``, ``name``, normalisation, image shape...)."""
    return nef_metadata(dataset)["source"]


def weights_tensor(dataset) -> torch.Tensor:
    """All weights of a weight dataset as one ``(b, p)`` float32 tensor (materialised once)."""
    spec = get_spec(dataset)
    values = dataset.with_format("numpy", columns=["weights"])[:]["weights"]
    return torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(-1, spec.num_params))
