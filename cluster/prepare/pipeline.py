"""The corpus pipeline: text files -> tokenizer -> tokenized Parquet shards, on Ray Data.

    manifest = prepare(PrepareConfig(input=["corpus/*.txt"], output="shards/wt2", ...))

1. The driver finds the files and cuts them into work units of ~unit_bytes (metadata only).
2. The tokenizer is loaded (--tokenizer-from) or trained on a seeded sample of at most
   sample_bytes of training-split documents, read one unit at a time.
3. Ray Data streams the units through a pool of actors that each hold the tokenizer
   (`map_batches`, one unit per call, `preserve_order`): each actor reads its unit itself,
   splits documents by content hash, tokenizes with batched calls and returns Arrow (numpy
   buffers, no per-token Python on the way out).
4. The driver consumes the results in unit order: clm streams are packed into overlapping rows
   (row boundaries depend on all earlier units, so this step is sequential and cheap: a
   memcpy per token), mlm pairs pass through; rows go to part files under temporary names.
5. The tokenizer is copied next to the shards and manifest.json is written last.

Memory is bounded on both sides: a worker holds one unit, the driver one unit's result plus
the rows of one part file. Output depends only on the inputs and the seed, never on the number
of workers or on scheduling, so the same command gives byte-identical shards.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from nlm.cluster.prepare.encode import (
    META,
    TRAIN,
    VAL,
    cpu_seconds,
    peak_rss_bytes,
    private_rss_bytes,
    process_unit,
)
from nlm.cluster.prepare.sources import (
    Skips,
    Unit,
    find_sources,
    is_val,
    plan_units,
    read_documents,
)
from nlm.config import Config, option, parse_size
from nlm.errors import NLMError
from nlm.shards import (
    MANIFEST,
    OBJECTIVES,
    PIPELINE_VERSION,
    SPAN_SCHEMA,
    ClmPacker,
    Manifest,
    ShardWriter,
    filesystem,
    schema_for,
    write_manifest,
)
from nlm.tokenizers import KINDS, Tokenizer, fingerprint, load_tokenizer, train_tokenizer
from nlm.tokenizers.sentinels import (
    first_sentinel_id,
    sentinel_count,
    with_sentinels,
    write_sentinel_file,
)

MiB = 1 << 20
# Config fields recorded in the manifest besides objective, seq_len and seed.
MANIFEST_SETTINGS = (
    "format",
    "line_docs",
    "text_column",
    "segmented",
    "val_fraction",
    "max_doc_bytes",
    "skip_bad",
)


@dataclasses.dataclass
class PrepareConfig(Config):
    """Everything `nlm prepare` takes (flags and YAML keys have the same names)."""

    input: list[str] = option(
        [],
        "files, directories, globs or URIs (s3://, gs://); repeatable",
        group="input",
        metavar="PATH",
    )
    corpus: str | None = option(
        None,
        "a named corpus instead (wt2-mini, pku-lm, shakespeare): its train file",
        group="input",
    )
    output: str = option("", "shard directory (local path or URI)", group="output")
    format: str = option(
        "auto",
        "auto: by file suffix",
        group="input",
        choices=["auto", "text", "jsonl", "parquet"],
    )
    line_docs: bool = option(False, "text: one document per line", group="input")
    text_column: str = option("text", "JSONL field / Parquet column with the text", group="input")
    tokenizer: str | None = option(None, "default spm-bpe", group="tokenizer", choices=list(KINDS))
    tokenizer_from: str | None = option(
        None, "reuse a saved tokenizer", group="tokenizer", metavar="DIR"
    )
    vocab_size: int | None = option(
        None, "spm: 8000 by default; word/char: all units", group="tokenizer"
    )
    min_count: int | None = option(
        None, "word/char: keep units seen at least this often", group="tokenizer"
    )
    segmented: bool | None = option(
        None,
        "pre-segmented text (pku/msr Chinese): whitespace is the word boundary",
        group="tokenizer",
    )
    sample_bytes: int = option(
        32 * MiB, "tokenizer training sample (e.g. 32M)", group="tokenizer", type=parse_size
    )
    objective: str = option(
        "clm", "clm | mlm | span (T5's span corruption)", group="output", choices=list(OBJECTIVES)
    )
    noise_density: float = option(0.15, "span: fraction of tokens dropped", group="output")
    mean_span_length: float = option(3.0, "span: mean length of a dropped span", group="output")
    seq_len: int = option(256, "ids per row", group="output")
    val_fraction: float = option(0.05, "fraction held out for the val split", group="output")
    seed: int = option(0, "random seed", group="output")
    workers: int = option(0, "tokenizer actors (0: one per core)", group="execution")
    # fractional: leaves room for Ray Data's own tasks
    cpus_per_worker: float = option(0.5, "logical CPUs per actor", group="execution")
    worker_resources: dict[str, float] = option(
        {},
        "custom Ray resource per actor (repeatable), e.g. data=1 for cluster.yaml's data nodes",
        group="execution",
        flag="--worker-resource",
        metavar="NAME=AMOUNT",
    )
    unit_bytes: int = option(4 * MiB, "text per work unit", group="execution", type=parse_size)
    rows_per_file: int = option(
        0, "rows per Parquet part (0: about 4M tokens per file)", group="output"
    )
    max_doc_bytes: int = option(
        64 * MiB, "longest document accepted", group="input", type=parse_size
    )
    skip_bad: bool = option(
        False,
        "skip bad documents (counted in the manifest) instead of stopping",
        group="input",
    )
    overwrite: bool = option(False, "replace the shards in --output", group="output")
    progress: bool | None = option(
        None, "progress bar (default: when stderr is a terminal)", group="execution"
    )

    def check(self, source: str = "prepare config") -> PrepareConfig:
        """Types and ranges; NLMError naming the field."""
        self = self.typed(source)

        def bad(field: str, why: str) -> NLMError:
            return NLMError(f"{source} (field '{field}'): {why}")

        if not self.input and not self.corpus:
            raise bad("input", "no input given (--input PATH or --corpus NAME)")
        if not self.output:
            raise bad("output", "no output directory given (--output DIR)")
        if self.objective not in OBJECTIVES:
            raise bad("objective", f"{self.objective!r} is not one of {', '.join(OBJECTIVES)}")
        if self.tokenizer is not None and self.tokenizer not in KINDS:
            raise bad("tokenizer", f"{self.tokenizer!r} is not one of {', '.join(KINDS)}")
        if self.seq_len < {"mlm": 8, "span": 4}.get(self.objective, 1):
            raise bad("seq_len", f"{self.seq_len} is too short")
        if not 0 < self.noise_density < 1:
            raise bad("noise_density", f"{self.noise_density} is not in (0, 1)")
        if self.mean_span_length < 1:
            raise bad("mean_span_length", f"{self.mean_span_length} is not >= 1")
        if not 0 <= self.val_fraction < 1:
            raise bad("val_fraction", f"{self.val_fraction} is not in [0, 1)")
        for name in ("unit_bytes", "max_doc_bytes", "sample_bytes"):
            if getattr(self, name) <= 0:
                raise bad(name, "must be positive")
        if self.workers < 0 or self.rows_per_file < 0 or self.cpus_per_worker <= 0:
            raise bad("workers", "workers, rows_per_file must be >= 0, cpus_per_worker > 0")
        if not isinstance(self.worker_resources, dict) or any(
            not isinstance(v, (int, float)) or v <= 0 for v in self.worker_resources.values()
        ):
            raise bad("worker_resources", "a mapping NAME: positive amount, e.g. {data: 1}")
        return self

    def worker_options(self) -> dict[str, Any]:
        keys = ("objective", "seq_len", "seed", "val_fraction", "line_docs", "text_column")
        opts = {k: getattr(self, k) for k in keys}
        opts.update(max_doc_bytes=self.max_doc_bytes, skip_bad=self.skip_bad)
        return opts


@dataclasses.dataclass
class PrepareStats:
    seconds: float  # the pipeline (tokenize + pack + write), without Ray start-up
    first_result_seconds: float  # until the first unit came back (actor start-up included)
    total_seconds: float
    documents: int
    tokens: int
    rows: int
    units: int
    workers: int
    driver_peak_rss: int
    worker_peak_rss: int
    driver_private_rss: int  # largest anonymous RSS seen (sampled once per unit)
    worker_private_rss: int
    driver_cpu_seconds: float  # CPU time of the driver during the pipeline
    workers_cpu_seconds: float  # CPU time of all tokenizer actors (processes) together

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"tokens_per_s": round(self.tokens_per_s)}


# --- the driver's steps --------------------------------------------------------------------


def resolve_inputs(cfg: PrepareConfig) -> PrepareConfig:
    """A named corpus becomes its training file (and its segmentation default)."""
    if not cfg.corpus:
        return cfg.replace(segmented=bool(cfg.segmented))
    from nlm.corpora import resolve_corpus

    corpus = resolve_corpus(cfg.corpus)
    segmented = corpus.segmented if cfg.segmented is None else cfg.segmented
    return cfg.replace(input=[*cfg.input, str(corpus.train)], segmented=segmented)


def _sample_texts(cfg: PrepareConfig, units: list[Unit]) -> Iterator[str]:
    """A seeded sample of training-split documents, at most sample_bytes, unit by unit.

    SentencePiece learns from lines (it has a sentence length limit); word and char
    vocabularies count whole documents, so a char vocabulary sees the line breaks it encodes.
    """
    order = list(range(len(units)))
    random.Random(cfg.seed).shuffle(order)
    taken = 0
    by_line = cfg.tokenizer.startswith("spm-")
    for i in order:
        skips = Skips(cfg.skip_bad)  # the real count comes from the workers
        for text, raw in read_documents(
            units[i],
            line_docs=cfg.line_docs,
            text_column=cfg.text_column,
            max_doc_bytes=cfg.max_doc_bytes,
            skips=skips,
        ):
            if is_val(raw, cfg.val_fraction):
                continue
            if by_line:
                yield from (line for line in text.split("\n") if line.strip())
            else:
                yield text
            taken += len(raw)
            if taken >= cfg.sample_bytes:
                return


def check_training_text(cfg: PrepareConfig, units: list[Unit]) -> None:
    """NLMError unless the training split will hold a document (one a tokenizer can learn from
    when one is trained here). Reads units only until the first such document, so a real
    corpus costs one unit; runs before anything is written.

    Documents go to validation by content hash (`is_val`), so a tiny corpus can lose every
    document to it; that gets its own message naming --val-fraction rather than a tokenizer
    trainer's "no text" (or, with --tokenizer-from, a complete shard set with no rows).
    """
    inputs = ", ".join(cfg.input)
    val = specials_only = 0
    for unit in units:
        for text, raw in read_documents(
            unit,
            line_docs=cfg.line_docs,
            text_column=cfg.text_column,
            max_doc_bytes=cfg.max_doc_bytes,
            skips=Skips(cfg.skip_bad),
        ):
            if is_val(raw, cfg.val_fraction):
                val += 1
            elif not cfg.tokenizer_from and not _has_plain_text(text):
                specials_only += 1
            else:
                return
    if specials_only:
        raise NLMError(
            f"{inputs}: the training documents hold nothing but special tokens "
            "(<unk>, [MASK], ...), so there is no text to train a tokenizer on; "
            "use --tokenizer-from DIR or add text"
        )
    if val:
        raise NLMError(
            f"{inputs}: every document ({val}) went to the validation split "
            f"(--val-fraction {cfg.val_fraction:g} picks documents by content hash); add text, "
            "split it into more documents (--line-docs), or lower --val-fraction (0 keeps all)"
        )
    raise NLMError(f"{inputs}: no text (every document is empty or blank)")


def _has_plain_text(text: str) -> bool:
    from nlm.tokenizers.base import SPECIAL_IDS, split_specials

    return any(part.strip() for part in split_specials(text) if part not in SPECIAL_IDS)


def train_on_sample(cfg: PrepareConfig, units: list[Unit]) -> Tokenizer:
    return train_tokenizer(
        cfg.tokenizer,
        _sample_texts(cfg, units),
        vocab_size=cfg.vocab_size,
        min_count=cfg.min_count,
        segmented=bool(cfg.segmented),
        seed=cfg.seed,
    )


def _prepare_output(cfg: PrepareConfig) -> tuple[pafs.FileSystem, str]:
    fs, root = filesystem(cfg.output)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        raise NLMError(f"{cfg.output}: exists and is a file, not a directory")
    if info.type == pafs.FileType.Directory:
        existing = fs.get_file_info(pafs.FileSelector(root))
        if existing and not cfg.overwrite:
            raise NLMError(f"{cfg.output}: exists and is not empty (use --overwrite to replace it)")
        # The old manifest goes first: a crash from here on leaves no manifest, not a wrong one.
        names = {e.base_name: e for e in existing}
        if MANIFEST in names:
            fs.delete_file(names[MANIFEST].path)
        for name in ("train", "val", "tokenizer"):
            if name in names and names[name].type == pafs.FileType.Directory:
                fs.delete_dir(names[name].path)
    fs.create_dir(root, recursive=True)
    return fs, root


def _cleanup(fs: pafs.FileSystem, root: str) -> None:
    """Remove what this run wrote (the directory stays without a manifest either way)."""
    for name in ("train", "val", "tokenizer", MANIFEST):
        path = f"{root}/{name}"
        info = fs.get_file_info(path)
        try:
            if info.type == pafs.FileType.Directory:
                fs.delete_dir(path)
            elif info.type == pafs.FileType.File:
                fs.delete_file(path)
        except OSError:
            pass


def _upload_dir(local: Path, fs: pafs.FileSystem, target: str) -> None:
    fs.create_dir(target, recursive=True)
    for path in sorted(local.iterdir()):
        with fs.open_output_stream(f"{target}/{path.name}") as sink:
            sink.write(path.read_bytes())


def _worker_count(cfg: PrepareConfig, started_locally: bool) -> int:
    import ray

    if cfg.workers:
        return cfg.workers
    cluster_cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(cluster_cpus, os.cpu_count() or 1) if started_locally else cluster_cpus)


# --- Ray ---------------------------------------------------------------------------------------


class _TokenizeActor:
    """A Ray Data actor: holds one tokenizer, processes one unit per call."""

    def __init__(self, tokenizer_ref: list, opts: dict[str, Any]) -> None:
        import ray

        # The files come as a nested object ref: large constructor arguments stored in the
        # object store make Ray warn that actor restarts may fail (ray#53727).
        with tempfile.TemporaryDirectory() as tmp:
            for name, data in ray.get(tokenizer_ref[0]).items():
                Path(tmp, name).write_bytes(data)
            self.tok = load_tokenizer(tmp)
        self.opts = opts
        # Everything imported so far (Ray, Ray Data, pyarrow) lives as long as the actor: keep
        # it out of the cyclic collector's scans, which the encoder's many short-lived lists
        # trigger often (~4 % of an actor's CPU time otherwise).
        gc.freeze()

    def __call__(self, batch: pa.Table) -> pa.Table:
        tables = [
            process_unit(self.tok, Unit.from_json(spec), self.opts)
            for spec in batch.column("unit").to_pylist()
        ]
        return pa.concat_tables(tables)


def _start_ray() -> bool:
    """Join RAY_ADDRESS or start a quiet local instance; True when started here."""
    import logging

    import ray

    from nlm.cluster.launch import ensure_ray

    # Keep stderr for our progress bar and errors: no "Started a local Ray instance" line,
    # no Ray Data console logging (it still goes to the session's ray-data.log).
    logging.getLogger("ray._private.worker").setLevel(logging.WARNING)
    how = ensure_ray()
    import ray.data  # configures the "ray.data" logger, which is then quietened

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # unit order is stream order
    ctx.enable_progress_bars = False  # ours shows documents and tokens per second
    ctx.print_on_execution_start = False
    return how == "local"


def _unit_results(
    cfg: PrepareConfig,
    units: list[Unit],
    tokenizer_files: dict[str, bytes],
    workers: int,
    restart_actors: bool,
) -> Iterator[pa.Table]:
    """Each unit's result table, in unit order, streamed through the actor pool."""
    import ray

    tokenizer_ref = ray.put(tokenizer_files)
    items = [{"unit": u.to_json()} for u in units]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts has no named parameter in ray 2.60 (ray_remote_args is deprecated).
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(
            _TokenizeActor,
            fn_constructor_kwargs={"tokenizer_ref": [tokenizer_ref], "opts": cfg.worker_options()},
            batch_size=1,
            batch_format="pyarrow",
            # One unit running and one queued per actor: no idle gap between units, and no
            # deep per-actor queue to leave one actor busy while the others finish.
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=2),
            num_cpus=cfg.cpus_per_worker,
            resources=cfg.worker_resources or None,
            # Restarting a lost actor matters on a cluster; on a local instance a lost actor
            # means the machine is in trouble, and restarts make Ray print a warning on stderr.
            max_restarts=-1 if restart_actors else 0,
        )
    yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)


