"""Train a small Llama from scratch on the binding task and export it in Hugging Face format.

    python -m models.train_binding --config models/binding-tiny.yaml [--max-steps N] [--fresh]
        [--device cuda --batch-size B --data-workers W --lr-min LR --fit-minutes M]

Programs stream fresh from `orchestrator.tasks.binding` (paper style, `a=5`), so no data set is
stored. Two things make the lookup learnable on a CPU budget:

* a curriculum of stages (`stages`): pure recall first (every line `v=D`, so the lookup is the
  only way to the answer: no line-1 shortcut), then deeper chains and longer programs, up to the
  full task. A stage ends when the training accuracy on the final query, over the last
  `advance_window` steps, passes its `advance_at`; `mix_previous` of each batch keeps drawing
  from earlier stages so that they are not forgotten;
* extra supervised lookups: in a fraction of the sequences, comment lines `#v:D` (v's value at
  that point, under Python's semantics) are inserted between statements. Variables are drawn
  with replacement and the program goes on after them, so answers cannot be found by crossing
  off digits already given (the shortcut of appending every query at the end). The final query
  stays the paper's format, and evaluation uses the paper's format only.

The run directory holds `checkpoint.pt` (model, optimizer, curriculum, step) written at every
evaluation, so a run can be stopped and resumed; `log.jsonl` holds the learning curve. The best
model so far (by held-out accuracy on `max_seq_len`-line programs) is exported to `out_dir`, and
the model at each of `snapshot_steps` (log-spaced by default), and the first to reach each
`snapshot_at` accuracy, is kept as `<out_dir>-step<N>`, its log row in its `training_state.json`.

On a GPU the model is small enough that drawing programs is the bottleneck: `data_workers`
processes draw the next batches (the same ones, in the same order) while the GPU trains, and
`--fit-minutes` fits a session to a time budget (a GPU lease): it measures the step rate, then
sets the last step and a cosine decay of the learning rate so that the session ends in time.
"""

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import shutil
import sys
import time
from collections import deque
from pathlib import Path
from typing import Literal

import torch
import yaml
from pydantic import BaseModel, ConfigDict
from tqdm import tqdm
from transformers import LlamaConfig, LlamaForCausalLM

from models.evaluate import accuracy_report, greedy_next_tokens
from models.tokenizer import build_char_tokenizer
from orchestrator.tasks import binding

logger = logging.getLogger(__name__)


class Stage(BaseModel):
    """One step of the curriculum: which programs to draw, and when to move on."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    max_depth: int = 4
    p_var: float = binding.P_VAR
    n_names: int = 26
    copy_fraction: float = 0.0  # sequences that repeat the program (loss on the repeat)
    colon: bool = True  # queries written `#v:` (evaluation's format) or `#v`
    min_len: int = 1
    max_len: int = 16
    advance_at: float = 0.95  # training accuracy on the final query over `advance_window` steps


DEFAULT_STAGES = [
    Stage(name="recall", max_depth=1, p_var=0.05, min_len=2, max_len=8),
    Stage(name="recall-16", max_depth=1, p_var=0.05, min_len=6, max_len=16),
    Stage(name="depth-2", max_depth=2, p_var=0.3, min_len=4, max_len=16, advance_at=0.9),
    Stage(name="depth-3", max_depth=3, p_var=0.4, min_len=8, max_len=16, advance_at=0.9),
    Stage(name="full", max_depth=4, p_var=binding.P_VAR, min_len=12, max_len=16, advance_at=2.0),
]


class TrainConfig(BaseModel):
    """Everything that fixes a training run; stored in the checkpoint and the model card."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    out_dir: str = "models/binding-tiny"
    run_dir: str = "models/.runs/binding-tiny"
    seed: int = 0
    train_seed: int = 1_000  # program stream for training; evaluation uses other seeds
    eval_seed: int = 7
    eval_n: int = 512
    n_layers: int = 6
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 256
    lr: float = 1e-3
    warmup_steps: int = 300
    weight_decay: float = 0.1
    batch_size: int = 64
    max_steps: int = 100_000
    eval_every: int = 250
    max_seq_len: int = 16
    stages: list[Stage] = DEFAULT_STAGES
    mix_previous: float = 0.2
    advance_window: int = 200
    embed_fraction: float = 0.5
    embed_per_line: float = 0.5
    threads: int = 2
    device: str = "cpu"  # cpu, cuda, or auto (cuda where available)
    data_workers: int = 0  # processes drawing batches ahead of the trainer (0: in-process)
    # Learning rate: linear warm-up to `lr`, constant, then (when `decay_steps` > 0) a cosine
    # from `lr` at `decay_start` down to `lr_min` at `decay_start + decay_steps`, then flat.
    decay_start: int = 0
    decay_steps: int = 0
    lr_min: float = 0.0
    # Keep a copy of the model at these steps, as `<out_dir>-step<N>`, evaluated there (its
    # log row is in its `training_state.json`): a list, or `log` for `log_steps`: two per
    # octave from `eval_every` to `max_steps`.
    snapshot_steps: list[int] | Literal["log"] = "log"
    # And of the first model past each held-out accuracy (runs before `snapshot_steps`).
    snapshot_at: dict[str, float] = {}

    def snapshot_plan(self) -> list[int]:
        """The steps at which the run keeps a snapshot."""
        if self.snapshot_steps == "log":
            return log_steps(self.eval_every, self.max_steps)
        return sorted(set(self.snapshot_steps))


