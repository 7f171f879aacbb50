"""megatron-uni: sparse generalist models (Uni-Perceiver-MoE) on megatron-core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="megatron-uni",
    version="0.1.0",
    description="Uni-Perceiver with conditional Mixture-of-Experts on megatron-core: "
    "TP/PP/EP/DP training, layout-independent checkpoints, Slurm launch tooling",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_uni*", "launch*", "tools*", "checkpoints_utils*"]),
    include_package_data=True,
    # The sbatch template of `python -m launch.slurm`.
    package_data={"launch": ["templates/*.tmpl"]},
    # Ranges, so that GPU clusters with newer torch / Python can install; requirements.txt pins
    # what CI runs.
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "megatron-core>=0.16.1",
        "webdataset>=0.2.100",
        "pyyaml>=6.0",
        "timm>=1.0",
        "psutil>=5.9",
        "numpy>=1.24",
        # CLIP BPE text tokenizer: open_clip_torch ships the merges file (never imported).
        "open_clip_torch>=2.20",
        "regex",
        "ftfy",
    ],
    extras_require={
        "test": ["pytest>=8"],
        "deepspeed": ["deepspeed>=0.14"],
        "mpi": ["mpi4py>=3.1"],
        # tools/plot_routing.py (routing heatmaps); the library never imports it.
        "plots": ["matplotlib>=3.7"],
        "tensorboard": ["tensorboard>=2.14"],
        # tools.build_shards videos on video files (tools/video_files.py); the loader reads
        # the stored frames and never imports it.
        "video": ["av>=12"],
        # apex and Transformer Engine are optional accelerators, installed from their own
        # instructions (they need a CUDA toolchain); nothing here requires them.
    },
)
