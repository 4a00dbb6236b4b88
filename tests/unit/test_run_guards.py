"""What stands between a spec and a run folder, without Ray: every bad spec exits 2 with
file/field/value/fix and writes nothing; a run folder's identity, diff and `--extend` rule; the
run folder's lock (held, stale, probed)."""

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from orchestrator.__main__ import main
from orchestrator.identity import diff, extension_problems, identity, spec_hash
from orchestrator.lock import LockHeld, RunLock, lock_holder
from orchestrator.sink import ResultsDir
from orchestrator.spec import parse_spec
from orchestrator.sweep import folder_refusal
from tests.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return str(save_tiny_model(tmp_path_factory.mktemp("m") / "llama", "llama", n_layers=2))


def spec_dict(model: str, output: Path) -> dict:
    return {
        "run": "guard",
        "output": str(output),
        "seed": 0,
        "tasks": [{"family": "binding", "seq_lens": [4], "n": 4, "options": {"style": "paper"}}],
        "models": [{"id": model}],
        "experiments": {
            "behavior": {"backend": "hf", "programs_per_shard": 2},
            "patching": {"sites": ["resid_pre"], "layers_per_shard": 1, "programs_per_shard": 2},
        },
    }


BAD_SPECS = [
    (
        lambda s: s["tasks"][0].update(seq_lenz=[4]),
        "tasks.0.seq_lenz = [4]: Extra inputs are not permitted; fix: remove it",
    ),
    (
        lambda s: s["tasks"][0].update(n="many"),
        "tasks.0.n = 'many': Input should be a valid integer; fix: write a whole number",
    ),
    (
        lambda s: s["tasks"][0].update(n=0),
        "tasks.0.n = 0: Input should be greater than or equal to 1; fix: use a larger value",
    ),
    (
        lambda s: s["models"][0].update(id="/nonexistent/model"),
        "models.0.id = '/nonexistent/model': no such folder /nonexistent/model",
    ),
    (
        lambda s: s["experiments"]["patching"].update(layers=[0, 7]),
        "experiments.patching.layers = [0, 7]: [7] out of range",
    ),
    (
        lambda s: s["experiments"]["behavior"].update(template="{text} = {answer}"),
        "experiments.behavior.template = '{text} = {answer}' does not render a binding program: "
        "prompt template '{text} = {answer}' uses an unknown field 'answer'",
    ),
    (
        lambda s: s["experiments"]["behavior"].update(template="{text"),
        "experiments.behavior.template = '{text' does not render a binding program",
    ),
    (
        lambda s: s.update(resources={"gpus_per_actor": -1}),
        "resources.gpus_per_actor = -1: GPUs per actor must be a number >= 0",
    ),
    (
        lambda s: s.update(resources={"cpus_per_actor": 0}),
        "resources.cpus_per_actor = 0: Input should be greater than 0; fix: use a larger value",
    ),
    (
        lambda s: s.update(resources={"max_attempts": 0}),
        "resources.max_attempts = 0: Input should be greater than or equal to 1",
    ),
    (
        lambda s: s.update(resources={"actors_per_model": 0}),
        "resources.actors_per_model = 0: actors per model must be a whole number >= 1 or 'auto'",
    ),
    (
        lambda s: s["experiments"]["patching"].update(batch_size=0),
        "experiments.patching.batch_size = 0: patches per forward pass must be a whole number "
        ">= 1 or 'auto'; fix:",
    ),
    (
        lambda s: s["experiments"]["patching"].update(batch_size="big"),
        "experiments.patching.batch_size = 'big': patches per forward pass must be a whole",
    ),
    (
        lambda s: s["experiments"]["patching"].update(sites=["resid_pre", "resid_pre"]),
        "experiments.patching.sites: sites ['resid_pre', 'resid_pre'] repeat a site (each "
        "would run twice); fix: list each site once",
    ),
    (
        lambda s: s["experiments"]["behavior"].update(max_new_tokens=0),
        "experiments.behavior.max_new_tokens = 0: Input should be greater than or equal to 1",
    ),
    (
        lambda s: s["experiments"].update(attribution={"layers": [1, 2]}),
        "experiments.attribution.layers = [1, 2]: [2] out of range for",
    ),
    (
        lambda s: s["experiments"].update(attribution={"batch_size": "big"}),
        "experiments.attribution.batch_size = 'big': programs per forward and backward must be",
    ),
    (
        lambda s: s["experiments"].update(attribution={"verify_top_k": -2}),
        "experiments.attribution.verify_top_k = -2: Input should be greater than or equal to 0",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), BAD_SPECS)
