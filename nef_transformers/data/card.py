"""Dataset cards of weight datasets: `dataset_card(dataset)` renders ``hub_cards/weight_dataset_card.md`` with
every number computed from the dataset itself (field count, size category, PSNR or IoU statistics of its quality
column, class counts, final fitting loss) and its metadata (`SirenSpec`, source, fit settings).

`fit_to_disk` writes the card as ``OUT/README.md`` when it writes the merged dataset.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from .metadata import get_spec, nef_metadata

logger = logging.getLogger(__name__)

DATASET_CARD_TEMPLATE = Path(__file__).resolve().parents[2] / "hub_cards" / "weight_dataset_card.md"
# The Hub's size_categories buckets: (exclusive upper bound on the number of rows, label).
SIZE_CATEGORIES = ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
                   (10**11, "10B<n<100B"), (10**12, "100B<n<1T"))
QUALITY_COLUMNS = {
    "psnr": ("PSNR", "dB", "of the field rendered against its image: both un-normalised and divided by the image's "
                           "maximum, then -10 log10(MSE) (fit-a-nef)"),
    "iou": ("IoU", "", "of the field's occupancy (logit >= 0) with the true occupancy on held-out points (mesh "
                       "sources) or on every voxel centre (voxel grids)"),
}
COLUMN_MEANINGS = {
    "weights": "the field's flat weights in `SirenSpec`'s canonical order (layer by layer from the input: weight "
               "`(out, in)`, then bias `(out,)`)",
    "label": "class of the source item, an index into the class names below (-1: unknown)",
    "index": "row of the item in its source, to find the image or shape a field was fitted to",
    **{column: f"{name}{f' ({unit})' if unit else ''} {meaning}"
       for column, (name, unit, meaning) in QUALITY_COLUMNS.items()},
}
KIND_TAGS = {"image": ["image"], "occupancy": ["3d", "occupancy"]}
# Fit settings that say nothing about the data (bookkeeping) or are too long for a card; occupancy-only settings
# (`FitConfig`) are hidden for image fields, which use every pixel.
HIDDEN_FIT_KEYS = ("loss_curve", "check_every")
OCCUPANCY_FIT_KEYS = ("points_per_step", "train_points", "eval_points")


def size_category(num_rows: int) -> str:
    """The Hub's ``size_categories`` label of a dataset with ``num_rows`` rows."""
    for bound, label in SIZE_CATEGORIES:
        if num_rows < bound:
            return label
    return "n>1T"


def quality_summary(dataset) -> dict | None:
    """Mean, median, min and max of the dataset's ``psnr`` or ``iou`` column (None when it has neither)."""
    column = next((name for name in QUALITY_COLUMNS if name in dataset.column_names), None)
    if column is None:
        return None
    values = np.asarray(dataset.with_format("numpy", columns=[column])[:][column], dtype=np.float64)
    name, unit, meaning = QUALITY_COLUMNS[column]
    return {"column": column, "name": name, "unit": unit, "meaning": meaning, "count": int(values.size),
            "mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()),
            "max": float(values.max())}


def class_counts(dataset, class_names: list[str]) -> list[dict]:
    """``[{"label", "name", "count"}]`` of the labels present (``-1`` as "unknown")."""
    labels = np.asarray(dataset.with_format("numpy", columns=["label"])[:]["label"], dtype=np.int64)
    values, counts = np.unique(labels, return_counts=True)
    return [{"label": int(v), "name": "unknown" if v < 0 else (class_names[v] if v < len(class_names) else str(v)),
             "count": int(c)} for v, c in zip(values, counts)]


def dataset_card(dataset, location: str | Path | None = None, license: str = "other",
                 template: str | Path = DATASET_CARD_TEMPLATE):
    """The `huggingface_hub.DatasetCard` of a weight dataset.

    Args:
        dataset: a weight `datasets.Dataset` (with nef_transformers metadata, e.g. from `load_nef_dataset`).
        location: where the fit folder lies, for the loading snippets (default ``path/to/fit-folder``).
        license: the card's licence. The weights derive from their source data, whose terms apply: the default
            ``other`` says so; set the source's licence when you know it.
        template: the card template (`nef_transformers.card_templates`).
    """
    from huggingface_hub import DatasetCard, DatasetCardData

    from ..card_templates import merge_tags, read_card_template, render_card

    metadata, body = read_card_template(template)
    payload = nef_metadata(dataset)
    spec, source, fit = get_spec(dataset), payload["source"] or {}, payload["fit"] or {}
    kind = source.get("kind", "unknown")
    source_name = source.get("name") or "an unnamed source"
    class_names = [str(name) for name in source.get("class_names") or []]
    loss_curve = fit.get("loss_curve") or []
    context = {
        "pretty_name": f"SIREN weights of {source_name}", "location": str(location or "path/to/fit-folder"),
        "num_fields": len(dataset), "spec": spec, "kind": kind, "source_name": source_name, "class_names": class_names,
        "source": {k: v for k, v in source.items() if k not in ("kind", "name", "class_names")},
        "fit": {k: v for k, v in fit.items()
                if k not in HIDDEN_FIT_KEYS and not (kind == "image" and k in OCCUPANCY_FIT_KEYS)},
        "final_loss": float(loss_curve[-1]) if loss_curve else None, "shared_init": payload["shared_init"] is not None,
        "quality": quality_summary(dataset),
        "classes": class_counts(dataset, class_names) if "label" in dataset.column_names else [],
        "columns": [{"name": name, "dtype": _describe_feature(feature),
                     "meaning": COLUMN_MEANINGS.get(name, "not a column that `nef-transformers fit` writes")}
                    for name, feature in dataset.features.items()],
    }
    fields = {"license": license, **metadata, "pretty_name": context["pretty_name"],
              "size_categories": size_category(len(dataset))}
    fields["tags"] = merge_tags(metadata.get("tags"), KIND_TAGS.get(kind))
    if kind == "image" and "task_categories" not in metadata:
        fields["task_categories"] = ["unconditional-image-generation"]
    return render_card(DatasetCard, DatasetCardData(**fields), body, context, template)


def _describe_feature(feature) -> str:
    """``float32[1185]``, ``int64``, ... for a `datasets` feature."""
    length = getattr(feature, "length", None)
    inner = getattr(feature, "feature", None)
    if inner is not None:
        return f"{getattr(inner, 'dtype', inner)}[{length if length not in (None, -1) else ''}]"
    return str(getattr(feature, "dtype", feature))


def write_dataset_card(dataset, out_dir: str | Path) -> Path | None:
    """Write `dataset_card` as ``out_dir/README.md``; without the template (an installed package has no
    ``hub_cards/``) log a warning and write nothing."""
    if not DATASET_CARD_TEMPLATE.is_file():
        logger.warning("no README.md for %s: the dataset card template %s is not there (it ships with the repository, "
                       "not the installed package)", out_dir, DATASET_CARD_TEMPLATE)
        return None
    path = Path(out_dir) / "README.md"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(str(dataset_card(dataset, location=out_dir)), encoding="utf-8")
    os.replace(tmp, path)
    return path


__all__ = ["dataset_card", "quality_summary", "size_category", "write_dataset_card"]
