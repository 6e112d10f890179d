import sys
from pathlib import Path

import skincluster  # noqa: F401  (pins tf-keras before any test imports TensorFlow)

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL_DATA = SHARED / "data" / "ham10000-200x150"
SHARED_WEIGHTS = SHARED / "weights" / "mobilenet_7_5_224_tf_no_top.h5"
