"""The job scripts only translate arguments into `skincluster` commands."""

import importlib.util

from conftest import REPO
from skincluster.cli import build_parser


def load_job(name):
    """A script of jobs/ as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_enhanced_one_worker_over_all_gpus():
    args = load_job("train_enhanced").build_args(["--data", "s3://b/store", "--gpus", "8"])
    parsed = build_parser().parse_args(args)
    assert parsed.model == "mobilenet_enhanced" and parsed.workers == 1 and parsed.gpus_per_worker == 8
    assert "mixed_precision=true" in parsed.set and "early_stopping_patience=20" in parsed.set


def test_train_enhanced_worker_per_gpu_without_early_stopping():
    args = load_job("train_enhanced").build_args(["--data", "d", "--gpus", "4", "--worker-per-gpu", "--no-early-stopping"])
    parsed = build_parser().parse_args(args)
    assert parsed.workers == 4 and parsed.gpus_per_worker == 1
    assert "early_stopping_patience=none" in parsed.set