def test_every_bad_spec_exits_2_with_the_fix_and_writes_nothing(
    tmp_path, tiny_model, capsys, mutate, message
) -> None:
    spec = spec_dict(tiny_model, tmp_path / "results")
    mutate(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{path}: the spec is not valid"), err
    assert message in err
    line = next(x for x in err.splitlines() if message[:30] in x)
    assert "fix:" in line, line
    assert not (tmp_path / "results").exists(), "nothing written"


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_backend_without_vllm_exits_2(tmp_path, tiny_model, capsys) -> None:
    spec = spec_dict(tiny_model, tmp_path / "results")
    spec["experiments"]["behavior"]["backend"] = "vllm"
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "experiments.behavior.backend = 'vllm': vLLM is not installed here" in err
    assert "fix: install the extra" in err
    assert not (tmp_path / "results").exists()


def test_batch_size_auto_is_a_valid_setting(tiny_model, tmp_path) -> None:
    spec = spec_dict(tiny_model, tmp_path)
    spec["experiments"]["patching"]["batch_size"] = "auto"
    assert parse_spec(spec).experiments.patching.batch_size == "auto"
    spec["experiments"]["patching"]["batch_size"] = 8
    assert parse_spec(spec).experiments.patching.batch_size == 8


# -- identity -------------------------------------------------------------------------------


def test_identity_depends_on_rows_not_on_speed_or_order(tiny_model, tmp_path) -> None:
    base = spec_dict(tiny_model, tmp_path)
    h = spec_hash(identity(parse_spec(base)))
    same = spec_dict(tiny_model, tmp_path / "elsewhere")
    same["run"] = "other-name"
    same["experiments"]["patching"]["batch_size"] = 3
    same["experiments"]["behavior"]["batch_size"] = 5
    same["resources"] = {"cpus_per_actor": 1, "max_attempts": 5}
    same["tasks"][0]["seq_lens"] = [4]
    assert spec_hash(identity(parse_spec(same))) == h
    for path, value in (
        (("seed",), 1),
        (("experiments", "behavior", "template"), "chat"),
        (("experiments", "patching", "positions"), "all"),
        (("experiments", "patching", "programs_per_shard"), 1),
        (("tasks", 0, "options"), {"style": "seed"}),
    ):
        changed = spec_dict(tiny_model, tmp_path)
        node = changed
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        assert spec_hash(identity(parse_spec(changed))) != h, path


def test_diff_names_each_change(tiny_model, tmp_path) -> None:
    a = spec_dict(tiny_model, tmp_path)
    b = spec_dict(tiny_model, tmp_path)
    b["seed"] = 1
    b["tasks"][0]["seq_lens"] = [4, 8]
    lines = diff(identity(parse_spec(a)), identity(parse_spec(b)))
    assert lines == ["seed: 0 -> 1", "tasks.binding.seq_lens: [4] -> [4, 8]"]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda s: s["tasks"][0].update(seq_lens=[4, 8]), None),
        (lambda s: s["tasks"][0].update(n=6), None),  # a multiple of programs_per_shard 2
        (lambda s: s["tasks"].append({"family": "boolean", "seq_lens": [4], "n": 2}), None),
        (lambda s: s["experiments"]["patching"].update(sites=["resid_pre", "attn_head"]), None),
        (lambda s: s["experiments"]["patching"].update(batch_size=1), None),
        (lambda s: s.update(seed=2), "seed changed (0 -> 2)"),
        (lambda s: s["tasks"][0].update(n=2), "tasks.binding.n: 4 -> 2 removes programs"),
        (lambda s: s["tasks"][0].update(n=5), None),  # 4 was a multiple of 2: blocks stay
        (lambda s: s["experiments"].pop("behavior"), "experiments.behavior was removed"),
        (
            lambda s: s["experiments"]["behavior"].update(backend="auto"),
            "experiments.behavior.backend changed (hf -> auto)",
        ),
        (
            lambda s: s["experiments"]["patching"].update(positions="all"),
            "shards would not be shards of the new spec",
        ),
        # The shards' ids name a model by its id, so these alone would pass the id check.
        (lambda s: s["models"][0].update(dtype="bfloat16"), ".dtype changed (auto -> bfloat16)"),
        (
            lambda s: s["models"][0].update(quantization="int8"),
            ".quantization changed (auto -> int8)",
        ),
        (lambda s: s["models"][0].update(step=5), ".step changed (None -> 5)"),
    ],
)
def test_extend_allows_only_more_work(tiny_model, tmp_path, change, problem) -> None:
    old = spec_dict(tiny_model, tmp_path)
    new = spec_dict(tiny_model, tmp_path)
    change(new)
    layers = {tiny_model: 2}
    problems = extension_problems(parse_spec(old), parse_spec(new), layers, layers)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


