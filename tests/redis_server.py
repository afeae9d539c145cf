"""A real, throw-away redis-server (reranker.tools.harness.RedisServer) and Redis Cluster for
integration tests (Debian's `redis-server`; see scripts/ensure-redis.sh, which `make test` runs).
Each instance listens on a free loopback port, keeps its files in a temp dir and persists nothing."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import redis

from reranker.tools import harness
from reranker.tools.harness import free_port


class RedisServer(harness.RedisServer):
    """reranker.tools.harness.RedisServer; the test is skipped where redis-server is not installed."""

    def __init__(self, port: int | None = None) -> None:
        try:
            super().__init__(port)
        except harness.RedisUnavailable as exc:
            pytest.skip(str(exc))


class RedisClusterServer:
    """A throw-away Redis Cluster on loopback: `masters` masters, each with `replicas_per_master`
    replicas, formed with `redis-cli --cluster create` (Debian's redis-tools) from redis-server
    processes in cluster mode. `node_timeout_ms` is how long a silent master takes to be failed over."""

    def __init__(self, masters: int = 3, replicas_per_master: int = 1, node_timeout_ms: int = 1000) -> None:
        self.masters = masters
        self.replicas_per_master = replicas_per_master
        self.node_timeout_ms = node_timeout_ms
        self.nodes = [RedisServer() for _ in range(masters * (1 + replicas_per_master))]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> RedisClusterServer:
        cli = shutil.which("redis-cli")
        if cli is None:
            pytest.skip("redis-cli is not installed (Debian's redis-tools)")
        for node in self.nodes:
            node.extra_args = ["--cluster-enabled", "yes", "--cluster-config-file", str(node.dir / "nodes.conf"),
                               "--cluster-node-timeout", str(self.node_timeout_ms), "--cluster-port", str(free_port()),
                               # replicas sync at once (no 5 s diskless delay) and may always take over
                               "--repl-diskless-sync-delay", "0", "--cluster-replica-validity-factor", "0"]
        try:
            for node in self.nodes:
                node.start()
            addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
            done = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas",
                                   str(self.replicas_per_master), "--cluster-yes"], capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-500:]} {done.stderr[-500:]}")
            self.wait_healthy()
            self.wait_replicas_synced()
        except BaseException:
            self.cleanup()  # no redis-server and no temp dir left behind
            raise
        return self

    def wait_replicas_synced(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            client = node.client()
            while True:
                info = client.info("replication")
                if info.get("role") == "master" or info.get("master_link_status") == "up":
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {node.port} did not sync with its master")
                time.sleep(0.05)
            client.close()

    def wait_healthy(self, timeout_s: float = 30.0) -> None:
        """Until every live node says cluster_state:ok, all 16384 slots are served, and by live masters
        only (a killed master still owns its slots until its replica is promoted)."""
        deadline = time.monotonic() + timeout_s
        while True:
            ok = True
            live = {node.port for node in self.live_nodes()}
            for node in self.live_nodes():
                client = node.client()
                info = client.cluster("info")
                if info.get("cluster_state") != "ok" or int(info.get("cluster_slots_ok", 0)) != 16384:
                    ok = False
                if any(int(master[1]) not in live for _, _, master, *_ in client.execute_command("CLUSTER", "SLOTS")):
                    ok = False
                client.close()
            if ok:
                return
            if time.monotonic() > deadline:
                logs = {n.port: (n.dir / "redis.log").read_text()[-600:] for n in self.live_nodes() if (n.dir / "redis.log").exists()}
                raise RuntimeError(f"the Redis cluster did not become healthy: {logs}")
            time.sleep(0.1)

    def live_nodes(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def node_for_port(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    def cli(self, *args: str, timeout_s: float = 120.0) -> str:
        done = subprocess.run(["redis-cli", *args], capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout[-500:]} {done.stderr[-500:]}")
        return done.stdout

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


if __name__ == "__main__":  # a local cluster by hand: python tests/redis_server.py [masters] [replicas per master]
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on SIGTERM too
    masters = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    replicas = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    cluster = RedisClusterServer(masters, replicas).start()
    print(f"--redis-url {cluster.url}   ({masters} masters x {replicas} replicas; Ctrl-C stops and deletes it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.cleanup()


def stored_profile(client: redis.Redis, user: str, dim: int, prefix: str = "reranker") -> object | None:
    """The user's profile as a store keeps it in Redis (compact.CompactProfile), or None."""
    from reranker.users.compact_redis import read_profile

    return read_profile(client, user, dim, prefix)


def stored_event_ids(client: redis.Redis, user: str, ids: set[str], dim: int, prefix: str = "reranker") -> set[str]:
    """Which of `ids` the user's profile in Redis holds (a profile keeps the hashes of its last
    `max_event_ids_per_user` event ids, not the ids: GetUserProfile's recent events carry none)."""
    from reranker.users.profiles import event_id_hash

    profile = stored_profile(client, user, dim, prefix)
    held = set() if profile is None else set(profile.ids.tolist())  # type: ignore[attr-defined]
    return {event_id for event_id in ids if event_id_hash(event_id) in held}
