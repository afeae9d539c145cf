"""The Rerank path as a pipeline of named stages (stages.py) over one request context (context.py):
dedupe -> arm / bypass -> vectors -> user state -> score (blend or head) -> consumed policy -> cut /
explain. The service (service.py) composes the parts and hands the pipeline what it reads."""

from reranker.pipeline.context import Components, RerankContext, Resume
from reranker.pipeline.pipeline import RerankPipeline
from reranker.pipeline.vectors import ItemVectors

__all__ = ["Components", "ItemVectors", "RerankContext", "RerankPipeline", "Resume"]
