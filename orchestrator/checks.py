"""Checks of a valid spec against the world, run before anything is written.

- `check_models`: each model's config is readable (no weights) and has the layers patching,
  attribution, knockout and probes ask for.
- `check_backends`: the behaviour backend the spec names can be imported here.
- `check_resources`: an actor of the spec fits on a node of the cluster just joined (so a sweep
  that could never place an actor fails at once, not after waiting forever).

Each raises `SpecError` listing every problem as `file: field = value: what is wrong; fix: ...`.
"""

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.local_models import local_problem
from orchestrator.protocol import LAYERED
from orchestrator.spec import Spec, SpecError

if TYPE_CHECKING:
    from orchestrator.cluster import Cluster


def _raise(path: str | Path, problems: list[str]) -> None:
    if problems:
        raise SpecError(f"{path}: the spec is not valid:\n" + "\n".join(problems))


def check_models(spec: Spec, path: str | Path = "<spec>") -> dict[str, int]:
    """Read each model's config (no weights) and check the layers the spec asks for.

    Returns:
        model id -> number of layers.

    Raises:
        SpecError: a model that cannot be found, or a layer out of range.
    """
    n_layers: dict[str, int] = {}
    problems = []
    for i, model in enumerate(spec.models):
        problem = local_problem(model.id)
        if problem is not None:
            problems.append(
                f"  models.{i}.id = {model.id!r}: {problem}; fix: give a folder written by "
                "save_pretrained (check the path's spelling), or a hub id"
            )
            continue
        from transformers import AutoConfig  # after the local check: a typo fails without it

        try:
            config = AutoConfig.from_pretrained(model.id)
        except (OSError, ValueError) as err:
            problems.append(
                f"  models.{i}.id = {model.id!r}: not found ({str(err).splitlines()[0]}); fix: "
                "give a folder written by save_pretrained, or a hub id that is cached or reachable"
            )
            continue
        layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
        n_layers[model.id] = int(layers)
        for kind in LAYERED:
            experiment = getattr(spec.experiments, kind)
            if experiment is None or experiment.layers is None:
                continue
            # Probes read one more: the stream leaving the last layer.
            last = n_layers[model.id] - (0 if kind == "probes" else 1)
            bad = [x for x in experiment.layers if x > last]
            if bad:
                problems.append(
                    f"  experiments.{kind}.layers = {experiment.layers}: {bad} out of range for "
                    f"{model.id} (layers 0..{last}); fix: drop them, or omit "
                    "layers to use every layer"
                )
    _raise(path, problems)
    return n_layers


def check_backends(spec: Spec, path: str | Path = "<spec>") -> None:
    """The packages the spec's settings need are installed (found, not imported: importing vLLM
    needs CUDA, and the driver may run on a CPU head node whose workers have GPUs).

    Raises:
        SpecError: `backend: vllm` without vLLM, or int8/nf4 without bitsandbytes.
    """
    problems = []
    behavior = spec.experiments.behavior
    if behavior is not None and behavior.backend == "vllm" and not _installed("vllm"):
        problems.append(
            "  experiments.behavior.backend = 'vllm': vLLM is not installed here (import vllm "
            "finds no module); fix: install the extra (uv run --extra vllm ..., or pip install "
            "-e '.[vllm]') on a GPU machine, or use backend: auto (vLLM where it is installed, "
            "else Hugging Face) or hf"
        )
    for i, model in enumerate(spec.models):
        if model.quantization in ("int8", "nf4") and not _installed("bitsandbytes"):
            problems.append(
                f"  models.{i}.quantization = {model.quantization!r}: bitsandbytes is not "
                "installed; fix: pip install bitsandbytes, or quantization: none"
            )
    _raise(path, problems)


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def check_resources(spec: Spec, cluster: "Cluster", path: str | Path = "<spec>") -> None:
    """One actor of the spec fits on one node of `cluster` (an actor never spans nodes).

    Raises:
        SpecError: `gpus_per_actor` or `cpus_per_actor` above what any node has.
    """
    res = spec.resources
    problems = []
    gpus = res.gpus_per_actor
    if gpus != "auto" and gpus > cluster.max_node_gpus:
        problems.append(
            f"  resources.gpus_per_actor = {gpus:g}: the cluster at {cluster.address} has "
            f"{cluster.gpus:g} GPUs, at most {cluster.max_node_gpus:g} on one node, so no actor "
            "could start; fix: lower gpus_per_actor (0 runs the actors on CPUs; auto uses one "
            "GPU per actor where there are GPUs), or join a cluster with larger GPU nodes "
            "(--address); an autoscaling cluster needs GPU nodes up first (min_workers >= 1)"
        )
    if res.cpus_per_actor > cluster.max_node_cpus:
        problems.append(
            f"  resources.cpus_per_actor = {res.cpus_per_actor:g}: the cluster at "
            f"{cluster.address} has at most {cluster.max_node_cpus:g} CPUs on one node; fix: "
            f"lower cpus_per_actor to {cluster.max_node_cpus:g} or less"
        )
    _raise(path, problems)
