"""`nlm study`: prepare a corpus, train fnn/rnn/lstm (and optionally gpt) on it, compare them.

Every step is an ordinary `nlm` command run as a subprocess (each starts and stops its own local
Ray), so the study is exactly what a user would type:
    nlm prepare --input TRAIN --output OUT/shards --tokenizer word [--segmented] ...
    nlm train --data OUT/shards --model fnn --preset notes --workers 2 --max-steps N --out OUT/runs/fnn
    ... rnn, lstm ...
then compares OUT/runs/* in process and writes OUT/report.md, report.json and the figures.
A step whose output exists and whose command is unchanged (OUT/steps/NAME.json) is skipped, so
an interrupted study resumes; --force redoes everything.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from nlm.config import Config, read_yaml
from nlm.corpora import resolve_corpus
from nlm.errors import NLMError
from nlm.models.learning_rates import STUDY_LR, STUDY_MIN_LR


@dataclasses.dataclass
class StudyConfig(Config):
    corpus: str = "pku-lm"
    models: list[str] = dataclasses.field(default_factory=lambda: ["fnn", "rnn", "lstm"])
    preset: str = "notes"
    presets: dict[str, str] = dataclasses.field(default_factory=dict)  # per-family override
    vocab_size: int = 1007  # the notes' 1000 words + the 7 special tokens (<unk> among them)
    seq_len: int = 64
    workers: int = 2
    max_steps: int = 1500
    # The study's own schedule (its reports in docs/STUDY.md were made with it), not the
    # trainer's per-family defaults, so that the models it compares train alike.
    lr: float = STUDY_LR
    min_lr: float = STUDY_MIN_LR
    warmup_steps: int = 100
    prepare_args: list[str] = dataclasses.field(default_factory=list)  # extra `nlm prepare` flags
    train_args: list[str] = dataclasses.field(default_factory=list)  # extra `nlm train` flags
    n_words: int = 20
    k: int = 10
    seed: int = 7
    which: str = "input"
    min_count: int = 5

    def check(self, source: str = "study config") -> StudyConfig:
        """Types and ranges; NLMError naming the field."""
        from nlm.models import FAMILIES, families_where
        from nlm.wordvectors import WHICH

        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if not all(m in FAMILIES for m in self.models):
            raise bad("models", f"{self.models!r} is not a list of {', '.join(FAMILIES)}")
        causal = families_where(lambda cls: cls.causal)
        not_causal = [m for m in self.models if m not in causal]
        if not_causal:
            raise bad(
                "models",
                f"{not_causal[0]} is not a causal LM; the study trains {', '.join(causal)}",
            )
        for name in ("vocab_size", "seq_len", "workers", "max_steps", "n_words", "k", "min_count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(name, f"{value!r} is not a positive integer")
        if not isinstance(self.lr, int | float) or not self.lr > 0:
            raise bad("lr", f"{self.lr!r} is not a positive number")
        if not isinstance(self.min_lr, int | float) or self.min_lr < 0:
            raise bad("min_lr", f"{self.min_lr!r} is not a number >= 0")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise bad("warmup_steps", f"{self.warmup_steps!r} is not a non-negative integer")
        if self.which not in WHICH:
            raise bad("which", f"{self.which!r} is not one of {', '.join(WHICH)}")
        for name in ("prepare_args", "train_args"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
                raise bad(name, f"{value!r} is not a list of strings")
        return self

    @classmethod
    def load_yaml(cls, path: str | Path) -> StudyConfig:
        """Read and check a configs/study-*.yaml file."""
        return cls.from_dict(read_yaml(path, what="study settings"), source=str(path)).check(
            str(path)
        )


@dataclasses.dataclass
class Step:
    name: str
    argv: list[str]  # arguments after `nlm`
    output: Path  # exists when the step is done

    def command(self) -> str:
        return "nlm " + shlex.join(self.argv)


def plan(config: StudyConfig, out: Path) -> list[Step]:
    """The prepare and train steps of a study, in order."""
    corpus = resolve_corpus(config.corpus)
    shards = out / "shards"
    prepare = ["prepare", "--input", str(corpus.train), "--output", str(shards)]
    prepare += ["--tokenizer", "word", "--objective", "clm", "--seq-len", str(config.seq_len)]
    prepare += ["--line-docs", "--vocab-size", str(config.vocab_size)]
    if corpus.segmented:
        prepare.append("--segmented")
    steps = [Step("prepare", prepare + config.prepare_args, shards / "manifest.json")]
    for family in config.models:
        run_dir = out / "runs" / family
        train = ["train", "--data", str(shards), "--model", family]
        train += ["--preset", config.presets.get(family, config.preset)]
        train += ["--workers", str(config.workers), "--max-steps", str(config.max_steps)]
        train += ["--lr", str(config.lr), "--min-lr", str(config.min_lr)]
        train += ["--warmup-steps", str(config.warmup_steps)]
        train += ["--out", str(run_dir)]
        steps.append(
            Step(f"train-{family}", train + config.train_args, run_dir / "model" / "config.json")
        )
    return steps


def _stamp(out: Path, step: Step) -> Path:
    return out / "steps" / f"{step.name}.json"


def is_done(out: Path, step: Step) -> bool:
    stamp = _stamp(out, step)
    if not (step.output.is_file() and stamp.is_file()):
        return False
    return json.loads(stamp.read_text(encoding="utf-8")).get("argv") == step.argv


def run_step(out: Path, step: Step) -> None:
    print(f"[study] {step.command()}", flush=True)
    # the same interpreter, so the study works from a venv that is not on PATH
    argv = [sys.executable, "-c", "from nlm.cli import main; main()", *step.argv]
    code = subprocess.call(argv)
    if code != 0:
        raise NLMError(f"study step '{step.name}' failed with exit status {code}: {step.command()}")
    if not step.output.is_file():
        raise NLMError(f"study step '{step.name}' finished but wrote no {step.output}")
    stamp = _stamp(out, step)
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps({"argv": step.argv}, ensure_ascii=False) + "\n", encoding="utf-8")


def run_study(
    config: StudyConfig, out: str | Path, force: bool = False, dry_run: bool = False
) -> dict[str, Any] | None:
    """Run (or with dry_run, print) every step, then write the comparison report into OUT."""
    from nlm.study.compare import compare_checkpoints

    config = config.check()
    if len(config.models) < 2:
        raise NLMError(f"study: field 'models' needs at least two families, got {config.models}")
    out = Path(out)
    steps = plan(config, out)
    if dry_run:
        for step in steps:
            print(step.command())
        return None
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(config.to_json() + "\n", encoding="utf-8")
    for step in steps:
        if not force and is_done(out, step):
            print(f"[study] done already, skipping: {step.command()}", flush=True)
            continue
        run_step(out, step)
    corpus = resolve_corpus(config.corpus).name
    return compare_checkpoints(
        [out / "runs" / family for family in config.models],
        out,
        n_random=config.n_words,
        k=config.k,
        seed=config.seed,
        which=config.which,  # type: ignore[arg-type]
        min_count=config.min_count,
        title=f"Word-vector study: {corpus}, preset {config.preset}",
    )
