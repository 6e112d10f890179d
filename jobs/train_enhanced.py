"""The long run: the enhanced MobileNet (500-epoch budget) alone on one multi-GPU node.

    ray submit cluster.yaml jobs/train_enhanced.py -- --data s3://bucket/store --storage s3://bucket/runs --gpus 8

By default one Ray Train worker drives all GPUs of the node with
MirroredStrategy; `--worker-per-gpu` runs one worker per GPU with
MultiWorkerMirroredStrategy instead. Mixed precision is on. The run checkpoints
every epoch and resumes when the same command is run again (same --name and
--storage), e.g. after a spot node was preempted. Early stopping on validation
balanced accuracy is on (patience --patience); `--no-early-stopping` runs all
500 epochs. Argument parsing only: the work is `skincluster train`.
"""

import argparse
import os
import sys

from skincluster.cli import main


def build_args(argv: list[str]) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="store folder or URI")
    parser.add_argument("--storage", default="runs", help="folder or URI for the run folder")
    parser.add_argument("--name", default="mobilenet_enhanced-500", help="run name; the same name resumes")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs of the node to use")
    parser.add_argument("--cpus", type=float, default=4, help="CPUs per worker for the input pipeline")
    parser.add_argument("--worker-per-gpu", action="store_true", help="one worker per GPU (MultiWorkerMirrored)")
    parser.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    parser.add_argument("--no-early-stopping", action="store_true", help="train the whole 500-epoch budget")
    parser.add_argument("--max-failures", type=int, default=10, help="restarts allowed (spot preemptions)")
    args, passthrough = parser.parse_known_args(argv)
    workers, gpus_per_worker = (args.gpus, 1) if args.worker_per_gpu else (1, args.gpus)
    patience = "none" if args.no_early_stopping else str(args.patience)
    return [
        "train", "mobilenet_enhanced", "--data", args.data, "--storage", args.storage, "--name", args.name,
        "--profile", "full", "--workers", str(workers), "--gpus-per-worker", str(gpus_per_worker),
        "--cpus-per-worker", str(args.cpus), "--max-failures", str(args.max_failures),
        "--set", "mixed_precision=true", "--set", f"early_stopping_patience={patience}",
        *passthrough,
    ]


if __name__ == "__main__":
    # `ray submit` runs this on the head node: join its cluster (see jobs/compare.py).
    os.environ.setdefault("RAY_ADDRESS", "auto")
    sys.exit(main(build_args(sys.argv[1:])))
