"""qcompress: compress trained object detectors and measure what it cost and bought."""

from qcompress.errors import QCompressError

__version__ = "0.1.0"
__all__ = ["QCompressError", "__version__"]
