"""rlhf_fast: pure Python, plus the C++ CPU extension when it builds.

``kernels/`` (Triton source) installs as ``rlhf_fast.kernels``.
"""

from setuptools import setup

setup(
    name="rlhf_fast",
    version="0.1.0",
    description="Fused, trustworthy PPO loss kernels and a lean RLHF loop",
    packages=["rlhf_fast", "rlhf_fast.kernels"],
    package_dir={"rlhf_fast": "rlhf_fast", "rlhf_fast.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["transformers>=4.40", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "ruff"],
    },
)
