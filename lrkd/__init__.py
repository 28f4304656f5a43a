"""lrkd: distil a large language model into a small one with PyTorch Lightning."""

__version__ = "0.1.0"