def _progress(cfg: PrepareConfig, total_bytes: int):
    from tqdm import tqdm

    disable = None if cfg.progress is None else not cfg.progress
    return tqdm(
        total=total_bytes,
        unit="B",
        unit_scale=True,
        desc="prepare",
        disable=disable,
        file=sys.stderr,
    )


def prepare(cfg: PrepareConfig) -> tuple[Manifest, PrepareStats]:
    """Run the pipeline (see the module docstring); NLMError for bad input, nothing left
    looking complete on failure."""
    started = time.perf_counter()
    cfg = cfg.check()
    cfg = resolve_inputs(cfg)
    sources = find_sources(cfg.input, cfg.format)
    skips = Skips(cfg.skip_bad)
    # Small corpora get smaller units, so that every worker has some: at least ~16 units.
    # (The plan depends on the inputs and config only, never on the cluster.)
    total = sum(s.size for s in sources)
    unit_bytes = min(cfg.unit_bytes, max(64 * 1024, total // 16))
    units = plan_units(
        sources,
        line_docs=cfg.line_docs,
        unit_bytes=unit_bytes,
        max_doc_bytes=cfg.max_doc_bytes,
        text_column=cfg.text_column,
        skips=skips,
    )
    if cfg.tokenizer_from:
        tok = load_tokenizer(cfg.tokenizer_from)
        if cfg.tokenizer is not None and tok.kind != cfg.tokenizer:
            raise NLMError(
                f"--tokenizer {cfg.tokenizer} but --tokenizer-from {cfg.tokenizer_from} is {tok.kind}"
            )
        cfg = cfg.replace(tokenizer=tok.kind)
    elif cfg.tokenizer is None:
        cfg = cfg.replace(tokenizer="spm-bpe")
    check_training_text(cfg, units)  # before _prepare_output: nothing written for bad input
    fs, root = _prepare_output(cfg)
    try:
        with tempfile.TemporaryDirectory(prefix="nlm-tokenizer-") as tmp:
            tok_dir = Path(tmp)
            if cfg.tokenizer_from:  # the files as they are, so the fingerprint is theirs
                for path in Path(cfg.tokenizer_from).iterdir():
                    if path.is_file():
                        shutil.copyfile(path, tok_dir / path.name)
            else:
                tok = train_on_sample(cfg, units)
            if cfg.objective == "span":  # T5's <extra_id_k> join the vocabulary
                spanned = with_span_sentinels(cfg, tok)
                if spanned is not tok and cfg.tokenizer_from:
                    write_sentinel_file(tok_dir, sentinel_count(spanned))
                tok = spanned
            if not cfg.tokenizer_from:
                tok.save(tok_dir)
            tokenizer_files = {p.name: p.read_bytes() for p in sorted(tok_dir.iterdir())}
            started_locally = _start_ray()
            workers = min(_worker_count(cfg, started_locally), max(1, len(units)))
            splits, stats = _run(
                cfg,
                fs,
                root,
                units,
                skips,
                tokenizer_files,
                workers,
                not started_locally,
                first_sentinel=first_sentinel_id(tok),
            )
            _upload_dir(tok_dir, fs, f"{root}/tokenizer")
            tokenizer = {"kind": tok.kind, "vocab_size": tok.vocab_size}
            if cfg.objective == "span":
                tokenizer["sentinels"] = sentinel_count(tok)
            tokenizer["fingerprint"] = fingerprint(tok_dir)
        manifest = Manifest(
            pipeline_version=PIPELINE_VERSION,
            objective=cfg.objective,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            tokenizer=tokenizer,
            sources=[{"path": s.uri, "bytes": s.size} for s in sources],
            splits=splits,
            skipped=skips.to_dict(),
            settings={k: getattr(cfg, k) for k in MANIFEST_SETTINGS} | span_settings(cfg, tok),
        )
        write_manifest(fs, root, manifest)
    except BaseException:
        _cleanup(fs, root)
        raise
    stats.total_seconds = time.perf_counter() - started
    return manifest, stats


class _Consumer:
    """The driver's side of the stream: unit results in, part files and counts out."""

    def __init__(
        self,
        cfg: PrepareConfig,
        fs: pafs.FileSystem,
        root: str,
        skips: Skips,
        first_sentinel: int = 0,
    ) -> None:
        self.cfg, self.skips = cfg, skips
        self.first_sentinel = first_sentinel
        self.schema = schema_for(cfg.objective)
        rows_per_file = cfg.rows_per_file or max(1, (4 * MiB) // (cfg.seq_len + 1))
        self.writers = {
            s: ShardWriter(fs, root, name, self.schema, rows_per_file)
            for s, name in ((TRAIN, "train"), (VAL, "val"))
        }
        # span rows take seq_len - 1 fresh tokens each (so the input, with </s>, fits seq_len).
        width = cfg.seq_len - 1 if cfg.objective == "span" else cfg.seq_len
        self.packers = {s: ClmPacker(width) for s in (TRAIN, VAL)}
        self.documents = {TRAIN: 0, VAL: 0}
        self.tokens = {TRAIN: 0, VAL: 0}
        self.bytes = 0
        self.peak = {"worker_rss": 0, "worker_private": 0, "driver_private": 0}
        self.worker_cpu: dict[int, float] = {}  # per actor process: its latest CPU time

    def consume(self, table: pa.Table) -> None:
        split = table.column("split").to_numpy(zero_copy_only=False)
        for info in table.column("meta").filter(pa.array(split == META)).to_pylist():
            self._count(json.loads(info))
        for s in (TRAIN, VAL):
            part = table.filter(pa.array(split == s))
            if part.num_rows == 0:
                continue
            if self.cfg.objective == "mlm":
                self.writers[s].write(part.select(self.schema.names).cast(self.schema))
                continue
            for chunk in part.column("input_ids").chunks:
                for i in range(len(chunk)):
                    rows = self.packers[s].push(_values(chunk, i))
                    if rows is not None and self.cfg.objective == "span":
                        rows = self._corrupt(rows, s)
                    if rows is not None:
                        self.writers[s].write(rows)

    def _corrupt(self, rows: pa.Table, split: int) -> pa.Table:
        cfg = self.cfg
        return span_table(
            rows,
            f"{cfg.seed}|{split}",
            self.first_sentinel,
            cfg.noise_density,
            cfg.mean_span_length,
        )

    def _count(self, meta: dict[str, Any]) -> None:
        if meta["error"]:
            raise NLMError(meta["error"])  # the first bad document in stream order
        self.skips.merge(meta["skipped"]["reasons"], meta["skipped"]["examples"])
        for s, name in ((TRAIN, "train"), (VAL, "val")):
            self.documents[s] += meta["documents"][name]
            self.tokens[s] += meta["tokens"][name]
        self.bytes += meta["bytes"]
        peak = self.peak
        peak["worker_rss"] = max(peak["worker_rss"], meta["worker_peak_rss"])
        peak["worker_private"] = max(peak["worker_private"], meta["worker_private_rss"])
        peak["driver_private"] = max(peak["driver_private"], private_rss_bytes())
        pid, cpu = meta["worker"]
        self.worker_cpu[pid] = max(self.worker_cpu.get(pid, 0.0), cpu)

    def close(self) -> dict[str, dict[str, Any]]:
        splits = {}
        for s, name in ((TRAIN, "train"), (VAL, "val")):
            files = self.writers[s].close()
            splits[name] = {
                "rows": self.writers[s].rows,
                "tokens": self.tokens[s],
                "documents": self.documents[s],
                "files": files,
            }
        return splits


def _run(
    cfg: PrepareConfig,
    fs: pafs.FileSystem,
    root: str,
    units: list[Unit],
    skips: Skips,
    tokenizer_files: dict[str, bytes],
    workers: int,
    restart_actors: bool,
    first_sentinel: int = 0,
) -> tuple[dict[str, dict[str, Any]], PrepareStats]:
    """Stream the units through the actors into part files; (manifest splits, stats)."""
    t0, driver_cpu = time.perf_counter(), cpu_seconds()
    consumer = _Consumer(cfg, fs, root, skips, first_sentinel)
    first_result = 0.0
    with _progress(cfg, sum(u.nbytes for u in units)) as bar:
        for table in _unit_results(cfg, units, tokenizer_files, workers, restart_actors):
            first_result = first_result or time.perf_counter() - t0
            before = consumer.bytes
            consumer.consume(table)
            seconds = max(time.perf_counter() - t0, 1e-9)
            docs = sum(consumer.documents.values())
            bar.update(consumer.bytes - before)
            bar.set_postfix_str(
                f"{docs / seconds:,.0f} docs/s {sum(consumer.tokens.values()) / seconds:,.0f} tok/s",
                refresh=False,
            )
        splits = consumer.close()
    stats = PrepareStats(
        seconds=time.perf_counter() - t0,
        first_result_seconds=first_result,
        total_seconds=0.0,
        documents=sum(consumer.documents.values()),
        tokens=sum(consumer.tokens.values()),
        rows=sum(w.rows for w in consumer.writers.values()),
        units=len(units),
        workers=workers,
        driver_peak_rss=peak_rss_bytes(),
        worker_peak_rss=consumer.peak["worker_rss"],
        driver_private_rss=consumer.peak["driver_private"],
        worker_private_rss=consumer.peak["worker_private"],
        driver_cpu_seconds=cpu_seconds() - driver_cpu,
        workers_cpu_seconds=sum(consumer.worker_cpu.values()),
    )
    return splits, stats


def span_table(
    rows: pa.Table,
    seed: str,
    first_sentinel: int,
    noise_density: float,
    mean_span_length: float,
) -> pa.Table:
    """Packed stream rows (ClmPacker's) -> SPAN_SCHEMA rows (nlm.objectives.span_corrupt);
    each row's noise drawn from (seed, its stream_pos) only, so the shards do not depend on
    how the stream arrived."""
    from nlm.objectives import span_corrupt  # torch: only when preparing span shards

    inputs, targets = [], []
    positions = rows.column("stream_pos").to_pylist()
    for ids, pos in zip(rows.column("input_ids").to_pylist(), positions, strict=True):
        rng = random.Random(f"{seed}|{pos}")
        # The last token of a packed row starts the next one: each row corrupts its own.
        x, y = span_corrupt(ids[:-1], first_sentinel, rng, noise_density, mean_span_length)
        inputs.append(x)
        targets.append(y)
    columns = {"input_ids": inputs, "target_ids": targets, "stream_pos": positions}
    return pa.table(columns, schema=SPAN_SCHEMA)


def span_sentinels_needed(cfg: PrepareConfig) -> int:
    """The most spans (so sentinels) a row of seq_len - 1 tokens is cut into."""
    from nlm.objectives import max_spans

    return max_spans(cfg.seq_len - 1, cfg.noise_density, cfg.mean_span_length)


def with_span_sentinels(cfg: PrepareConfig, tok: Tokenizer) -> Tokenizer:
    """The tokenizer of span shards: `tok` with the `<extra_id_k>` sentinel tokens the rows
    need at the end of its vocabulary (nlm/tokenizers/sentinels.py); a --tokenizer-from that
    has enough of them already is kept as it is."""
    needed = span_sentinels_needed(cfg)
    if sentinel_count(tok) >= needed:
        return tok
    return with_sentinels(tok, needed)


def span_settings(cfg: PrepareConfig, tok: Tokenizer) -> dict[str, Any]:
    """The manifest's span-corruption settings: the sentinels are the tokenizer's last ids,
    first_sentinel .. first_sentinel + sentinels - 1 (`<extra_id_0>` ...)."""
    if cfg.objective != "span":
        return {}
    return {
        "noise_density": cfg.noise_density,
        "mean_span_length": cfg.mean_span_length,
        "first_sentinel": first_sentinel_id(tok),
        "sentinels": sentinel_count(tok),
    }


def _values(chunk: pa.ListArray, i: int) -> np.ndarray:
    """The i-th list of a list<int32> chunk as a numpy view (zero-copy)."""
    offsets = chunk.offsets
    start, end = offsets[i].as_py(), offsets[i + 1].as_py()
    return chunk.values.slice(start, end - start).to_numpy(zero_copy_only=True)
