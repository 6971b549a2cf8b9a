"""Datasets and their clean-performance evaluators."""
