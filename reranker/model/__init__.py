"""Item vectors: text encoders (torch, ONNX), the micro-batcher, the item cache and the shared catalog."""
