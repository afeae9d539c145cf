"""Tools that drive a real server: `reranker bench` and the load / soak driver."""