def log_steps(first: int, last: int, per_octave: int = 2) -> list[int]:
    """Steps from `first` to `last`, `per_octave` per doubling, each rounded to two significant
    digits: 500, 700, 1000, 1400, 2000, 2800, 4000, ..."""
    steps, k = [], 0
    while (x := first * 2 ** (k / per_octave)) <= last:
        digits = max(0, len(str(int(x))) - 2)
        steps.append(round(x / 10**digits) * 10**digits)
        k += 1
    return sorted(set(steps))


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The learning rate of `step` (0-based): warm-up, constant, then the optional cosine decay."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
    if cfg.decay_steps > 0 and step >= cfg.decay_start:
        done = min(1.0, (step - cfg.decay_start) / cfg.decay_steps)
        lr = cfg.lr_min + (cfg.lr - cfg.lr_min) * 0.5 * (1 + math.cos(math.pi * done))
    return lr


def _assignments(text: str) -> list[tuple[str, str]]:
    """(lhs, rhs) of each statement of a paper-style program."""
    return [tuple(line.split("=")) for line in text.split("\n")[:-1]]  # type: ignore[misc]


@dataclasses.dataclass(frozen=True)
class Example:
    """One training sequence: the text (answers written in) and which characters to predict."""

    text: str
    targets: list[int]
    final: int  # character index of the final query's answer


def make_example(
    program: binding.Program,
    rng: random.Random,
    n_embedded: int = 0,
    colon: bool = True,
    copy: bool = False,
) -> Example:
    """A training sequence built from one program.

    Args:
        program: a paper-style binding program.
        rng: draws where lookups go and what they ask.
        n_embedded: comment lines `#v:D` to insert after random statements (v drawn with
            replacement among the variables assigned so far, D its value there).
        colon: write queries `#v:` as evaluation does; without, `#v` (the answer is read at the
            variable itself, one hop less for a model that has not learned the lookup yet).
        copy: the statements twice, then the final query; the repeat is supervised.
    """
    lines = _assignments(program.text)
    mark = ":" if colon else ""
    out, targets, length = [], [], 0

    def emit(line: str, answer_at: int | None = None) -> None:
        nonlocal length
        if answer_at is not None:
            targets.append(length + answer_at)
        out.append(line)
        length += len(line) + 1

    if copy:
        body = program.text.rsplit("\n", 1)[0]
        emit(body)
        start = length
        emit(body)
        targets.extend(range(start, start + len(body)))
    else:
        after = [rng.randrange(len(lines)) for _ in range(n_embedded)]
        env: dict[str, str] = {}
        for i, (lhs, rhs) in enumerate(lines):
            env[lhs] = rhs if rhs.isdigit() else env[rhs]
            emit(f"{lhs}={rhs}")
            for _ in range(after.count(i)):
                var = rng.choice(sorted(env))
                emit(f"#{var}{mark}{env[var]}", answer_at=2 + len(mark))
    emit(f"#{program.query}{mark}{program.answer}", answer_at=2 + len(mark))
    return Example("\n".join(out), targets, targets[-1])


