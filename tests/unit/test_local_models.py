"""A model id that reads as a local path is checked on disk alone: a misspelt folder fails at
once, in the spec check and in the loader, and the hub is never asked."""

from pathlib import Path

import pytest
import transformers

from actors import load_model
from orchestrator.checks import check_models
from orchestrator.local_models import local_problem, looks_local
from orchestrator.spec import SpecError
from tests.tiny import save_tiny_model
from tests.unit.test_spec_shards import spec_with


@pytest.fixture
def here(tmp_path, monkeypatch):
    """A working directory with a `models/` folder holding one tiny model; the hub forbidden."""
    save_tiny_model(tmp_path / "models" / "tiny", "llama", n_layers=2)
    monkeypatch.chdir(tmp_path)

    def no_hub(name, *args, **kwargs):
        if Path(name).resolve() != (tmp_path / "models" / "tiny").resolve():
            raise AssertionError(f"the hub was asked for {name!r}")
        return real(name, *args, **kwargs)

    real = transformers.AutoConfig.from_pretrained
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    return tmp_path


def test_what_reads_as_a_local_path(here) -> None:
    for name in ("./x", "../x", "/abs/x", "~/x", "models/tiny", "models/tinyy", "models"):
        assert looks_local(name), name
    for name in ("gpt2", "Qwen/Qwen3-0.6B", "no-such-org/model"):
        assert not looks_local(name), name
    assert local_problem("models/tiny") is None
    assert local_problem("Qwen/Qwen3-0.6B") is None, "left to the hub"
    assert "no such folder models/tinyy" in local_problem("models/tinyy")
    assert "not a folder with a config.json" in local_problem("models")


def test_a_misspelt_local_model_fails_at_once_without_the_hub(here) -> None:
    with pytest.raises(ValueError, match=r"no such folder models/tinyy .*hub is not asked"):
        load_model("models/tinyy")
    spec = spec_with(models=[{"id": "models/tinyy"}, {"id": "models/tiny"}])
    with pytest.raises(SpecError) as err:
        check_models(spec, "unit.yaml")
    assert (
        "  models.0.id = 'models/tinyy': no such folder models/tinyy (the id reads as a local "
        "path, so the hub is not asked); fix: give a folder written by save_pretrained (check "
        "the path's spelling), or a hub id"
    ) in str(err.value)
    assert "models.1" not in str(err.value), "the folder that exists passes"


def test_the_command_fails_before_importing_torch(tmp_path) -> None:
    """The misspelt path is reported before the actor body (torch, transformers) is imported:
    that import is most of a second-long start, so the error comes at once."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    spec = (repo / "specs" / "quickstart.yaml").read_text()
    assert "id: models/binding-tiny\n" in spec
    typo = tmp_path / "typo.yaml"
    typo.write_text(
        spec.replace("id: models/binding-tiny\n", "id: models/binding-tinyy\n").replace(
            "output: results", f"output: {tmp_path / 'results'}"
        )
    )
    code = (
        "import sys; from orchestrator.__main__ import main; "
        f"rc = main([{str(typo)!r}]); "
        "print(rc, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert out.stdout.split() == ["2", "False", "False"], out.stdout + out.stderr
    assert "no such folder models/binding-tinyy" in out.stderr
    assert not (tmp_path / "results").exists(), "nothing written"
