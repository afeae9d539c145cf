"""The gRPC edge: server assembly, handlers, protobuf conversion, error mapping, observability, TLS."""
