"""Issue 6: TLS and mTLS by certificate path, loopback default, and no request field that names a file.

Certificates are generated at test time with the `cryptography` package (test extra).
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.descriptor import FieldDescriptor

from reranker.config import Settings
from reranker.serving.server import EXIT_BAD_CONFIG, build_server
from reranker.service import RerankService
from reranker.serving.tls import TransportConfigError, is_loopback
from reranker.v1 import reranker_pb2 as pb
from reranker.v1 import reranker_pb2_grpc as pb_grpc
from tests.conftest import REPO, ServerFactory, candidate, event, fake_settings, wait_ready


# --- certificates ------------------------------------------------------------------------------------
@dataclass
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool = False) -> tuple[Pem, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(subject)
    issuer_name, issuer_key = issuer if issuer is not None else (name, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    return pem, name, key


@dataclass
class Pki:
    dir: Path
    ca: Pem
    server: Pem
    client: Pem
    rogue_client: Pem  # signed by a CA the server does not trust

    def write(self, name: str, data: bytes) -> str:
        path = self.dir / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca, ca_name, ca_key = _issue("reranker test CA", None, ca=True)
    server, _, _ = _issue("localhost", (ca_name, ca_key))
    client, _, _ = _issue("caller", (ca_name, ca_key))
    _, rogue_name, rogue_key = _issue("rogue CA", None, ca=True)
    rogue_client, _, _ = _issue("rogue caller", (rogue_name, rogue_key))
    return Pki(tmp_path_factory.mktemp("pki"), ca, server, client, rogue_client)


def _tls_settings(pki: Pki, mtls: bool) -> Settings:
    return fake_settings(
        tls_cert_path=pki.write("server.pem", pki.server.cert),
        tls_key_path=pki.write("server.key", pki.server.key),
        tls_client_ca_path=pki.write("ca.pem", pki.ca.cert) if mtls else "",
    )


@pytest.fixture
def tls_server(make_server: ServerFactory, pki: Pki, request: pytest.FixtureRequest) -> Iterator[int]:
    running, _ = make_server(_tls_settings(pki, mtls=bool(getattr(request, "param", False))))
    assert running.tls
    yield running.port


def _rerank(channel: grpc.Channel) -> pb.RerankResponse:
    req = pb.RerankRequest(user_id="u", candidates=[candidate("a", 2.0, "alpha"), candidate("b", 1.0, "beta")])
    return pb_grpc.RerankerServiceStub(channel).Rerank(req, timeout=5)


def _secure(port: int, pki: Pki, client: Pem | None = None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(f"localhost:{port}", creds)


# --- TLS / mTLS ----------------------------------------------------------------------------------------
def test_tls_server_answers_a_client_that_trusts_its_ca(tls_server: int, pki: Pki) -> None:
    with _secure(tls_server, pki) as channel:
        assert _rerank(channel).variant == pb.VARIANT_RERANKED


def test_tls_server_refuses_plaintext_clients(tls_server: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{tls_server}") as channel, pytest.raises(grpc.RpcError) as info:
        _rerank(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("tls_server", [True], indirect=True)
def test_mtls_accepts_a_client_certificate_signed_by_the_configured_ca(tls_server: int, pki: Pki) -> None:
    with _secure(tls_server, pki, client=pki.client) as channel:
        assert _rerank(channel).variant == pb.VARIANT_RERANKED


@pytest.mark.parametrize("tls_server", [True], indirect=True)
@pytest.mark.parametrize("who", ["no certificate", "certificate from another CA"])
def test_mtls_refuses_clients_without_a_trusted_certificate(tls_server: int, pki: Pki, who: str) -> None:
    client = None if who == "no certificate" else pki.rogue_client
    with _secure(tls_server, pki, client=client) as channel, pytest.raises(grpc.RpcError) as info:
        _rerank(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_unreadable_certificate_paths_name_the_setting(pki: Pki, tmp_path: Path) -> None:
    settings = _tls_settings(pki, mtls=False)
    cases = {
        "tls_cert_path": dataclasses.replace(settings, tls_cert_path=str(tmp_path / "missing.pem")),
        "tls_key_path": dataclasses.replace(settings, tls_key_path=pki.write("not-pem.key", b"hello")),
    }
    for setting, bad in cases.items():
        with pytest.raises(TransportConfigError, match=setting):
            build_server(bad, RerankService(bad))


def test_serve_with_a_missing_certificate_exits_with_a_clear_message(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    proc = subprocess.run(
        [sys.executable, "-m", "reranker", "serve", "--encoder", "fake", "--address", "127.0.0.1:0", "--metrics-address=",
         "--tls-cert-path", missing, "--tls-key-path", missing],
        env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == EXIT_BAD_CONFIG
    assert f"tls_cert_path: cannot read '{missing}'" in proc.stderr


def test_tls_settings_must_come_in_pairs() -> None:
    with pytest.raises(ValueError, match="tls_cert_path and tls_key_path together"):
        Settings(tls_cert_path="/some/cert.pem")
    with pytest.raises(ValueError, match="tls_client_ca_path"):
        Settings(tls_client_ca_path="/some/ca.pem")


def test_default_bind_address_is_loopback() -> None:
    assert is_loopback(Settings().server.address)
    assert is_loopback(Settings.from_sources([], {}).server.address)
    assert is_loopback("[::1]:50051") and is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:50051") and not is_loopback("[::]:50051") and not is_loopback("10.0.0.5:1")


# --- no request field names a file or a model ------------------------------------------------------------
_PATHLIKE_WORDS = ("path", "file", "dir", "url", "uri", "model", "load", "location")


def _request_fields(descriptor: object, seen: set[str]) -> Iterator[str]:
    name = descriptor.full_name  # type: ignore[attr-defined]
    if name in seen:
        return
    seen.add(name)
    for f in descriptor.fields:  # type: ignore[attr-defined]
        yield f"{name}.{f.name}"
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            yield from _request_fields(f.message_type, seen)


def test_no_request_field_can_name_a_file_path_or_model() -> None:
    service = pb.DESCRIPTOR.services_by_name["RerankerService"]
    fields: set[str] = set()
    for method in service.methods:
        fields.update(_request_fields(method.input_type, set()))
    suspicious = sorted(f for f in fields if any(w in f.rsplit(".", 1)[1].lower() for w in _PATHLIKE_WORDS))
    assert suspicious == [], f"request fields that look like paths or models: {suspicious}"
    # Every request field is one of these (a new field must be reviewed for file/model access here).
    assert fields == {
        "reranker.v1.RerankRequest.user_id", "reranker.v1.RerankRequest.candidates",
        "reranker.v1.RerankRequest.context_events", "reranker.v1.RerankRequest.top_k",
        "reranker.v1.RerankRequest.options", "reranker.v1.RerankRequest.experiment",
        "reranker.v1.RerankRequest.request_id",
        "reranker.v1.Candidate.item_id", "reranker.v1.Candidate.score", "reranker.v1.Candidate.text",
        "reranker.v1.RerankRequest.candidate_columns", "reranker.v1.CandidateColumns.item_ids",
        "reranker.v1.CandidateColumns.scores", "reranker.v1.CandidateColumns.texts",
        "reranker.v1.RerankRequest.packed_candidates", "reranker.v1.PackedCandidates.item_ids",
        "reranker.v1.PackedCandidates.scores", "reranker.v1.PackedCandidates.texts",
        "reranker.v1.RerankOptions.packed_item_ids", "reranker.v1.RerankOptions.packed_score_details",
        "reranker.v1.Event.event_id", "reranker.v1.Event.user_id", "reranker.v1.Event.item_id",
        "reranker.v1.Event.type", "reranker.v1.Event.timestamp", "reranker.v1.Event.text", "reranker.v1.Event.weight",
        "google.protobuf.Timestamp.seconds", "google.protobuf.Timestamp.nanos",
        "reranker.v1.RerankOptions.blend_weight", "reranker.v1.RerankOptions.diversity",
        "reranker.v1.RerankOptions.bypass", "reranker.v1.RerankOptions.explain", "reranker.v1.RerankOptions.columns",
        "reranker.v1.RerankOptions.consumed",
        "reranker.v1.RecordEventsRequest.events", "reranker.v1.UpsertItemsRequest.items",
        "reranker.v1.Item.item_id", "reranker.v1.Item.text",
        "reranker.v1.GetUserProfileRequest.user_id", "reranker.v1.GetUserProfileRequest.include_vector",
    }  # fmt: skip


class _OpenRecorder:
    """Process-wide audit hook (can't be removed): records file opens while `active`."""

    installed: _OpenRecorder | None = None

    def __init__(self) -> None:
        self.active = False
        self.opened: list[str] = []
        self.lock = threading.Lock()
        sys.addaudithook(self.hook)

    def hook(self, name: str, args: tuple[object, ...]) -> None:
        if self.active and name in ("open", "os.open") and args:
            with self.lock:
                self.opened.append(str(args[0]))

    @classmethod
    def get(cls) -> _OpenRecorder:
        if cls.installed is None:
            cls.installed = _OpenRecorder()
        return cls.installed


PATH_IDS = ["../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "file:///etc/hostname", "/proc/self/environ", "..\\..\\boot.ini"]


def test_path_like_ids_are_just_ids_and_no_file_is_opened(settings: Settings) -> None:
    service = RerankService(settings)  # fake encoder built by load()
    running = build_server(settings, service)
    wait_ready(running)
    recorder = _OpenRecorder.get()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.RerankerServiceStub(channel)
            _rerank(channel)  # warm the channel before recording
            recorder.opened.clear()
            recorder.active = True
            for path in PATH_IDS:
                stub.RecordEvents(pb.RecordEventsRequest(events=[event(path, path, path)]), timeout=5)
                stub.UpsertItems(pb.UpsertItemsRequest(items=[pb.Item(item_id=path, text=path)]), timeout=5)
                req = pb.RerankRequest(
                    user_id=path, experiment=path, request_id=path,
                    candidates=[candidate(path, 1.0, path), candidate(path + "-2", 0.5)],
                )  # fmt: skip
                resp = stub.Rerank(req, timeout=5)
                assert {it.item_id for it in resp.items} == {path, path + "-2"}
                assert resp.request_id == path
                profile = stub.GetUserProfile(pb.GetUserProfileRequest(user_id=path), timeout=5)
                assert profile.found and profile.user_id == path and profile.recent_events[0].item_id == path
            recorder.active = False
    finally:
        recorder.active = False
        running.stop(0)
    assert recorder.opened == [], f"files opened while serving path-like ids: {recorder.opened}"
