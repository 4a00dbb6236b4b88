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


def learning_curve(log: Path, every: int) -> list[dict]:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] % every == 0 or r is rows[-1]]


def card(model_dir: Path, config: dict, state: dict, result: dict, curve: list[dict]) -> str:
    acc = result["accuracy"]
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    hours = curve[-1]["wall_s"] / 3600 if curve else float("nan")
    lines = [
        "# binding-tiny",
        "",
        f"A {config['n_layers']}-layer Llama (d_model {config['d_model']}, "
        f"{config['n_heads']} heads, MLP {config['d_mlp']}, {n_params / 1e6:.2f}M parameters) "
        "with a character-level "
        "tokenizer, trained from scratch on the variable-binding task of Wu, Geiger & Millière "
        "(ICML 2025), on a 2-core CPU.",
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
        "```",
        "python -m models.train_binding --config models/binding-tiny.yaml",
        "```",
        "",
        f"Stopped at step {state['step']} (batch {config['batch_size']}), {hours:.2f} h of "
        f"training on 2 CPU threads; AdamW lr {config['lr']}, weight decay "
        f"{config['weight_decay']}, warmup {config['warmup_steps']}. Programs stream fresh "
        "from `orchestrator.tasks.binding` (no data set is stored); the loss is on answers only.",
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
        "Phases: chance (~0.36 on recall) until the lookup appears (~1,500 steps), then each "
        "stage in a few hundred steps. Unlike the paper's model, this one never sat on the "
        "line-1/line-2 heuristic: the curriculum starts with pure recall, where the heuristic "
        "cannot help.",
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
    curve = learning_curve(args.log, args.curve_every)
    (args.model / "README.md").write_text(card(args.model, config, state, result, curve))
    print(json.dumps(result["accuracy"], indent=2))
    print(f"wrote {args.model / 'README.md'} and eval.json in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
