"""Checkpoints as a sweep axis: the folders a glob matches, each with its training step.

`models/train_binding.py` saves each snapshot as a `save_pretrained` folder with a
`training_state.json` (`{"step": N, ...}`) beside the weights. A spec's model entry
`{checkpoints: models/binding-traj-step*}` stands for every folder the glob matches;
`orchestrator.spec.expand_checkpoints` puts one model per folder in the entry's place, ordered
by step, so that shards, checks and actors only ever see models with an id and a step.
"""

import glob
import itertools
import json
from pathlib import Path

STATE_FILE = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoints glob that cannot be expanded; the message says what is wrong and the fix."""


def find_checkpoints(pattern: str) -> list[tuple[str, int]]:
    """The folders `pattern` matches, each with the step its `training_state.json` holds.

    Args:
        pattern: a glob, relative to the working directory (as model ids are) or absolute.
            Files it matches are ignored; only folders are checkpoints.

    Returns:
        (folder as matched, step) pairs, by step (ascending), ties by folder.

    Raises:
        CheckpointError: no folder matches; a folder has no training_state.json, or no
            whole-number `step` in it; two folders hold the same step.
    """
    folders = [p for p in glob.glob(pattern) if Path(p).is_dir()]
    if not folders:
        raise CheckpointError(
            f"matches no folder (globbed from {Path.cwd()}); fix: check the pattern, or run "
            "from the folder it is relative to"
        )
    found = sorted((read_step(folder), folder) for folder in folders)
    for (step, first), (other, second) in itertools.pairwise(found):
        if step == other:
            raise CheckpointError(
                f"{first} and {second} both hold step {step}, so their rows could not be told "
                "apart by step; fix: narrow the glob to one folder per step"
            )
    return [(folder, step) for step, folder in found]


def read_step(folder: str | Path) -> int:
    """The training step of a checkpoint folder, from its `training_state.json`.

    Raises:
        CheckpointError: no such file, not JSON, or no whole-number `step >= 0` in it.
    """
    path = Path(folder) / STATE_FILE
    fix = "fix: narrow the glob to checkpoint folders, or list this folder by id with its step"
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{folder} has no {STATE_FILE} (models/train_binding.py writes one into each "
            f"snapshot); {fix}"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON ({err}); {fix}") from None
    step = state.get("step") if isinstance(state, dict) else None
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(
            f'{path} has no whole-number step (step = {step!r}; it should hold {{"step": N, '
            f"...}}); {fix}"
        )
    return step
