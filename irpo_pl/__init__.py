"""Iterative Reasoning Preference Optimization (Pang et al. 2024) on PyTorch Lightning."""

__version__ = "0.1.0"
