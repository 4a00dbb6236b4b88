"""The prompt check end to end on a local Ray cluster (2 CPUs): `--check-prompts N` with the
shipped model (its top-1 after `#b:` is a digit) and a tiny model that always writes a space,
and the check a sweep stores in `run.json`."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.sweep import python_launcher
from orchestrator.tasks import iter_programs
from tests.integration.conftest import ROOT, run_cli, run_json
from tests.tiny import save_space_model

pytestmark = pytest.mark.slow

SHIPPED = "models/binding-tiny"  # relative to the repository, where the CLI runs
TASK = {"family": "binding", "seq_lens": [8], "n": 40, "options": {"style": "paper"}}


@pytest.fixture(scope="module")
def space_model(tmp_path_factory) -> str:
    """A tiny Llama whose top-1 is a space after every input (checked here, so that the test
    does not rest on how the model was built)."""
    folder = save_space_model(tmp_path_factory.mktemp("space") / "llama", always=True)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    space = tok(" ", add_special_tokens=False)["input_ids"]
    assert len(space) == 1, space
    prompts = [p.text for p in iter_programs("binding", 0, 8, 8, style="paper")]
    prompts += [text + " " for text in prompts] + ["", "a=1", "7", "#q:"]
    with torch.no_grad():
        for text in prompts:
            ids = tok(text, return_tensors="pt")["input_ids"]
            top = model(input_ids=ids).logits[0, -1].argmax().item()
            assert top == space[0], f"top-1 after {text!r} is {tok.decode([top])!r}, not ' '"
    return str(folder)


def write(folder: Path, models: list[str], experiments: dict) -> Path:
    spec = {
        "run": "pc",
        "output": str(folder / "results"),
        "seed": 0,
        "tasks": [TASK],
        "models": [{"id": m, "dtype": "float32", "quantization": "none"} for m in models],
        "experiments": experiments,
        "resources": {"actors_per_model": 1},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def table_row(stdout: str, model: str) -> list[str]:
    """The cells of `model`'s row of the printed table (cells are two or more spaces apart)."""
    lines = [line for line in stdout.splitlines() if line.startswith(f"  {model} ")]
    assert len(lines) == 1, stdout
    return re.split(r"\s{2,}", lines[0].strip())


def test_check_prompts_flags_the_space_model_only(
    tmp_path, monkeypatch, ray_address, space_model
) -> None:
    # Patching only: the check scores behaviour with its defaults, 8 programs, not 40.
    spec = write(tmp_path, [SHIPPED, space_model], {"patching": {"sites": ["resid_pre"]}})
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))  # run_cli passes the environment on
    out = run_cli(spec, "--check-prompts", "8", "--address", ray_address)
    print(out.stdout)  # the report pastes it (pytest -s)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("check-prompts: 8 programs of each length of each task on 2 models")
    assert lines[1].startswith("prompt check:")
    # model, task, source, prefix, programs, top-1 not a candidate, most common such top-1
    assert table_row(out.stdout, SHIPPED)[1:] == ["binding", "behavior", "''", "8", "0 (0%)", "-"]
    assert table_row(out.stdout, space_model)[1:] == [
        "binding",
        "behavior",
        "' '",  # `auto` took the space the model writes as the answer prefix ...
        "8",
        "8 (100%)",
        "' ' (8)",  # ... and after it the model writes a space again
    ]
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith(f"warning: {space_model} on binding:")
    assert "most often ' '" in warnings[0]
    assert 'answer_prefix: " " (or auto) on the task or the model' in warnings[0]
    assert "template: chat" in warnings[0]
    # Quiet: no plan, no progress bar, no report of the sweep it ran.
    assert "shards" not in out.stdout and "next:" not in out.stdout and "it/s" not in out.stdout
    assert not (tmp_path / "results").exists(), "the spec's run folder is not touched"
    assert list(scratch.glob("check-prompts-*")) == [], "the temporary folder is removed"


def test_check_prompts_passes_the_shipped_model(tmp_path, ray_address) -> None:
    spec = write(tmp_path, [SHIPPED], {"behavior": {"backend": "hf", "programs_per_shard": 100}})
    out = run_cli(spec, "--check-prompts", "4", "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    assert table_row(out.stdout, SHIPPED)[4:] == ["4", "0 (0%)", "-"]
    assert "warning" not in out.stdout
    assert out.stdout.splitlines()[-1] == "check-prompts: no (model, task) above 20%"


def test_a_sweep_stores_and_prints_the_prompt_check(tmp_path, monkeypatch, ray_address) -> None:
    # Patching only: the check reads the patching rows, one per program.
    patching = {"sites": ["resid_pre"], "layers_per_shard": 6, "programs_per_shard": 2}
    spec = write(tmp_path, [SHIPPED], {"patching": patching})
    data = yaml.safe_load(spec.read_text())
    data["tasks"][0]["n"] = 2
    spec.write_text(yaml.safe_dump(data))
    out = run_cli(spec, "--address", ray_address)
    assert out.returncode == 0, out.stdout + out.stderr
    info = run_json(tmp_path / "results" / "pc")
    assert info["status"] == "complete"
    assert info["prompt_check"] == [
        {
            "model": SHIPPED,
            "task": "binding",
            "source": "patching",
            "answer_prefix": "",
            "programs": 2,
            "not_candidate": 0,
            "share": 0.0,
            "top1": None,
            "top1_count": 0,
        }
    ]
    assert table_row(out.stdout, SHIPPED)[1:] == ["binding", "patching", "''", "2", "0 (0%)", "-"]
    # The last line names the launcher of the CLI's process: the same interpreter, environment
    # and folder as this one (`uv run python` under `uv run --extra dev pytest`).
    monkeypatch.chdir(ROOT)
    want = f"next: {python_launcher()} -m analysis {tmp_path / 'results' / 'pc'}"
    assert out.stdout.splitlines()[-1] == want