def test_extend_refuses_a_growing_block_of_programs(tiny_model, tmp_path) -> None:
    old = spec_dict(tiny_model, tmp_path)
    old["tasks"][0]["n"] = 5  # blocks 0-1, 2-3, 4
    new = spec_dict(tiny_model, tmp_path)
    new["tasks"][0]["n"] = 6  # blocks 0-1, 2-3, 4-5: the file of block 4 would be stale
    layers = {tiny_model: 2}
    problems = extension_problems(parse_spec(old), parse_spec(new), layers, layers)
    assert len(problems) == 1 and "shards would not be shards of the new spec" in problems[0]
    assert "programs 4-4" in problems[0] and "multiples of programs_per_shard" in problems[0]


def test_a_folder_with_results_but_no_spec_record_is_refused(tiny_model, tmp_path) -> None:
    spec = parse_spec(spec_dict(tiny_model, tmp_path))
    results = ResultsDir(tmp_path / "guard")
    (results.root / "behavior").mkdir(parents=True)
    refusal = folder_refusal(results, spec, {tiny_model: 2}, fresh=False, extend=False)
    assert refusal is not None and "no record of the spec that wrote them" in refusal
    assert folder_refusal(results, spec, {tiny_model: 2}, fresh=True, extend=False) is None
    only_lock = ResultsDir(tmp_path / "other")
    only_lock.root.mkdir()
    (only_lock.root / ".lock").write_text("")
    assert folder_refusal(only_lock, spec, {tiny_model: 2}, fresh=False, extend=False) is None


def with_attribution(model: str, output: Path, **settings) -> dict:
    spec = spec_dict(model, output)
    spec["experiments"]["attribution"] = {"sites": ["resid_pre"], "programs_per_shard": 2}
    spec["experiments"]["attribution"].update(settings)
    return spec


def test_attribution_settings_are_part_of_the_identity(tiny_model, tmp_path) -> None:
    plain = identity(parse_spec(spec_dict(tiny_model, tmp_path)))
    # A spec without attribution keeps the hash it had before attribution existed.
    assert "attribution" not in plain
    base = identity(parse_spec(with_attribution(tiny_model, tmp_path)))
    assert base["attribution"] == {
        "sites": ["resid_pre"],
        "layers": None,
        "positions": "all",
        "attention_fix": False,
        "grad_drop": False,
        "verify_top_k": 0,
        "programs_per_shard": 2,
        "tasks": None,
    }
    h = spec_hash(base)
    assert h != spec_hash(plain)

    def hash_of(**settings) -> str:
        return spec_hash(identity(parse_spec(with_attribution(tiny_model, tmp_path, **settings))))

    assert hash_of(batch_size=4) == h, "the batch size decides no row"
    assert hash_of(layers=[1, 0]) == hash_of(layers=[0, 1]), "layer order does not matter"
    for change in (
        {"attention_fix": True},
        {"grad_drop": True},
        {"verify_top_k": 2},
        {"positions": "targets"},
        {"sites": ["attn_head"]},
        {"layers": [0]},
        {"programs_per_shard": 1},
        {"tasks": ["binding"]},
    ):
        assert hash_of(**change) != h, change
    lines = diff(base, identity(parse_spec(with_attribution(tiny_model, tmp_path, grad_drop=True))))
    assert lines == ["attribution.grad_drop: false -> true"]


