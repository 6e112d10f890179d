import sys
from pathlib import Path

import skincluster  # noqa: F401  (pins tf-keras before any test imports TensorFlow)

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "ham10000-200x150"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_7_5_224_tf_no_top.h5"

import pytest  # noqa: E402


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

    ensure_ray(num_cpus=2)
    yield ray
    ray.shutdown()