Drawn = tuple[list[list[int]], list[list[int]], list[int]]


def draw_batch(cfg: TrainConfig, stage_index: int, step: int, tokenizer) -> Drawn:
    """The batch of `step` under curriculum stage `stage_index`, as plain lists.

    A function of (config, stage, step) alone, so that worker processes can draw batches ahead
    and a resumed run draws the same ones. Right-padded token ids; labels are -100 except at
    the answer characters (char-level: character c is token c + 1); the final-query positions.
    """
    rng = random.Random(cfg.seed * 1_000_003 + step)
    examples: list[Example] = []
    for row in range(cfg.batch_size):
        use = stage_index
        if stage_index > 0 and rng.random() < cfg.mix_previous:
            use = rng.randrange(stage_index)
        stage = cfg.stages[use]
        seq_len = rng.randint(stage.min_len, stage.max_len)
        program = binding.generate(
            cfg.train_seed + use,
            seq_len,
            step * cfg.batch_size + row,
            style="paper",
            max_depth=stage.max_depth,
            p_var=stage.p_var,
            n_names=stage.n_names,
        )
        copy = rng.random() < stage.copy_fraction
        most = max(1, round(cfg.embed_per_line * seq_len))
        n_embedded = rng.randint(1, most) if rng.random() < cfg.embed_fraction else 0
        examples.append(make_example(program, rng, n_embedded, stage.colon, copy))
    pad = tokenizer.pad_token_id
    seqs = [tokenizer(ex.text)["input_ids"] for ex in examples]
    width = max(map(len, seqs))
    ids, labels = [], []
    for ex, seq in zip(examples, seqs, strict=True):
        assert len(seq) == len(ex.text) + 1, "the trainer assumes a char-level tokenizer"
        lab = [-100] * width
        for c in ex.targets:
            lab[c + 1] = seq[c + 1]
        ids.append(seq + [pad] * (width - len(seq)))
        labels.append(lab)
    return ids, labels, [ex.final for ex in examples]  # the token before the answer predicts it


_WORKER: tuple[TrainConfig, object] | None = None


def _init_worker(cfg: TrainConfig) -> None:
    global _WORKER
    _WORKER = (cfg, build_char_tokenizer())


def _draw_in_worker(stage_index: int, step: int) -> Drawn:
    assert _WORKER is not None
    cfg, tokenizer = _WORKER
    return draw_batch(cfg, stage_index, step, tokenizer)


class BatchPrefetcher:
    """Worker processes that draw the next batches while the model trains on this one.

    Batches are requested for (stage, step) in order; when the curriculum moves on, the batches
    drawn ahead for the old stage are dropped and drawing starts again from the asked step.
    Workers are spawned, not forked: a fork copies the parent's threads' locks (torch's, a
    tokenizer's, a test runner's) in whatever state they are in, and a child can wait on one
    forever. A batch that does not come within `timeout_s` is an error, never a silent wait.
    """

    def __init__(self, cfg: TrainConfig, workers: int, timeout_s: float = 600.0) -> None:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        ctx = multiprocessing.get_context("spawn")
        self.pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg,))
        self.depth = 4 * workers
        self.timeout_s = timeout_s
        self.pending: deque = deque()  # ((stage, step), AsyncResult)
        self.next_step = 0

    def get(self, stage_index: int, step: int) -> Drawn:
        if not self.pending or self.pending[0][0] != (stage_index, step):
            self.pending.clear()
            self.next_step = step
        while len(self.pending) < self.depth:
            key = (stage_index, self.next_step)
            self.pending.append((key, self.pool.apply_async(_draw_in_worker, key)))
            self.next_step += 1
        key, result = self.pending.popleft()
        try:
            return result.get(timeout=self.timeout_s)
        except multiprocessing.TimeoutError:
            raise RuntimeError(
                f"no batch for (stage {key[0]}, step {key[1]}) from the data workers within"
                f" {self.timeout_s:.0f} s; a worker may have died (see its output above), or set"
                " data_workers: 0 to draw batches in the training process"
            ) from None

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