def test_extend_with_attribution(tiny_model, tmp_path) -> None:
    layers = {tiny_model: 2}
    plain = parse_spec(spec_dict(tiny_model, tmp_path))
    added = parse_spec(with_attribution(tiny_model, tmp_path))
    assert extension_problems(plain, added, layers, layers) == [], "adding attribution adds work"
    problems = extension_problems(added, plain, layers, layers)
    assert problems == ["experiments.attribution was removed"]
    fixed = parse_spec(with_attribution(tiny_model, tmp_path, attention_fix=True))
    problems = extension_problems(added, fixed, layers, layers)
    assert len(problems) == 1 and "shards would not be shards of the new spec" in problems[0]
    assert "attribution binding seq_len=4 programs 0-1 site=resid_pre layers 0-1" in problems[0]


def test_check_prompts_drops_attribution(tiny_model, tmp_path) -> None:
    from orchestrator.__main__ import check_prompts_spec

    user = with_attribution(tiny_model, tmp_path, verify_top_k=3)
    derived = check_prompts_spec(user, 2, tmp_path / "check")
    assert set(derived["experiments"]) == {"behavior"}
    spec = parse_spec(derived)
    assert spec.experiments.attribution is None and spec.experiments.patching is None
    assert user["experiments"]["attribution"]["verify_top_k"] == 3, "the user's spec is kept"


# -- the lock -------------------------------------------------------------------------------

HOLD = textwrap.dedent(
    """
    import os, signal, sys, time
    from orchestrator.lock import RunLock
    lock = RunLock(sys.argv[1])
    lock.acquire()
    print("held", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
    """
)


def hold_lock(root: Path, then: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(root), then], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_is_refused_with_host_pid_and_how_to_stop(tiny_model, tmp_path, capsys):
    spec = spec_dict(tiny_model, tmp_path)
    root = tmp_path / "guard"
    holder = hold_lock(root, "sleep")
    try:
        assert lock_holder(root)["pid"] == holder.pid
        with pytest.raises(LockHeld) as err:
            RunLock(root).acquire()
        assert err.value.holder["pid"] == holder.pid
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump(spec))
        before = sorted(p.name for p in root.iterdir())
        assert main([str(path)]) == 2
        out = capsys.readouterr()
        host = socket.gethostname()
        assert f"another driver is running this sweep (pid {holder.pid} on host {host}" in out.err
        assert f"kill -INT {holder.pid}" in out.err
        assert "ray:" not in out.out, "refused before Ray"
        assert sorted(p.name for p in root.iterdir()) == before == [".lock"]
    finally:
        holder.send_signal(signal.SIGTERM)
        holder.wait()
    assert lock_holder(root) is None, "the kernel dropped the lock with its holder"


def test_stale_lock_of_a_dead_driver_is_taken_over(tmp_path) -> None:
    root = tmp_path / "guard"
    dead = hold_lock(root, "die")
    assert dead.wait() == -signal.SIGKILL
    assert lock_holder(root) is None
    lock = RunLock(root)
    lock.acquire()
    try:
        assert lock.stale["pid"] == dead.pid, "what the dead driver left is reported"
        assert lock_holder(root)["pid"] == os.getpid()
    finally:
        lock.release()
    assert lock_holder(root) is None
    again = RunLock(root)
    again.acquire()
    assert again.stale == {}, "a clean release leaves nothing stale"
    again.release()
