"""deploy/: the Kubernetes manifests, read as YAML and checked against the server they run (no
cluster or kustomize binary here: the overlay's JSON patches are applied by this test)."""
import re
import shlex
from pathlib import Path

import pytest
import yaml

from batchrl.serve import parser
from batchrl.serving.server import DRAIN_BOUND

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def documents(folder: Path) -> list[dict]:
    """Every YAML document of a kustomization's resources (recursively through bases)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        if path.is_dir():
            docs += build(path)
        else:
            assert path.is_file(), f"{folder}: resource {resource} does not exist"
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def build(folder: Path) -> list[dict]:
    """The resources with the kustomization's JSON 6902 patches applied ("add" is what deploy/ uses)."""
    docs = documents(folder)
    for patch in yaml.safe_load((folder / "kustomization.yaml").read_text()).get("patches", []):
        targets = [d for d in docs if d["kind"] == patch["target"]["kind"]
                   and d["metadata"]["name"] == patch["target"]["name"]]
        assert len(targets) == 1, patch["target"]
        for op in yaml.safe_load(patch["patch"]):
            assert op["op"] == "add", op
            *parents, last = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].strip("/").split("/")]
            node = targets[0]
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if last == "-":
                node.append(op["value"])
            else:
                node[last] = op["value"]
    return docs


def by_kind(docs, kind, name):
    [doc] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def dockerfile_entrypoint(target: str) -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    stage = text.split(f"AS {target}\n", 1)[1].split("\nFROM ", 1)[0]
    [line] = [line for line in stage.splitlines() if line.startswith("ENTRYPOINT")]
    return yaml.safe_load(line.removeprefix("ENTRYPOINT"))


def test_every_yaml_document_loads_and_names_itself():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert len(files) >= 7
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc and doc.get("apiVersion") and doc.get("kind"), path


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_the_server_runs_the_serving_image_with_flags_the_server_has(variant):
    docs = build(DEPLOY / variant)
    deployment = by_kind(docs, "Deployment", "batchrl-server")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    # the serving image: the Dockerfile's `serve` target, tagged as the Dockerfile says to build it
    assert container["image"].split(":")[0] == "batchrl-serve"
    assert "--target serve -t batchrl-serve" in (ROOT / "Dockerfile").read_text()
    entrypoint = dockerfile_entrypoint("serve")
    assert entrypoint[:2] == ["batchrl", "serve"]
    args = parser().parse_args(entrypoint[2:] + [str(a) for a in container["args"]])  # exits on an unknown flag
    assert args.repository == "/models"
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == args.repository and mount["readOnly"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == int(args.address.rsplit(":", 1)[1]) and args.address.startswith("0.0.0.0:")
    assert ports["metrics"] == args.metrics_port and args.metrics_address == "0.0.0.0"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe  # native gRPC health probes
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > float(sleep[1]) + args.grace + DRAIN_BOUND
    # sessions in the Redis that deploy/ runs
    redis = by_kind(docs, "Service", "batchrl-redis")
    assert args.session_store == f"redis://{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/0"
    if variant == "overlays/gpu":
        assert args.device == "cuda" and container["resources"]["limits"]["nvidia.com/gpu"] == 1
    else:
        assert args.device == "auto"
    assert [v for v in pod["volumes"] if v["name"] == mount["name"]][0]["persistentVolumeClaim"]["claimName"] == \
        by_kind(docs, "PersistentVolumeClaim", "batchrl-models")["metadata"]["name"]


def test_the_service_spreads_rpcs_and_the_autoscaler_scales_the_server():
    docs = build(DEPLOY / "base")
    deployment = by_kind(docs, "Deployment", "batchrl-server")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind(docs, "Service", "batchrl-server")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance RPCs with round_robin over DNS
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert "round_robin" in (DEPLOY / "base" / "service.yaml").read_text()
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "batchrl-server")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "batchrl-server"}
    assert hpa["spec"]["minReplicas"] >= 2 <= deployment["spec"]["replicas"]
    redis = by_kind(docs, "Deployment", "batchrl-redis")
    redis_args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis_args[:2] == ["--save", ""]  # sessions are short-lived: nothing on disk


def test_the_readme_of_deploy_names_what_it_checks():
    text = (DEPLOY / "README.md").read_text()
    for command in re.findall(r"^kubectl .*$", text, re.M):
        path = shlex.split(command.split("#")[0])[-1]
        assert (ROOT / path / "kustomization.yaml").is_file(), command
