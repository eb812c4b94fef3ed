"""The Kubernetes deployment (docker/k8s/) is valid and agrees with the code, offline.

Each manifest is validated against the Kubernetes API schemas that kubernetes-validate bundles
(strict: an unknown field is an error), for the oldest release the manifests need (1.27: gRPC
probes) and the newest bundled. What a schema cannot know is checked against the code itself:
every setting is one the sidecar or the SDK reads, the probes ask the health service the
sidecar serves, the autoscaler's metrics come from series the sidecar exports, the store URI
opens as the project reads it, and Milvus's files and the fine tensors never share a prefix.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate
from prometheus_client import generate_latest

from dns_milvus.config import Settings
from dns_milvus.rpc.client import SERVICE_NAME, channel_target
from dns_milvus.sidecar.config import ENV_PREFIX, ServerConfig, load_config
from dns_milvus.sidecar.metrics import Metrics
from dns_milvus.store import open_store

K8S = Path(__file__).resolve().parents[1] / "docker" / "k8s"
MANIFESTS = ("namespace.yaml", "settings.yaml", "reranker.yaml")
HELM_VALUES = ("milvus-values.yaml", "prometheus-adapter-values.yaml")
#: gRPC probes are GA from 1.27; the newest schemas the package bundles.
KUBERNETES_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())


def load(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def objects() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of the manifests by (kind, name)."""
    found = {}
    for name in MANIFESTS:
        for doc in load(name):
            key = (doc["kind"], doc["metadata"]["name"])
            assert key not in found, f"{key} defined twice"
            found[key] = doc
    return found


def get(kind: str, name: str) -> dict[str, Any]:
    return objects()[(kind, name)]


def container() -> dict[str, Any]:
    (only,) = get("Deployment", "dns-reranker")["spec"]["template"]["spec"]["containers"]
    return only


def sidecar_environment() -> dict[str, str]:
    """The sidecar's DNS_RERANKER_* variables as a pod gets them (ConfigMap, then env)."""
    settings = get("ConfigMap", "dns-milvus-settings")["data"]
    env = dict(get("ConfigMap", "dns-reranker-settings")["data"])
    for variable in container()["env"]:
        ref = variable["valueFrom"]["configMapKeyRef"]
        assert ref["name"] == "dns-milvus-settings"
        env[variable["name"]] = settings[ref["key"]]
    return env


def milvus_values() -> dict[str, Any]:
    (values,) = load("milvus-values.yaml")
    return values


def test_the_kustomization_applies_every_manifest() -> None:
    (kustomization,) = load("kustomization.yaml")
    assert kustomization["resources"] == list(MANIFESTS)
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", *HELM_VALUES}
    assert on_disk == set(MANIFESTS)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("manifest", MANIFESTS)
def test_every_manifest_validates_against_the_kubernetes_schemas(manifest: str, version: str) -> None:
    for doc in load(manifest):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_validator_refuses_what_kubernetes_would() -> None:
    """The check above can fail: a misspelt probe field and a named probe port are refused."""
    deployment = get("Deployment", "dns-reranker")
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["serviceName"] = "x"
    named_port = copy.deepcopy(deployment)
    named_port["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = "grpc"
    for broken in (misspelt, named_port):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_every_object_is_in_the_namespace_and_part_of_dns_milvus() -> None:
    (namespace,) = load("namespace.yaml")
    for (kind, name), doc in objects().items():
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "dns-milvus", name
        if kind != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"], name


def test_the_sidecar_reads_every_setting_given_to_it() -> None:
    env = sidecar_environment()
    settings = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(ServerConfig)}
    assert set(env) - settings == set()
    config = load_config([], environ=env)  # the values parse and validate as the sidecar's own
    assert config.store.startswith("s3://") and config.host == "0.0.0.0"


