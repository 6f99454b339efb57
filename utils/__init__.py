"""Shared helpers for the training scripts: image transforms, text, losses, metrics, data, demo data."""
