"""Several re-ranker sidecar replicas behind one ``RemoteReranker``: balancing, health, failover.

Real servers on loopback: sidecar processes (``python -m dns_milvus.sidecar``, killed with
SIGKILL mid-request) and in-process ones (``BackgroundServer``), and a real DNS server (dnslib)
whose one name lists several loopback addresses, which gRPC's own resolver reads.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from dnslib import QTYPE, RR, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from dns_milvus.engine import SelectionPolicy
from dns_milvus.engine.rerank import Candidate, RerankResult
from dns_milvus.errors import BackendUnavailableError, InvalidInputError
from dns_milvus.rpc import RemoteReranker
from dns_milvus.rpc.client import channel_target
from dns_milvus.sidecar.grpc_service import set_serving
from dns_milvus.sidecar.server import BackgroundServer
from dns_milvus.testing.sidecar import SidecarProcess, launch_sidecar
from tests import test_rerank_service
from tests.test_rerank_service import Stage2, wait_until

POLICY = SelectionPolicy.parse("50%")
# The sidecar tests' fixtures: their corpus (module-scoped here too) and in-process servers.
stage2 = test_rerank_service.stage2
start_server = test_rerank_service.start_server


def work_items(stage2: Stage2, n: int) -> list[tuple[str, list[Candidate]]]:
    """(query id, candidates) for ``n`` searches over eight different queries."""
    from dns_milvus.testing.synthetic import candidates_for

    ids = [f"v{i}" for i in range(8)]
    return [
        (ids[i % len(ids)], candidates_for(stage2.corpus[ids[i % len(ids)]], stage2.corpus, "videos"))
        for i in range(n)
    ]


def run_searches(
    remote: RemoteReranker, stage2: Stage2, items: list[tuple[str, list[Candidate]]], clients: int
) -> tuple[dict[int, RerankResult], list[BaseException]]:
    """``clients`` threads share ``remote`` (as a DnSIndex serving concurrent searches does)."""
    results: dict[int, RerankResult] = {}
    failures: list[BaseException] = []
    lock = threading.Lock()
    queue = iter(range(len(items)))

    def client() -> None:
        while True:
            with lock:
                index = next(queue, None)
            if index is None:
                return
            query_id, candidates = items[index]
            try:
                result = remote.rerank(stage2.corpus[query_id], candidates, POLICY, 8)
            except BaseException as exc:
                with lock:
                    failures.append(exc)
                continue
            with lock:
                results[index] = result

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, failures


def assert_same_ranking(got: RerankResult, expected: RerankResult) -> None:
    """The same hits in the same order with the same stages; scores equal but for float rounding
    (a request scored in a batch with others' may round its last bits differently)."""
    assert [(h.video_id, h.stage) for h in got.hits] == [(h.video_id, h.stage) for h in expected.hits]
    for mine, theirs in zip(got.hits, expected.hits):
        for field in ("score", "coarse_score", "selector_confidence", "fine_score"):
            a, b = getattr(mine, field), getattr(theirs, field)
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6), (mine.video_id, field)


def served(server: BackgroundServer) -> float:
    """Rerank calls this in-process replica answered."""
    value = server.server.core.metrics.registry.get_sample_value(
        "dns_reranker_requests_total", {"protocol": "grpc", "method": "Rerank", "status": "ok"}
    )
    return value or 0.0


