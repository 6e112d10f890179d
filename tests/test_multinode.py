"""A real two-node Ray cluster on this machine: `ray start --head`, `ray start --address`, `ray job submit`.

The cluster is the test's own: its own temp dir, ports, and auth token (token
authentication stays on, as on a real cluster), separate from the test
session's local Ray. Each `ray start --block` leads its own process group, so
stopping the cluster signals exactly those groups; `ray stop` is never used
because it stops every Ray process on the machine.

The smoke comparison of a small model runs with two Train workers of 0.75
CPU each on two 1-CPU nodes: two such workers cannot share a node, so the
trial's MultiWorkerMirroredStrategy run must span both nodes, which the test
then checks from Ray's own record of where the workers ran (node IDs: both
nodes share the loopback IP).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import RAY_TEST_ENV, REPO
from skincluster import storage
from skincluster.train.launch import _free_port

RAY = str(Path(sys.executable).parent / "ray")
#: One trial: what the test checks is where its two workers ran; a second model
#: would only repeat that.
MODELS = ("nn",)
pytestmark = pytest.mark.cluster

#: How often the second node may try to join the head before the fixture fails.
JOIN_ATTEMPTS = 3


class NodeExited(RuntimeError):
    """A `ray start` process exited before its node was up."""

    def __init__(self, process: subprocess.Popen, message: str) -> None:
        super().__init__(message)
        self.process = process


class LocalCluster:
    """Two `ray start --block` processes, each the leader of its own process group."""

    def __init__(self, env: dict[str, str], temp_dir: str) -> None:
        self.env = env
        self.temp_dir = temp_dir
        self.gcs_port = _free_port()
        self.dashboard_port = _free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        #: `ray start` processes of join attempts that exited early and were given up on.
        self.failed: list[subprocess.Popen] = []

    def _node_ports(self) -> list[str]:
        # Every port a node opens, chosen free here: the defaults (dashboard agent
        # 52365, ...) may already belong to the test session's own Ray.
        names = ("--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port")
        args = [f"{n}={_free_port()}" for n in names]
        return args

    def _start(self, args: list[str]) -> None:
        log = Path(self.temp_dir) / f"ray-start-{len(self.procs)}.log"
        self.logs.append(log)
        with open(log, "wb") as fh:
            self.procs.append(subprocess.Popen(
                [RAY, "start", "--block", "--num-cpus", "1", "--node-ip-address", "127.0.0.1", *self._node_ports(), *args],
                env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            ))

    def start(self) -> None:
        self._start(["--head", f"--port={self.gcs_port}", f"--temp-dir={self.temp_dir}", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"])
        self.wait_for_nodes(1)
        # Its own temp dir, as on a separate machine: with the head's, both nodes' runtime-env
        # agents share one runtime_resources folder, and the second node's deletes the job's
        # working_dir (the driver's cwd on the head) once its own workers are done with it.
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            self._start([f"--address=127.0.0.1:{self.gcs_port}", f"--temp-dir={self.temp_dir}/n2"])
            try:
                self.wait_for_nodes(2)
                return
            except NodeExited as exc:
                # Seen once on a loaded 2-core machine (another pytest-xdist worker
                # training): the joining node's `ray start` gave up on the head's GCS
                # ("Failed to get node info: RPC error: Deadline Exceeded") and exited.
                # A node that fails to join is started again, as an autoscaler would.
                if attempt == JOIN_ATTEMPTS or exc.process is not self.procs[-1]:
                    raise
                self.failed.append(exc.process)
                print(f"second node failed to join (attempt {attempt}), starting it again:\n{exc}", file=sys.stderr)

    def ray(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=env or self.env, capture_output=True, text=True, timeout=timeout)

    def nodes(self) -> list[dict]:
        done = self.ray("list", "nodes", "--address", self.dashboard, "--format", "json", "--detail")
        if done.returncode != 0 or not done.stdout.lstrip().startswith("["):
            return []  # not up yet (or "No resource in the cluster" instead of JSON)
        return [n for n in json.loads(done.stdout) if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while len(self.nodes()) < count:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None and proc not in self.failed:
                    raise NodeExited(proc, f"`ray start` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            if time.time() > deadline:
                raise RuntimeError(f"{count} Ray node(s) not up after {timeout} s; logs in {self.temp_dir}")
            time.sleep(1)

    def stop(self) -> None:
        """SIGTERM each `ray start` group, then SIGKILL whatever of the recorded tree is left.

        Ray's workers put themselves in process groups of their own, so the tree
        under the two `ray start` processes (raylet, GCS, agents, workers) is
        recorded first; only those processes are ever signalled.
        """
        tree = set()
        for proc in self.procs:
            tree |= {proc.pid, *_descendants(proc.pid)}
        for proc in self.procs:
            try:  # also the group of a node that failed to join: its leader is gone, some of it may not be
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while any(_running(pid) for pid in tree) and time.time() < deadline:
            for proc in self.procs:
                proc.poll()  # reap our direct children
            time.sleep(0.2)
        for pid in tree:
            if _running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            proc.wait()
        time.sleep(0.5)
        self.left_running = sorted(pid for pid in tree if _running(pid))


def _parents() -> dict[int, int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
                    parents[int(entry)] = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return parents


def _descendants(root: int) -> set[int]:
    parents, found, frontier = _parents(), set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited and only awaits its parent's wait)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def cluster(s3_server):
    # A short temp dir: Ray puts Unix sockets in it, and their paths may not exceed 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="skc-ray-", dir="/tmp")
    token = Path(temp_dir) / "auth_token"
    from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

    token.write_text(generate_new_authentication_token())
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_"))}  # nothing of the test session's Ray, nor its S3 settings
    env.update(RAY_TEST_ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))
    local = LocalCluster(env, temp_dir)
    try:
        local.start()
        yield local
    finally:
        local.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert local.left_running == [], f"processes of the test's cluster still running: {local.left_running}"


def test_cluster_refuses_a_client_without_its_token(cluster, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text("0" * 64)
    done = cluster.ray("list", "nodes", "--address", cluster.dashboard,
                       env={**cluster.env, "RAY_AUTH_TOKEN_PATH": str(wrong)}, timeout=60)
    assert done.returncode != 0
    assert "token" in (done.stdout + done.stderr).lower(), done.stdout + done.stderr
    assert len(cluster.nodes()) == 2  # ... while the right token still works


def test_submitted_comparison_trains_on_both_nodes_and_writes_to_s3(cluster, s3_server, synthetic_store, monkeypatch):
    started = time.time()
    bucket = s3_server.new_bucket("mn")
    # The store is ingested into the bucket by the client, as in the README.
    store = f"s3://{bucket}/store"
    subprocess.run([sys.executable, "-m", "skincluster", "ingest", str(Path(synthetic_store).parent / "source"), store],
                   env={**os.environ, **s3_server.env}, check=True, capture_output=True, timeout=300)
    experiments = f"s3://{bucket}/experiments"
    # The nodes were started without any S3 settings: the job carries them, as it
    # would for MinIO on a real cluster (on AWS the nodes' instance profile does).
    runtime_env = {"env_vars": s3_server.env, "excludes": [".git", ".venv", "demo", "runs", "*.egg-info"]}
    submit = cluster.ray(
        "job", "submit", "--address", cluster.dashboard, "--working-dir", str(REPO),
        "--runtime-env-json", json.dumps(runtime_env), "--",
        sys.executable, "jobs/compare.py", "--data", store, "--storage", experiments, "--name", "mn",
        "--profile", "smoke", "--models", ",".join(MODELS),
        "--workers", "2", "--cpus-per-worker", "0.75", "--max-concurrent", "1",
        "--set", "epochs=1",  # one epoch is enough to see where the workers ran; start-up dominates
        timeout=900,
    )
    output = submit.stdout + submit.stderr
    assert submit.returncode == 0 and "succeeded" in output, output[:6000] + "\n...\n" + output[-4000:]

    # The results landed in the (loopback) bucket; this process reads it as the user would.
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    fs, path = storage.resolve(f"{experiments}/mn")
    table = pd.read_csv(fs.open_input_stream(f"{path}/results.csv")).set_index("model")
    assert sorted(table.index) == sorted(MODELS)
    assert (table["status"] == "finished").all()
    for model in MODELS:
        assert storage.exists(fs, f"{path}/runs/{model}/evaluation.json"), model
    assert storage.exists(fs, f"{path}/report.md") and storage.exists(fs, f"{path}/best/model.keras")

    # Each trial's Train workers ran on both nodes.
    nodes = {n["node_id"] for n in cluster.nodes()}
    assert len(nodes) == 2
    listed = cluster.ray("list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail",
                         "--limit", "10000", "--filter", "class_name=RayTrainWorker")
    assert listed.returncode == 0, listed.stderr
    groups: dict[str, set[str]] = {}
    for actor in json.loads(listed.stdout):
        groups.setdefault(actor["placement_group_id"], set()).add(actor["node_id"])
    assert len(groups) == len(MODELS), groups  # one worker group per trial (no retries)
    for placement_group, used in groups.items():
        assert used == nodes, f"workers of placement group {placement_group} ran on {used}, cluster nodes {nodes}"
    # ... while each trial and its Train controller stayed on the head, which is never a spot node.
    head = {n["node_id"] for n in cluster.nodes() if n["is_head_node"]}
    for class_name in ("ImplicitFunc", "TrainController"):
        listed = cluster.ray("list", "actors", "--address", cluster.dashboard, "--format", "json", "--detail",
                             "--limit", "10000", "--filter", f"class_name={class_name}")
        assert listed.returncode == 0, listed.stderr
        placed = {a["node_id"] for a in json.loads(listed.stdout)}
        assert placed == head, f"{class_name} ran on {placed}, the head is {head}"
    print(f"multi-node comparison: {time.time() - started:.0f} s")
