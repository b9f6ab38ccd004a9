from setuptools import find_packages, setup

setup(
    name="lowbit-vit",
    version="0.1.0",
    description="Post-training quantization of Vision Transformers to very low bit-widths, with Triton kernels",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lowbit*", "kernels*", "quant*", "calib*", "export*"]),
    package_data={"lowbit": ["zoo/*.safetensors", "zoo/*.json"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "timm>=1.0",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors>=0.4",
        "numpy<2.3",
        "tqdm",
        "pillow",
        "matplotlib",
    ],
    extras_require={"test": ["pytest>=7", "pytest-benchmark>=4", "hypothesis>=6", "onnx>=1.16", "onnxruntime>=1.18"],
                    "onnx": ["onnx>=1.16", "onnxruntime>=1.18"]},
)
