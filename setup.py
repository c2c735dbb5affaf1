"""minaf3: a small, fast, readable PyTorch implementation of NVIDIA's Audio Flamingo 3.

`kernels/` and `weights/` sit at the top of the tree so that the architecture reads from it, but they
install as `minaf3.kernels` and `minaf3.weights`: no top-level `kernels` or `weights` module is installed.
"""

from setuptools import setup

SERVE = ["fastapi>=0.164", "uvicorn>=0.30", "python-multipart>=0.0.13"]

setup(
    name="minaf3",
    version="0.1.0",
    description="Audio Flamingo 3 in plain PyTorch: log-mel, Whisper encoder, Qwen2 decoder, Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["minaf3", "minaf3.kernels", "minaf3.weights", "minaf3.serve"],
    package_dir={"minaf3": "minaf3", "minaf3.kernels": "kernels", "minaf3.weights": "weights"},
    # The CPU kernels are C++ compiled on first use (ninja via torch.utils.cpp_extension).
    # The tiny trained model (minaf3.TINY_MODEL): its hub-layout files, not the training state.
    package_data={
        "minaf3.kernels": ["*.cpp", "*.h"],
        "minaf3.serve": ["page.html"],
        "minaf3": ["tiny/*.json", "tiny/*.safetensors", "tiny/*.jinja", "tiny/train/log.jsonl"],
    },
    install_requires=[
        "torch>=2.5",
        "numpy",
        "soundfile>=0.12",
        "soxr",
        "tokenizers>=0.20",
        "safetensors",
        "tqdm",
        "ninja",
        # Kernels import triton lazily; other platforms run the torch path.
        "triton; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={
        # `minaf3 serve`: FastAPI (0.164 brought its request body limit) on uvicorn; python-multipart
        # parses uploads. Only minaf3.serve imports them.
        "serve": SERVE,
        # transformers is the behavioural reference: tests and benchmarks only, never imported by minaf3.
        # The server's tests talk to it with the official openai client, and drive its page in Chromium
        # through selenium (Debian's chromium and chromium-driver; .ci/run installs them).
        "test": [
            "pytest",
            "hypothesis",
            "transformers==5.23.0",
            "peft",
            "ruff",
            "openai",
            "selenium",
            *SERVE,
        ],
    },
    entry_points={"console_scripts": ["minaf3=minaf3.cli:main"]},
)
