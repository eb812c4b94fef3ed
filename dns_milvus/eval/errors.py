"""Errors of the evaluation package: bad ground-truth files, bad feature files, undefined metrics."""

from __future__ import annotations

from dns_milvus.errors import InvalidInputError, NotFoundError


class DatasetFormatError(InvalidInputError):
    """A ground-truth or id-list file that is missing, unreadable or not in its dataset's public form."""


class FeatureFileError(InvalidInputError):
    """An HDF5 feature file, or one of its datasets, that is unreadable or has the wrong shape."""


class FeatureNotFoundError(NotFoundError):
    """A video id that has no dataset in the HDF5 feature file."""


class UndefinedMetricError(InvalidInputError):
    """A metric asked for where it has no value, e.g. AP of a query with no relevant video."""
