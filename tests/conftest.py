import collections
import os
import sys
from pathlib import Path

import skincluster  # noqa: F401  (pins tf-keras before any test imports TensorFlow)

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "ham10000-200x150"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_7_5_224_tf_no_top.h5"

import pytest  # noqa: E402

#: For every Ray runtime the tests start. Ray starts its workers at nice 15;
#: beside the other pytest-xdist worker's TensorFlow (nice 0) the trials would
#: get a few percent of the CPU and the Ray groups, the longest, would end last
#: by far: they share the CPU evenly instead.
RAY_TEST_ENV = {"RAY_worker_niceness": "0"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """The suite runs on two pytest-xdist workers (`-n 2 --dist=loadgroup` in
    pyproject.toml), one test group at a time per worker: every test on the
    session's Ray runtime in one ("ray": one runtime with the 2 CPUs the tests
    size their trials for, no second one started beside it by another
    worker), the two-node cluster's tests in another, and every other test
    with its module, so a module's fixtures are built once.

    The groups are queued longest first (`--no-loadscope-reorder` keeps this
    order): the Ray group and the cluster's take most of the suite's time, and
    a long group started last would run alone at the end while the other
    worker has nothing left to do."""
    groups = {}
    for item in items:
        if "ray_session" in item.fixturenames or item.get_closest_marker("ray"):
            group = "ray"
        elif item.get_closest_marker("cluster"):
            group = "cluster"
        else:
            group = item.module.__name__
        groups[item] = group
        item.add_marker(pytest.mark.xdist_group(group))
    sizes = collections.Counter(groups.values())
    first = {"ray": 0, "cluster": 1}
    # Then the larger modules (more tests, more time): xdist's own order.
    items.sort(key=lambda item: (first.get(groups[item], 2), -sizes[groups[item]], groups[item]))


def pytest_configure(config):
    """Refuse to run ungrouped rather than start Ray runtimes in two workers:
    pytest 9.2 drops the group suffix xdist 3.8 adds to each test's ID
    (pytest-dev/pytest-xdist#1386), hence pytest<9.2 in pyproject.toml."""
    from packaging.version import Version

    grouped = config.getoption("numprocesses", None) and config.getoption("dist", "no") == "loadgroup"
    if grouped and Version(pytest.__version__) >= Version("9.2"):
        raise pytest.UsageError(
            f"pytest-xdist cannot group the tests under pytest {pytest.__version__} "
            "(pytest-dev/pytest-xdist#1386): install the test extra's versions (pip install -e '.[test]') "
            "or run `pytest -n 0`"
        )


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory):
    """The embedded demo data set, small, ingested once for every test that trains."""
    from skincluster.data.ingest import IngestOptions, ingest
    from skincluster.data.synthetic import write_demo_dataset

    root = tmp_path_factory.mktemp("synthetic")
    write_demo_dataset(root / "source", n_images=700, image_size=(200, 150), seed=0)
    ingest(str(root / "source"), str(root / "store"), IngestOptions(), log=lambda *_: None)
    return str(root / "store")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray runtime for the whole test run (start-up costs ~5 s)."""
    import ray

    from skincluster.train.launch import ensure_ray

    for key, value in RAY_TEST_ENV.items():
        os.environ.setdefault(key, value)
    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()


class S3Server:
    """A moto S3 server on loopback, in its own process, and the settings that reach it."""

    def __init__(self, endpoint: str, credentials_file: str) -> None:
        self.endpoint = endpoint
        # What a user sets for an S3-compatible server (README "Cloud storage"); no keys
        # in the environment itself: the shared credentials file holds moto's dummies.
        self.env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_SHARED_CREDENTIALS_FILE": credentials_file,
            "AWS_REGION": "us-east-1",
            # Never wait on the EC2 metadata service for credentials or a region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, scheme="http", region="us-east-1",
                                 access_key="testing", secret_key="testing", allow_bucket_creation=True)

    def new_bucket(self, prefix: str = "b") -> str:
        import uuid

        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.filesystem().create_dir(name)
        return name


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto in server mode on a free loopback port, started and stopped by the tests.

    A subprocess, not moto's in-process ThreadedMotoServer: Ray workers in other
    processes (and other nodes) must reach it whatever this process is doing,
    and it must not compete for this process's GIL with TensorFlow. It runs as
    `python -m moto.server` from this interpreter, so the moto in the test
    environment is the one used (a `moto_server` found first on PATH can be
    another install: moto 5.2.1 answers CompleteMultipartUpload with the wrong
    XML root and every pyarrow write then fails with INTERNAL_FAILURE,
    getmoto/moto#10055).
    """
    import signal
    import subprocess
    import time
    import urllib.request

    from skincluster.train.launch import _free_port

    root = tmp_path_factory.mktemp("s3")
    credentials = root / "credentials"
    credentials.write_text("[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n")
    port = _free_port()
    log = open(root / "moto.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"moto server exited with {server.returncode}: {(root / 'moto.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"moto server on {endpoint} did not answer within 60 s")
                time.sleep(0.2)
        yield S3Server(endpoint, str(credentials))
    finally:
        # Its own process group: this stops the server and nothing else.
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process pointed at the loopback S3 server, as a user's shell would be."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    return s3_server
