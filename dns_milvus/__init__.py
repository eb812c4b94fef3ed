"""dns-milvus: Distill-and-Select video retrieval on Milvus."""

from dns_milvus.errors import DnSError

__version__ = "0.1.0"

__all__ = ["DnSError", "__version__"]
