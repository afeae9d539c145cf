"""reranker: a gRPC reranking sidecar for recommendation stacks."""

__version__ = "0.1.0"
__all__ = ["__version__"]