class Trainer:
    """Owns the model, optimizer, curriculum state and program counter of one run."""

    def __init__(self, cfg: TrainConfig, fresh: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        self.tokenizer = build_char_tokenizer()
        # Start the batch workers before the model is built (they hold no copy of it).
        self.prefetch = BatchPrefetcher(cfg, cfg.data_workers) if cfg.data_workers else None
        if cfg.device == "auto":
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        else:
            self.device = torch.device(cfg.device)
        self.device_name = (
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        )
        torch.manual_seed(cfg.seed)
        self.model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(self.tokenizer),
                hidden_size=cfg.d_model,
                intermediate_size=cfg.d_mlp,
                num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads,
                num_key_value_heads=cfg.n_heads,
                max_position_embeddings=512,
                tie_word_embeddings=True,
                bos_token_id=self.tokenizer.bos_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        ).to(self.device)
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )
        self.step = 0
        self.stage = 0
        self.recent: list[float] = []
        self.best = -1.0
        self.snapshots: dict[str, int] = {}
        self.wall_s = 0.0  # training time over all sessions of this run
        self.eval_programs = [
            binding.generate(cfg.eval_seed, cfg.max_seq_len, i, style="paper")
            for i in range(cfg.eval_n)
        ]
        if fresh and self.run_dir.exists():
            shutil.rmtree(self.run_dir)
        if (self.run_dir / "checkpoint.pt").exists():
            self._load()

    # -- state ----------------------------------------------------------------------------
    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.cfg.model_dump(),
            "model": self.model.state_dict(),
            "opt": self.opt.state_dict(),
            "step": self.step,
            "stage": self.stage,
            "recent": self.recent,
            "best": self.best,
            "snapshots": self.snapshots,
            "wall_s": self.wall_s,
        }
        tmp = self.run_dir / "checkpoint.pt.tmp"
        torch.save(state, tmp)
        tmp.replace(self.run_dir / "checkpoint.pt")

    def _load(self) -> None:
        state = torch.load(self.run_dir / "checkpoint.pt", weights_only=False, map_location="cpu")
        saved = TrainConfig(**state["config"])
        for key in ("n_layers", "d_model", "n_heads", "d_mlp", "seed", "train_seed"):
            if getattr(saved, key) != getattr(self.cfg, key):
                raise ValueError(
                    f"{self.run_dir}/checkpoint.pt was trained with {key}={getattr(saved, key)!r}"
                    f" but the config says {getattr(self.cfg, key)!r}; pass --fresh to start"
                    " over, or point run_dir elsewhere"
                )
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step, self.stage = state["step"], state["stage"]
        self.recent, self.best = state["recent"], state["best"]
        self.snapshots = state["snapshots"]
        self.wall_s = state.get("wall_s", 0.0)
        logger.info("resumed %s at step %d (stage %d)", self.run_dir, self.step, self.stage)

    # -- data -----------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Token ids, labels (-100 except answer tokens), and the final-answer positions."""
        if self.prefetch is not None:
            drawn = self.prefetch.get(self.stage, step)
        else:
            drawn = draw_batch(self.cfg, self.stage, step, self.tokenizer)
        ids, labels, finals = (torch.tensor(x) for x in drawn)
        return ids.to(self.device), labels.to(self.device), finals.to(self.device)

    # -- loop -----------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float]:
        cfg = self.cfg
        ids, labels, finals = self.batch(self.step)
        lr = learning_rate(cfg, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        logits = self.model(
            input_ids=ids, attention_mask=(ids != self.tokenizer.pad_token_id)
        ).logits
        # Position i predicts token i+1: shift labels left by one.
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100
        )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        rows = torch.arange(ids.size(0), device=ids.device)
        acc = (logits[rows, finals].argmax(-1) == ids[rows, finals + 1]).float().mean().item()
        return loss.item(), acc

    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        preds = greedy_next_tokens(self.model, self.tokenizer, [p.text for p in self.eval_programs])
        self.model.train()
        return accuracy_report(self.eval_programs, preds)

    def export(self, folder: Path, row: dict | None = None) -> None:
        """The model in Hugging Face format, with `training_state.json`: its step, stage,
        config and (`row`) its evaluation's log row."""
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        self.model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        state = {"step": self.step, "stage": self.stage, "config": self.cfg.model_dump()}
        if row is not None:
            state["log"] = row
        (tmp / "training_state.json").write_text(json.dumps(state))
        for name in ("README.md", "eval.json"):  # the card, until it is written anew
            if (folder / name).exists():
                shutil.copy(folder / name, tmp / name)
        if (self.run_dir / "log.jsonl").exists():
            shutil.copy(self.run_dir / "log.jsonl", tmp / "log.jsonl")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)

    def fit_schedule(self, steps_per_s: float, seconds: float, decay_fraction: float) -> int:
        """Set max_steps and the cosine decay so that the run ends within `seconds`.

        The run's remaining steps are what `steps_per_s` (measured on this machine) fits in 90%
        of the time left; the decay takes their last `decay_fraction`. The settings are recorded
        in the checkpoint's config, the exported `training_state.json` and the log's `lr`.
        """
        n = max(1, int(steps_per_s * seconds * 0.9))
        decay = int(n * decay_fraction)
        self.cfg = self.cfg.model_copy(
            update={
                "max_steps": self.step + n,
                "decay_start": self.step + n - decay,
                "decay_steps": decay,
            }
        )
        event = {
            "event": "fit",
            "step": self.step,
            "steps_per_s": round(steps_per_s, 2),
            "seconds": round(seconds, 1),
            "max_steps": self.cfg.max_steps,
            "decay_start": self.cfg.decay_start,
            "lr_min": self.cfg.lr_min,
        }
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with (self.run_dir / "log.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")
        logger.info(
            "%.1f steps/s: training to step %d, cosine decay to lr %g from step %d",
            steps_per_s,
            self.cfg.max_steps,
            self.cfg.lr_min,
            self.cfg.decay_start,
        )
        return self.cfg.max_steps

    def run(
        self,
        max_steps: int,
        fit_minutes: float | None = None,
        decay_fraction: float = 0.5,
        probe_steps: int = 200,
    ) -> None:
        """Train to `max_steps`, or, with `fit_minutes`, for that long with a fitted schedule.

        With `fit_minutes`, the first `probe_steps` measure the step rate, then `fit_schedule`
        sets the end and the decay; the run stops at the deadline in any case, and evaluates,
        exports and checkpoints there.
        """
        cfg = self.cfg
        torch.set_num_threads(cfg.threads)
        session_start = time.time()
        deadline = session_start + 60 * fit_minutes if fit_minutes else None
        first_step = self.step
        self.model.train()
        log_path = self.run_dir / "log.jsonl"
        self.run_dir.mkdir(parents=True, exist_ok=True)
        start = time.time() - self.wall_s
        snapshot_steps = set(cfg.snapshot_plan())
        bar = tqdm(initial=self.step, total=max_steps, desc="train", dynamic_ncols=True)
        while self.step < max_steps:
            loss, acc = self.train_step()
            self.step += 1
            self.recent = ([*self.recent, acc])[-cfg.advance_window :]
            window_full = len(self.recent) == cfg.advance_window
            stage = cfg.stages[self.stage]
            passed = window_full and sum(self.recent) / len(self.recent) >= stage.advance_at
            if passed and self.stage < len(cfg.stages) - 1:
                self.stage += 1
                self.recent = []
                bar.write(f"step {self.step}: stage {cfg.stages[self.stage].name}")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}", stage=self.stage)
            now = time.time()
            self.wall_s = now - start
            if deadline is not None:
                if self.step - first_step == probe_steps:
                    rate = probe_steps / (now - session_start)
                    max_steps = self.fit_schedule(rate, deadline - now, decay_fraction)
                    cfg = self.cfg
                    bar.total = max_steps
                if now >= deadline:
                    max_steps = self.step
            snapshot = self.step in snapshot_steps
            if self.step % cfg.eval_every == 0 or self.step == max_steps or snapshot:
                report = self.evaluate()
                row = {
                    "step": self.step,
                    "stage": cfg.stages[self.stage].name,
                    "loss": round(loss, 4),
                    "train_acc": round(sum(self.recent) / max(1, len(self.recent)), 4),
                    "wall_s": round(self.wall_s, 1),
                    "lr": learning_rate(cfg, self.step - 1),
                    "device": self.device_name,
                    "batch_size": cfg.batch_size,
                    **{k: round(v, 4) for k, v in report.items()},
                }
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.write(json.dumps(row))
                if report["all"] > self.best:
                    self.best = report["all"]
                    self.export(Path(cfg.out_dir), row)
                for phase, threshold in cfg.snapshot_at.items():
                    if phase not in self.snapshots and report["all"] >= threshold:
                        self.snapshots[phase] = self.step
                        snapshot = True
                if snapshot:
                    self.export(Path(f"{cfg.out_dir}-step{self.step}"), row)
                self._save()
        bar.close()
        if self.prefetch is not None:  # a later run() draws in-process
            self.prefetch.close()
            self.prefetch = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.train_binding", description=__doc__)
    parser.add_argument("--config", type=Path, help="YAML file of TrainConfig fields")
    parser.add_argument("--max-steps", type=int, help="stop at this step (resumable)")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--out-dir",
        help="export here instead of the config's out_dir (e.g. while the shipped "
        "model and its card stay put)",
    )
    parser.add_argument("--fresh", action="store_true", help="discard the run directory first")
    parser.add_argument("--device", help="cpu, cuda or auto (overrides the config)")
    parser.add_argument("--batch-size", type=int, help="overrides the config")
    parser.add_argument("--data-workers", type=int, help="batch-drawing processes")
    parser.add_argument("--lr-min", type=float, help="where the cosine decay ends")
    parser.add_argument(
        "--fit-minutes",
        type=float,
        help="train for this long: measure the step rate, then end with a cosine decay "
        "(--decay-fraction of the remaining steps) at the deadline",
    )
    parser.add_argument("--decay-fraction", type=float, default=0.5)
    args = parser.parse_args(argv)
    if args.fit_minutes is not None and args.fit_minutes <= 0:
        parser.error(f"--fit-minutes {args.fit_minutes}: give a positive number of minutes")
    if not 0 <= args.decay_fraction <= 1:
        parser.error(f"--decay-fraction {args.decay_fraction}: give a fraction in [0, 1]")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    fields = (yaml.safe_load(args.config.read_text()) if args.config else None) or {}
    if args.threads:
        fields["threads"] = args.threads
    if args.out_dir:
        fields["out_dir"] = args.out_dir
    overrides = {
        "device": args.device,
        "batch_size": args.batch_size,
        "data_workers": args.data_workers,
        "lr_min": args.lr_min,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig(**(fields or {}))
    except ValueError as err:
        parser.error(f"{args.config}: {err}")
    trainer = Trainer(cfg, fresh=args.fresh)
    trainer.run(args.max_steps or cfg.max_steps, args.fit_minutes, args.decay_fraction)
    return 0


if __name__ == "__main__":
    sys.exit(main())
