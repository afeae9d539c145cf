"""Health probe for places without native gRPC probes (Docker HEALTHCHECK, scripts).

    python -m reranker.serving.probe [--address 127.0.0.1:50051] [--service reranker.v1.RerankerService]

Exit status: 0 SERVING, 1 NOT_SERVING (loading or draining), 2 unreachable or error.
Kubernetes should use its native `grpc:` probes instead (see k8s/components/reranker-sidecar/sidecar.yaml).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout_s: float = 2.0) -> int:
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        print(f"{address}: {exc.code().name}", file=sys.stderr)
        return 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    print(f"{address}: {status}")
    return 0 if response.status == health_pb2.HealthCheckResponse.SERVING else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reranker.serving.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--service", default="", help="health service name; empty = the whole server")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds")
    opts = parser.parse_args(argv)
    return check(opts.address, opts.service, opts.timeout)


if __name__ == "__main__":
    sys.exit(main())