def inflight(replica: SidecarProcess) -> float:
    with urllib.request.urlopen(f"{replica.http_url}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("dns_reranker_inflight_requests "):
                return float(line.split()[1])
    raise AssertionError("no dns_reranker_inflight_requests in /metrics")


# -- targets -----------------------------------------------------------------------------------------


def test_a_list_of_replicas_becomes_one_balanced_target() -> None:
    listed = channel_target(["127.0.0.1:5001", "127.0.0.1:5002"])
    assert (listed.uri, listed.shown, listed.replicas) == (
        "ipv4:127.0.0.1:5001,127.0.0.1:5002", "127.0.0.1:5001,127.0.0.1:5002", 2,
    )  # fmt: skip
    assert channel_target(" 127.0.0.1:5001 , 127.0.0.1:5002 ").uri == listed.uri
    assert channel_target("[::1]:5001,[::1]:5002").uri == "ipv6:[::1]:5001,[::1]:5002"
    # host names of a list are resolved here (IPv4 first); the name stays the TLS authority
    named = channel_target("localhost:5001,127.0.0.1:5002")
    assert (named.uri, named.authority) == ("ipv4:127.0.0.1:5001,127.0.0.1:5002", "localhost:5001")
    # one address or a gRPC target URI is left to gRPC's resolver: a name may list many replicas
    assert (channel_target("sidecar:50051").uri, channel_target("sidecar:50051").replicas) == (
        "sidecar:50051", None,
    )  # fmt: skip
    assert channel_target("127.0.0.1:5001").replicas == 1
    assert channel_target("dns:///sidecar-headless:50051").uri == "dns:///sidecar-headless:50051"
    assert channel_target("ipv4:127.0.0.1:1,127.0.0.1:2").replicas == 2


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("", "host:port"),
        ([], "host:port"),
        ("127.0.0.1", "not 'host:port'"),
        ("127.0.0.1:5001,", "host:port"),
        ("::1:5001", r"IPv6 as '\[::1\]:50051'"),
        ("127.0.0.1:70000", "not 'host:port'"),
        ("127.0.0.1:5001,[::1]:5002", "mix IPv4 and IPv6"),
    ],
)
def test_bad_targets_are_refused_with_a_clear_error(target: object, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        RemoteReranker(target)  # type: ignore[arg-type]


def test_a_list_naming_a_host_that_does_not_resolve_says_which() -> None:
    with pytest.raises(BackendUnavailableError, match=r"'no-such-host\.invalid' does not resolve"):
        RemoteReranker("127.0.0.1:5001,no-such-host.invalid:5002")


# -- balancing and health (in-process replicas) --------------------------------------------------------


def test_calls_are_balanced_over_the_replicas_that_report_serving(
    stage2: Stage2, start_server: Callable[..., BackgroundServer]
) -> None:
    first, second = start_server(), start_server()
    query, candidates = stage2.query, stage2.candidates()
    with RemoteReranker([first.grpc_target, second.grpc_target], max_attempts=1) as no_retries:
        assert len(no_retries.rerank(query, candidates, POLICY, 8).hits) == 8  # a valid config
    with RemoteReranker([first.grpc_target, second.grpc_target], timeout_s=30) as remote:
        for _ in range(10):
            remote.rerank(query, candidates, POLICY, 8)
        assert served(first) >= 3 and served(second) >= 3  # round robin, not all to one

        # The second replica says NOT_SERVING (as while draining) but still answers: the health
        # check, not a failed call, takes it out of the rotation.
        health = second.server._health  # the servicer the sidecar flips when it drains
        asyncio.run_coroutine_threadsafe(set_serving(health, False), second._loop).result(10)
        wait_until(lambda: not _reaches(remote, stage2, second, calls=6))  # the watch has seen it
        before = served(second)
        for _ in range(10):
            remote.rerank(query, candidates, POLICY, 8)
        assert served(second) == before

        asyncio.run_coroutine_threadsafe(set_serving(health, True), second._loop).result(10)
        wait_until(lambda: _reaches(remote, stage2, second))


def _reaches(remote: RemoteReranker, stage2: Stage2, replica: BackgroundServer, calls: int = 1) -> bool:
    """True when one of ``calls`` calls reached ``replica``."""
    before = served(replica)
    for _ in range(calls):
        remote.rerank(stage2.query, stage2.candidates(), POLICY, 8)
    return served(replica) > before


def test_tls_replicas_named_by_host_are_verified_under_that_name(
    stage2: Stage2, start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    """A list of host names is resolved to addresses here; the TLS name checked is still the host's
    (the certificate names only 'localhost', not the address it resolves to)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    first, second = (start_server(tls_cert=str(cert), tls_key=str(key)) for _ in range(2))
    ports = first.server.grpc_port, second.server.grpc_port
    with RemoteReranker([f"localhost:{p}" for p in ports], tls=cert, timeout_s=30) as remote:
        assert remote.replicas == 2
        for _ in range(4):
            assert len(remote.rerank(stage2.query, stage2.candidates(), POLICY, 8).hits) == 8
    assert served(first) > 0 and served(second) > 0
    # by address, the certificate does not match: no replica can be used
    with (
        RemoteReranker([f"127.0.0.1:{p}" for p in ports], tls=cert, timeout_s=10) as by_address,
        pytest.raises(BackendUnavailableError, match="no re-ranker replica"),
    ):
        by_address.rerank(stage2.query, stage2.candidates(), POLICY, 8)


def test_when_every_replica_is_down_the_error_says_so_at_once(
    stage2: Stage2, start_server: Callable[..., BackgroundServer], tmp_path: Path
) -> None:
    from dns_milvus.engine import DnSIndex

    first, second = start_server(), start_server()
    targets = f"{first.grpc_target},{second.grpc_target}"
    remote = RemoteReranker(targets, timeout_s=30)
    with DnSIndex(str(tmp_path / "lite.db"), models=stage2.models, store=stage2.store, collection="videos",
                  reranker=remote) as index:  # fmt: skip
        index.write_records(list(stage2.corpus.values()))
        assert not index.search("v0", top_k=5, candidates=15, policy="all").degraded
        first.stop(grace_s=1.0)
        second.stop(grace_s=1.0)
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailableError) as info:
            remote.rerank(stage2.query, stage2.candidates(), POLICY, 8)
        # refused by the balancer once no replica is reachable, not after the 30 s deadline
        assert time.monotonic() - t0 < 15
        message = str(info.value)
        assert f"no re-ranker replica of {targets} could serve the call (2 replicas" in message
        assert info.value.status_code == "UNAVAILABLE"  # type: ignore[attr-defined]
        degraded = index.search("v0", top_k=5, candidates=15, policy="all")
    remote.close()
    assert degraded.degraded and "no re-ranker replica" in degraded.warnings[0]


# -- a replica killed mid-request (real processes) -------------------------------------------------------


@pytest.mark.slow  # two fresh interpreters import torch and load the model set
def test_killing_a_replica_mid_stream_fails_no_search(stage2: Stage2, tmp_path: Path) -> None:
    # Each request waits up to 300 ms for its batch to fill, so both replicas always hold some.
    settings = {"MAX_WAIT_MS": "300"}
    replicas = [
        launch_sidecar(stage2.model_dir, stage2.store_dir, tmp_path / f"r{i}", settings=settings)
        for i in range(2)
    ]
    try:
        for replica in replicas:
            replica.wait_ready()
        doomed, survivor = replicas
        items = work_items(stage2, 160)
        with RemoteReranker(survivor.grpc_target, timeout_s=60) as single:
            expected = {q: single.rerank(stage2.corpus[q], c, POLICY, 8) for q, c in items[:8]}

        killed_with_inflight: list[float] = []

        def kill_mid_stream() -> None:
            # as soon as the doomed replica holds requests (each waits ~300 ms more for its batch)
            deadline = time.monotonic() + 60
            while (holding := inflight(doomed)) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            doomed.kill()
            killed_with_inflight.append(holding)

        killer = threading.Thread(target=kill_mid_stream)
        with RemoteReranker([r.grpc_target for r in replicas], timeout_s=60) as remote:
            killer.start()
            results, failures = run_searches(remote, stage2, items, clients=8)
            killer.join()
            assert killed_with_inflight and killed_with_inflight[0] >= 2
            assert doomed.proc.returncode == -9  # it died by SIGKILL, mid-stream
            assert failures == []
            assert len(results) == len(items)
            for index, (query_id, _) in enumerate(items):
                assert_same_ranking(results[index], expected[query_id])

            # and with the last replica gone too: one clear error
            survivor.kill()
            with pytest.raises(BackendUnavailableError, match=r"no re-ranker replica of 127\.0\.0\.1:"):
                remote.rerank(stage2.query, stage2.candidates(), POLICY, 8)
    finally:
        for replica in replicas:
            replica.kill()


# -- one DNS name for every replica ------------------------------------------------------------------------


class _Zone(BaseResolver):
    """A DNS zone with one name whose A records can change while it is served."""

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name
        self.addresses = list(addresses)

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]  # dnslib's signature
        reply = request.reply()
        if str(request.q.qname).rstrip(".") == self.name and request.q.qtype == QTYPE.A:
            for address in list(self.addresses):
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
        return reply


@pytest.fixture
def dns_zone() -> Iterator[tuple[_Zone, int]]:
    zone = _Zone("replicas.dns-milvus.test", [])
    server = DNSServer(zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _: None))
    server.start_thread()
    yield zone, server.server.server_address[1]
    server.stop()


def _port_free_on(host: str, port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def test_one_dns_name_that_lists_several_replicas(
    stage2: Stage2, start_server: Callable[..., BackgroundServer], dns_zone: tuple[_Zone, int]
) -> None:
    """A name with two A records (as a Kubernetes headless Service has): both replicas serve; one
    drains mid-stream with no failed search; a replica added to the name later is reached once
    the connections age out (the servers' max_connection_age) and gRPC resolves the name again."""
    zone, dns_port = dns_zone
    # Same port on three loopback addresses: the name carries addresses, not ports.
    first = start_server(host="127.0.0.2", max_connection_age_s=1.0, grace_s=5.0)
    port = first.server.grpc_port
    if not (_port_free_on("127.0.0.3", port) and _port_free_on("127.0.0.4", port)):
        pytest.skip(f"port {port} is taken on 127.0.0.3 or 127.0.0.4")
    second = start_server(host="127.0.0.3", grpc_port=port, max_connection_age_s=1.0, grace_s=5.0)
    zone.addresses = ["127.0.0.2", "127.0.0.3"]
    target = f"dns://127.0.0.1:{dns_port}/{zone.name}:{port}"
    # gRPC resolves a name at most every 30 s by default; the test cannot wait that long.
    fast = [("grpc.dns_min_time_between_resolutions_ms", 200)]
    with RemoteReranker(target, timeout_s=30, channel_options=fast) as remote:
        assert remote.replicas is None  # the name decides
        items = work_items(stage2, 24)
        results, failures = run_searches(remote, stage2, items, clients=4)
        assert failures == [] and served(first) > 0 and served(second) > 0

        stopping = threading.Thread(target=first.stop, kwargs={"grace_s": 2.0})
        stopping.start()  # drains: NOT_SERVING, in-flight calls finish, new ones go elsewhere
        results, failures = run_searches(remote, stage2, work_items(stage2, 40), clients=4)
        stopping.join()
        assert failures == [] and len(results) == 40

        third = start_server(host="127.0.0.4", grpc_port=port, max_connection_age_s=1.0, grace_s=5.0)
        zone.addresses = ["127.0.0.3", "127.0.0.4"]
        wait_until(lambda: _reaches(remote, stage2, third), timeout_s=30)


# -- the command line ----------------------------------------------------------------------------------------


def test_the_cli_searches_through_replicas_from_a_flag_or_a_config_list(
    stage2: Stage2,
    start_server: Callable[..., BackgroundServer],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from dns_milvus.cli import main
    from dns_milvus.engine import DnSIndex

    first, second = start_server(), start_server()
    uri = str(tmp_path / "lite.db")
    with DnSIndex(uri, models=stage2.models, store=stage2.store, collection="videos") as index:
        index.write_records(list(stage2.corpus.values()))
        local = index.search("v0", top_k=5, candidates=15, policy="all")
    monkeypatch.chdir(tmp_path)
    common = ["--uri", uri, "--models", str(stage2.model_dir), "--store", str(stage2.store_dir)]
    search = ["search", "--id", "v0", "-k", "5", "--candidates", "15", "--policy", "all", "--json"]

    assert main([*search, *common, "--reranker", f"{first.grpc_target},{second.grpc_target}"]) == 0
    by_flag = json.loads(capsys.readouterr().out)
    (tmp_path / "dns-milvus.toml").write_text(f"reranker = [{first.grpc_target!r}, {second.grpc_target!r}]\n")
    assert main([*search, *common]) == 0
    by_config = json.loads(capsys.readouterr().out)
    for response in (by_flag, by_config):
        assert not response["degraded"]
        assert [h["video_id"] for h in response["hits"]] == [h.video_id for h in local.hits]
    # one call each (stage 2 went to the sidecars, not in-process); which replica takes a process's
    # first call is whichever connects first
    assert served(first) + served(second) == 2