def test_the_clients_read_every_setting_given_to_them() -> None:
    data = get("ConfigMap", "dns-milvus-settings")["data"]
    known = {f"DNS_MILVUS_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    assert set(data) - known == set()


def test_probes_ask_the_health_service_the_sidecar_serves() -> None:
    reranker = container()
    env = sidecar_environment()
    ports = {p["name"]: p["containerPort"] for p in reranker["ports"]}
    assert ports == {"grpc": int(env["DNS_RERANKER_GRPC_PORT"]), "http": int(env["DNS_RERANKER_HTTP_PORT"])}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert reranker[probe]["grpc"]["port"] == ports["grpc"], probe
    # readiness follows the service the sidecar marks NOT_SERVING as it drains
    assert reranker["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert reranker["startupProbe"]["grpc"]["service"] == SERVICE_NAME
    template = get("Deployment", "dns-reranker")["spec"]["template"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == str(ports["http"])


def test_the_drain_fits_in_the_termination_grace_period() -> None:
    env = sidecar_environment()
    pod = get("Deployment", "dns-reranker")["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > float(env["DNS_RERANKER_GRACE_S"])
    # connections age out, so clients of the headless Service find replicas added since
    assert float(env["DNS_RERANKER_MAX_CONNECTION_AGE_S"]) > 0


def test_the_services_select_the_sidecar_pods_on_named_ports() -> None:
    deployment = get("Deployment", "dns-reranker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    headless, http = get("Service", "dns-reranker-grpc"), get("Service", "dns-reranker-http")
    assert headless["spec"]["clusterIP"] == "None"  # DNS lists every ready pod: client-side balancing
    for service in (headless, http):
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    budget = get("PodDisruptionBudget", "dns-reranker")["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_clients_reach_every_replica_through_the_headless_service() -> None:
    headless = get("Service", "dns-reranker-grpc")
    (port,) = headless["spec"]["ports"]
    name, namespace = headless["metadata"]["name"], headless["metadata"]["namespace"]
    address = get("ConfigMap", "dns-milvus-settings")["data"]["DNS_MILVUS_RERANKER"]
    assert address == f"dns:///{name}.{namespace}.svc.cluster.local:{port['port']}"
    assert channel_target(address).replicas is None  # gRPC resolves it: every ready pod


def test_the_autoscaler_scales_the_sidecar_on_series_it_exports() -> None:
    deployment = get("Deployment", "dns-reranker")
    hpa = get("HorizontalPodAutoscaler", "dns-reranker")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dns-reranker"}
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    (adapter,) = load("prometheus-adapter-values.yaml")
    rules = {rule["name"]["as"]: rule for rule in adapter["rules"]["custom"]}
    exported = {
        line.split("{")[0].split()[0]
        for line in generate_latest(Metrics().registry).decode().splitlines()
        if line and not line.startswith("#")
    }
    for metric in hpa["metrics"]:
        assert metric["type"] == "Pods"
        rule = rules[metric["pods"]["metric"]["name"]]  # the adapter serves it
        series = re.match(r"([a-z_]+)\{", rule["seriesQuery"])[1]  # type: ignore[index]
        assert series in exported, series  # from a series the sidecar exports
        assert re.fullmatch(rule["name"]["matches"], series)
    # the scorers' busy seconds are summed over the pod's scorers: the target is a share of them
    (busy,) = [m for m in hpa["metrics"] if m["pods"]["metric"]["name"] == "dns_reranker_scorer_busy_ratio"]
    target = float(busy["pods"]["target"]["averageValue"].removesuffix("m")) / 1000
    duty_cycle = target / int(sidecar_environment()["DNS_RERANKER_FINE_SCORERS"])
    assert 0.5 <= duty_cycle <= 0.9, duty_cycle


def test_the_store_uri_opens_as_the_project_reads_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fine tensors' bucket is Milvus's, under a prefix Milvus never writes: repair lists
    the store's prefix, and must never see Milvus's files as orphans."""
    monkeypatch.setenv("DNS_S3_ACCESS_KEY", "placeholder")  # a client is built, nothing is sent
    monkeypatch.setenv("DNS_S3_SECRET_KEY", "placeholder")
    store = open_store(get("ConfigMap", "dns-milvus-settings")["data"]["DNS_MILVUS_STORE"])
    s3 = milvus_values()["externalS3"]
    assert (store.bucket, store.region) == (s3["bucketName"], s3["region"])  # type: ignore[attr-defined]
    milvus_prefix = s3["rootPath"].strip("/") + "/"
    assert store.prefix and not store.prefix.startswith(milvus_prefix)  # type: ignore[attr-defined]
    assert not milvus_prefix.startswith(store.prefix)  # type: ignore[attr-defined]


def test_the_milvus_values_describe_a_cluster_on_the_s3_bucket() -> None:
    values = milvus_values()
    assert values["cluster"]["enabled"] is True
    assert values["minio"]["enabled"] is False and values["externalS3"]["enabled"] is True
    assert values["externalS3"]["host"] == f"s3.{values['externalS3']['region']}.amazonaws.com"
    replicas = yaml.safe_load(values["extraConfigFiles"]["user.yaml"])["queryCoord"][
        "clusterLevelLoadReplicaNumber"
    ]
    assert values["queryNode"]["replicas"] >= replicas  # each in-memory replica on its own nodes
    # the release "milvus" in the namespace: its proxy Service is the URI the clients use
    uri = urlsplit(get("ConfigMap", "dns-milvus-settings")["data"]["DNS_MILVUS_URI"])
    assert (uri.hostname, uri.port) == ("milvus.dns-milvus.svc.cluster.local", 19530)


def test_the_sidecar_uses_the_cores_it_requests() -> None:
    """Torch's threads and the fine scorers' match the CPU request: left to their defaults they
    would size themselves by the node's cores, not by this container's share of them."""
    env = sidecar_environment()
    cpus = int(container()["resources"]["requests"]["cpu"])
    assert int(env["DNS_RERANKER_TORCH_THREADS"]) == cpus
    assert int(env["DNS_RERANKER_FINE_SCORERS"]) * int(env["DNS_RERANKER_FINE_THREADS"]) == cpus
    assert int(env["DNS_RERANKER_FINE_SCORERS"]) == ServerConfig.fine_scorers  # the measured default
