"""Every error xrwatch raises on purpose.

    XRWatchError                    base: catch this to catch everything below
    ├── ImageError                  a problem with one input file (carries ``path``)
    │   ├── UnsupportedImageError   not DICOM, PNG or JPEG; or a DICOM we refuse (multi-frame,
    │   │   │                       no pixel data, unsupported photometric interpretation)
    │   │   └── NotARadiographError a valid image of the wrong kind (a CT, an MR ...)
    │   ├── ImageDecodeError        the bytes claim a format but do not decode
    │   │   └── TruncatedImageError shorter than its header promises (maybe still being written)
    │   └── ImageTooLargeError      over the pixel limit (decompression-bomb guard)
    ├── ModelError                  the ONNX model cannot be loaded or run
    │   └── ModelMetadataError      the model lacks xrwatch's metadata, or it is malformed
    ├── ProviderError               the requested execution provider (GPU) is not available
    ├── DatasetError                a training dataset is missing, empty or malformed
    ├── ConfigError                 a config file or option is invalid (unknown key, bad value)
    ├── ReportWriteError            a report could not be written (permissions, disk full)
    └── MissingExtraError           an optional dependency group is not installed

Messages say what was expected, what was found, and name the file.
"""

from __future__ import annotations

from pathlib import Path


class XRWatchError(Exception):
    """Base class of every error xrwatch raises on purpose."""


class ImageError(XRWatchError):
    """A problem with one input file; ``path`` names it and ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        # pickled whole (a decoder process sends it back): the class, the path and the reason
        return type(self), (self.path, self.reason)


class UnsupportedImageError(ImageError):
    """The file is not an image xrwatch reads, or a DICOM it deliberately refuses."""


class NotARadiographError(UnsupportedImageError):
    """A valid medical image that is not a projection radiograph (e.g. CT, MR)."""


class ImageDecodeError(ImageError):
    """The file claims a format but its data does not decode."""


class TruncatedImageError(ImageDecodeError):
    """The file is shorter than its header promises (possibly still being written)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the documented limit (decompression-bomb guard)."""


class ModelError(XRWatchError):
    """The ONNX model cannot be loaded or run."""


class ModelMetadataError(ModelError):
    """The model lacks xrwatch's metadata, or the metadata is malformed."""


class ProviderError(XRWatchError):
    """The requested ONNX Runtime execution provider cannot be used."""


class DatasetError(XRWatchError):
    """A training dataset is missing, empty or malformed."""


class ConfigError(XRWatchError):
    """A configuration file or option is invalid."""


class ReportWriteError(XRWatchError):
    """A report could not be written."""


class MissingExtraError(XRWatchError):
    """An optional group of dependencies is not installed."""

    def __init__(self, extra: str, missing: str) -> None:
        self.extra = extra
        self.missing = missing
        super().__init__(
            f"this command needs the '{extra}' extra ({missing} is not installed): "
            f"pip install 'xrwatch[{extra}]'  (from a checkout: pip install -e '.[{extra}]')"
        )


def require_extra(extra: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` unless every module in ``modules`` can be imported."""
    import importlib.util

    for name in modules:
        if importlib.util.find_spec(name) is None:
            raise MissingExtraError(extra, name)
