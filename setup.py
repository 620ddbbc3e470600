"""Installs flexible_attention: `pip install -e ".[test]"` (CPU jax), or
`pip install -e ".[cuda,test]"` for CUDA-enabled jax on an NVIDIA GPU."""

import setuptools

setuptools.setup(
    name="flexible_attention",
    version="0.1.0",
    description=("Attention layers for JAX and dm-haiku: one semantics, many "
                 "algorithms (dense, blockwise, fused kernels, cuDNN, "
                 "context parallel)."),
    packages=setuptools.find_packages(include=["flexible_attention",
                                               "flexible_attention.*"]),
    package_data={"flexible_attention.mechanisms": ["measured_winners.json"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10,<0.12",
        "jaxlib>=0.10,<0.12",
        "dm-haiku>=0.0.16",
        "numpy",
        "absl-py",
        "ml-collections",
    ],
    extras_require={
        "test": ["pytest"],
        "plots": ["matplotlib"],
        # CUDA-enabled jax from pip (NVIDIA driver >= 525 for CUDA 12,
        # >= 580 for CUDA 13), pinned to the jax versions supported here.
        "cuda": ["jax[cuda12]>=0.10,<0.12"],
        "cuda12": ["jax[cuda12]>=0.10,<0.12"],
        "cuda13": ["jax[cuda13]>=0.10,<0.12"],
    },
)
