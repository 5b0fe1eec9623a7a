from setuptools import find_packages, setup


setup(
    name="evl-hf",
    version="0.1.0",
    description="EVL (Frozen CLIP Models are Efficient Video Learners) as a native Hugging Face transformers model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "src"},
    packages=find_packages("src"),
    package_data={"evl_hf": ["metrics/video_accuracy/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "transformers>=5.24,<6",
        "huggingface_hub>=1.0",
        "safetensors",
        "av>=12",
        "numpy",
        # The pictures: timeline plots, attention heatmaps, confusion matrices.
        "matplotlib>=3.7",
    ],
    extras_require={
        "train": ["accelerate>=1.1", "datasets>=3.0", "evaluate>=0.4", "scikit-learn", "timm>=1.0"],
        # Optional faster/default decoder; it needs a build matching torch and FFmpeg's shared libraries.
        "torchcodec": ["torchcodec>=0.16"],
        # The web demo (python -m evl_hf.app; a Hugging Face Spaces app).
        "app": ["gradio>=6,<7"],
        "testing": [
            "pytest",
            "hypothesis",
            "parameterized",
            "scikit-video",
            "torchcodec>=0.16",
            "accelerate>=1.1",
            "datasets>=3.0",
            "evaluate>=0.4",
            "scikit-learn",
            "timm>=1.0",
            # tests/test_app.py drives the web demo in headless Chromium (Debian's chromium + chromium-driver).
            "gradio>=6,<7",
            "selenium>=4.20",
        ],
    },
    entry_points={"console_scripts": ["evl-convert=evl_hf.convert:main"]},
    license="Apache-2.0",
)
