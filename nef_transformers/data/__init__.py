"""Signal sources (images, shapes) and weight datasets (build, load, readers for released formats)."""

from .card import dataset_card
from .images import ImageSource, load_cifar10, load_image_npz, load_microimagenet, load_mnist
from .metadata import get_shared_init, get_source_info, get_spec, make_weight_dataset, nef_metadata, weights_tensor
from .shapes import MeshFolderSource, VoxelGridSource, load_shape_source
from .sources import default_fit_config, default_spec, load_source
from .weights import IncompleteFitError, build_nef_dataset, fit_to_disk, load_nef_dataset, select_indices

__all__ = [
    "ImageSource", "IncompleteFitError", "MeshFolderSource", "VoxelGridSource", "build_nef_dataset", "dataset_card",
    "default_fit_config", "default_spec", "fit_to_disk", "get_shared_init", "get_source_info", "get_spec",
    "load_cifar10", "load_image_npz", "load_microimagenet", "load_mnist", "load_nef_dataset", "load_shape_source",
    "load_source", "make_weight_dataset", "nef_metadata", "select_indices", "weights_tensor",
]
