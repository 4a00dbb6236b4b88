"""Evaluate the shipped binding model on fresh programs and write its model card.

    python -m models.card [--model models/binding-tiny] [--n 1000] [--seed 2024]

Writes `<model>/eval.json` (the figures, read back by the test that guards the model) and
`<model>/README.md` (how it was trained, the prompt format, accuracy overall / per depth /
heuristic vs not, and the learning curve from the run's `log.jsonl`). The evaluation seed must be
one the trainer never drew programs from (training uses `train_seed + stage`, evaluation during
training `eval_seed`).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.evaluate import accuracy_report, greedy_next_tokens
from orchestrator.tasks import iter_programs


def evaluate(model_dir: Path, n: int, seed: int, seq_len: int = 16) -> dict:
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    programs = list(iter_programs("binding", seed, seq_len, n, style="paper"))
    preds = greedy_next_tokens(model, tokenizer, [p.text for p in programs])
    report = accuracy_report(programs, preds)
    counts = {"all": n, **{f"depth_{d}": sum(p.depth == d for p in programs) for d in range(1, 5)}}
    counts["heuristic"] = sum(bool(p.heuristic) for p in programs)
    counts["non_heuristic"] = n - counts["heuristic"]
    return {"seed": seed, "seq_len": seq_len, "n": n, "accuracy": report, "counts": counts}


def read_log(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def learning_curve(rows: list[dict], every: int) -> list[dict]:
    """Evaluation rows every `every` steps, plus the last one and each session's last one."""
    evals = [r for r in rows if "event" not in r]
    ends = {id(s["rows"][-1]) for s in sessions(rows)}
    return [r for r in evals if r["step"] % every == 0 or id(r) in ends]


def sessions(rows: list[dict]) -> list[dict]:
    """Consecutive evaluation rows on one device form a session (rows before `device` was
    logged were on the CPU); each with its steps, wall time and, where it was fitted to a
    time budget, the fit."""
    out: list[dict] = []
    last_step, last_wall, fit = 0, 0.0, None
    for r in rows:
        if r.get("event") == "fit":
            fit = r
            continue
        device = r.get("device", "cpu")
        if not out or out[-1]["device"] != device:
            out.append({"device": device, "first": last_step, "wall0": last_wall, "rows": []})
        out[-1]["rows"].append(r)
        out[-1]["fit"] = fit if fit and fit["step"] >= out[-1]["first"] else None
        last_step, last_wall = r["step"], r["wall_s"]
    for s in out:
        s["last"] = s["rows"][-1]["step"]
        s["wall_s"] = s["rows"][-1]["wall_s"] - s["wall0"]
    return out


