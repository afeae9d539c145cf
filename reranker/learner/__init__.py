"""`reranker learn`: the process beside the sidecars that trains a head from their training logs,
gates it offline (in-process RerankServices) and online, canaries, promotes or rolls back. It sits
on top of the service and the trainer (reranker.evaluation.train); the pieces below it that the
sidecars share (training log, log source, confidence sequence, publishing) stay in reranker.learning."""
