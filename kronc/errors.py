"""Errors shared by layers that do not otherwise meet (bottom layer: no kronc imports)."""

from __future__ import annotations


class MissingPackageError(ImportError):
    """An optional package a loader needs is not installed; the message names the pip command."""


class ModelSpecError(ValueError):
    """MODEL names nothing kronc can load."""