def card(
    model_dir: Path, config: dict, state: dict, result: dict, log: list[dict], every: int
) -> str:
    """The model card. `config` is the YAML the run started from; `state["config"]` holds the
    settings of the session that exported the model."""
    acc = result["accuracy"]
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    curve = learning_curve(log, every)
    runs = sessions(log)
    where = ", then ".join(
        f"{r['wall_s'] / 60:.0f} min on "
        + ("a 2-core CPU" if r["device"] == "cpu" else f"one {r['device']}")
        for r in runs
    )
    lines = [
        "# binding-tiny",
        "",
        f"A {config['n_layers']}-layer Llama (d_model {config['d_model']}, "
        f"{config['n_heads']} heads, MLP {config['d_mlp']}, {n_params / 1e6:.2f}M parameters) "
        "with a character-level "
        "tokenizer, trained from scratch on the variable-binding task of Wu, Geiger & Millière "
        f"(ICML 2025): {where}.",
        "",
        "## Prompt format",
        "",
        "The program text exactly as `python -m orchestrator.tasks binding --style paper` prints "
        "it: 16 lines `v=<digit>` or `v=<var>`, then the query line `#q:`. The answer is the "
        "next token (one digit). `<s>` is prepended by the tokenizer.",
        "",
        "```",
        next(iter_programs("binding", 99, 16, 1, style="paper")).text,
        "```",
        "",
        f"## Accuracy ({result['n']} programs of 16 lines, seed {result['seed']}, "
        "never trained on)",
        "",
        "| programs | n | greedy accuracy |",
        "| --- | --- | --- |",
    ]
    for key in ("all", "depth_1", "depth_2", "depth_3", "depth_4", "heuristic", "non_heuristic"):
        if key in acc:
            lines.append(f"| {key.replace('_', ' ')} | {result['counts'][key]} | {acc[key]:.3f} |")
    lines += [
        "",
        "`heuristic`: the root value sits on line 1 or 2, where the paper's models first learn a "
        "shortcut. Reproduce with `python -m models.card` (writes `eval.json`).",
        "",
        "## Training",
        "",
        "One resumable run (`checkpoint.pt` holds model, optimizer, curriculum and step), in "
        "sessions:",
        "",
        "| session | device | steps | batch | wall | learning rate |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for i, run in enumerate(runs, 1):
        batch = run["rows"][-1].get("batch_size", config["batch_size"])
        lr = f"{config['lr']} after {config['warmup_steps']} warm-up steps"
        if run["fit"]:
            fit = run["fit"]
            lr = (
                f"{config['lr']}, cosine to {fit['lr_min']} from step {fit['decay_start']} to "
                f"{fit['max_steps']} (fitted: {fit['steps_per_s']} steps/s measured, "
                f"{fit['seconds'] / 60:.1f} min left)"
            )
        device = "2 CPU threads" if run["device"] == "cpu" else f"1 GPU ({run['device']})"
        lines.append(
            f"| {i} | {device} | {run['first']}-{run['last']} | {batch} "
            f"| {run['wall_s'] / 60:.1f} min | {lr} |"
        )
    lines += [
        "",
        "```",
        "python -m models.train_binding --config models/binding-tiny.yaml --max-steps 5500",
        "python -m models.train_binding --config models/binding-tiny.yaml --device cuda \\",
        "    --batch-size 256 --data-workers 12 --lr-min 1e-4 --fit-minutes 6.55",
        "```",
        "",
        f"The exported model is the best on the held-out set during training: step "
        f"{state['step']}. AdamW (betas 0.9/0.98), weight decay {config['weight_decay']}, "
        "gradient clipping 1.0. Programs stream fresh from `orchestrator.tasks.binding` (no "
        "data set is stored); the loss is on answers only. `--fit-minutes` measures the step "
        "rate over 200 steps, then sets the end and the decay so the session ends in time (on "
        "a GPU lease); `--data-workers` processes draw batches ahead of the GPU.",
        "",
        "Curriculum (each stage ends when training accuracy on the final query passes its "
        "threshold over 200 steps; 20% of each batch keeps drawing from earlier stages):",
        "",
        "| stage | depth | lines | query | extra |",
        "| --- | --- | --- | --- | --- |",
    ]
    for s in config["stages"]:
        extra = []
        if s.get("copy_fraction"):
            extra.append(f"{s['copy_fraction']:.0%} repeated programs")
        lines.append(
            f"| {s['name']} | 1-{s.get('max_depth', 4)} "
            f"| {s.get('min_len', 1)}-{s.get('max_len', 16)} "
            f"| `#v{':' if s.get('colon', True) else ''}` | {', '.join(extra)} |"
        )
    lines += [
        "",
        f"{config['embed_fraction']:.0%} of sequences also carry lookups `#v:D` between "
        "statements (v drawn with replacement, D its value there), a denser signal than the final "
        "query alone. Why the colon-less stage: with `#v:`, 2- and 4-layer models stayed at chance "
        "(~0.36) for 4,000 steps; with `#v` (one hop less) they left it within ~1,000, and the "
        "lookup then carried over to `#v:`.",
        "",
        "## Learning curve",
        "",
        "Held-out accuracy on 512 16-line programs (seed 7) during training:",
        "",
        "| step | stage | wall (min) | all | depth 1 | depth 2 | depth 3 | depth 4 | heuristic "
        "| non-heuristic |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in curve:
        cells = [
            f"{r.get(k, float('nan')):.3f}"
            for k in (
                "all",
                "depth_1",
                "depth_2",
                "depth_3",
                "depth_4",
                "heuristic",
                "non_heuristic",
            )
        ]
        lines.append(
            f"| {r['step']} | {r['stage']} | {r['wall_s'] / 60:.0f} | " + " | ".join(cells) + " |"
        )
    lines += [
        "",
        "Phases: chance until the lookup appears (~1,500-2,000 steps, on colon-less recall), "
        "then each curriculum stage in a few hundred steps. On the full task the model first "
        "settled at ~0.86-0.93, solving depths 1-3 but depth 4 only ~0.6-0.75 (steps "
        "3,000-7,000), then jumped to ~0.99 within 500 steps (7,000 to 7,500, depth 4 0.75 to "
        "0.99) — the paper's late transition to a systematic mechanism. Unlike the paper's "
        "model, this one never sat on the line-1/line-2 heuristic (heuristic and non-heuristic "
        "programs stay within a few points throughout): the curriculum starts with pure recall, "
        "where the heuristic cannot help.",
        "",
        "Earlier snapshots for comparing mechanisms across training: "
        + ", ".join(
            f"`models/{p.name}`" for p in sorted(model_dir.parent.glob(f"{model_dir.name}-step*"))
        )
        + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m models.card", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", type=Path, default=Path("models/binding-tiny"))
    parser.add_argument("--config", type=Path, default=Path("models/binding-tiny.yaml"))
    parser.add_argument("--log", type=Path, default=Path("models/binding-tiny/log.jsonl"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--curve-every", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    start = time.time()
    result = evaluate(args.model, args.n, args.seed)
    (args.model / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    config = yaml.safe_load(args.config.read_text())
    state = json.loads((args.model / "training_state.json").read_text())
    log = read_log(args.log)
    (args.model / "README.md").write_text(
        card(args.model, config, state, result, log, args.curve_every)
    )
    print(json.dumps(result["accuracy"], indent=2))
    print(f"wrote {args.model / 'README.md'} and eval.json in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
