#!/usr/bin/env bash
# The Chinese word segmentation benchmark of the fine-tuning issue (docs/BENCHMARKS.md):
#
#   1. split pku: the first 90 % of lines train, the last 10 % test (the pku-lm cut), as
#      B/M/E/S tagging JSONL (`nlm finetune convert-cws`);
#   2. pretrain a small BERT (MLM + NSP) on characters of the pku training lines + all of msr
#      (never the pku test lines): `nlm prepare --tokenizer char --objective mlm` + `nlm train`;
#   3. fine-tune it as a B/M/E/S tagger; train the same BERT (architecture, tokenizer, recipe)
#      from fresh weights (while the pretraining runs: it needs only the architecture);
#      run forward maximum matching with the training words;
#   4. score all three on the test lines with the SIGHAN rules -> OUT/results.json;
#   5. the encoder-decoder as text-to-text (issue 18): pretrain a small transformer with span
#      corruption on the same text (`nlm prepare --objective span`), fine-tune it on
#      {"source": characters, "target": words joined by [SEP]} windows (`nlm finetune
#      convert-cws --format seq2seq`, `--task seq2seq`), segment the same test lines by
#      constrained decoding and score them with the same scorer (`nlm finetune evaluate`).
#
#   SYSTEMS="bert transformer" (default) runs both parts; SYSTEMS=transformer only step 5 (+ the
#   split, max matching and jieba), SYSTEMS=bert steps 1-4, SYSTEMS=none only the split, max
#   matching and jieba (seconds).
#
#   scripts/cws_benchmark.sh                # OUT=runs/cws-bench, the docs/BENCHMARKS.md figures
#   PRETRAIN_STEPS=300 PRETRAIN_MORE=0 FT_EPOCHS=2 OUT=runs/cws-quick scripts/cws_benchmark.sh
#
# On a loaded machine a local Ray can time out while starting (its raylet gets 30 s); with
# RAY_ADDRESS=host:port naming a running Ray (`ray start --head`) every stage joins that one.
#
# OUT/times.txt holds each stage's wall time (also in results.json) and OUT/load.log the
# machine's `uptime` once a minute during the run (docs/BENCHMARKS.md reports both).
#
# Each step is skipped when its output already exists, so an interrupted run continues.
set -euo pipefail

cd "$(dirname "$0")/.."
NLM=${NLM:-".venv/bin/python -m nlm"}
PY=${PY:-.venv/bin/python}
DATA=${NLM_DATA_MIRROR:-../shared/data}
OUT=${OUT:-runs/cws-bench}
PRESET=${PRESET:-small}
# Sequences of 64 characters: a step costs half of 128's, and the fine-tuning windows (cut at
# word ends) fit the same 64 positions.
SEQ_LEN=${SEQ_LEN:-64}
# The small preset narrowed to 2 x 128 (0.9 M parameters): what the shared 2-core machine could
# pretrain in the time it had. SET="" trains the full small preset (4 x 256, 4.2 M).
SET=${SET-"n_layer=2 n_embd=128 n_head=2 intermediate_size=512 max_positions=$SEQ_LEN"}
# A small BERT trained from scratch sits at the unigram level (MLM accuracy ~0.1, tag accuracy
# 0.66 = each character's most frequent tag) until attention learns to look at the neighbours;
# measured here, that takes hundreds of updates at lr 1e-3..3e-3, so both stages favour many
# small steps at a high peak rate (800 steps at 1e-3 and batch 32 x 128 never got there).
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2500}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-32}
PRETRAIN_LR=${PRETRAIN_LR:-2e-3}
# Then `nlm train --resume --max-steps PRETRAIN_MORE` (the cosine recomputed for the longer run):
# the MLM accuracy left its plateau (~0.15) only after step 3000. 0 stops at PRETRAIN_STEPS.
PRETRAIN_MORE=${PRETRAIN_MORE:-6000}
FT_EPOCHS=${FT_EPOCHS:-6}
FT_BATCH=${FT_BATCH:-16}
FT_LR=${FT_LR:-2e-3}
WORKERS=${WORKERS:-1}
# One torch thread: on the shared, oversubscribed 2-core machine a BERT forward + backward
# (batch 32 x 128) took 13.7 s with one thread and 24.1 s with two (load average 24).
# THREADS=0 means cores / workers.
THREADS=${THREADS:-1}
SYSTEMS=${SYSTEMS:-"bert transformer"}
# The transformer (step 5): small narrowed to 2 + 2 layers x 128 (seq 64 both sides); span
# corruption at T5's defaults (15 % noise, spans of 3); fine-tuning windows of at most 30
# characters (30 characters + 29 separators + </s> fit the 64 target positions). Chosen to
# finish in about 20 minutes on the shared 2-core machine; under a load average of ~35 it took
# 40 (docs/BENCHMARKS.md).
T_SET=${T_SET-"n_layer=2 n_embd=128 n_head=2 ffn_size=512 max_positions=$SEQ_LEN"}
T_PRETRAIN_STEPS=${T_PRETRAIN_STEPS:-600}
T_PRETRAIN_LR=${T_PRETRAIN_LR:-1e-3}
T_FT_EPOCHS=${T_FT_EPOCHS:-2}
T_FT_BATCH=${T_FT_BATCH:-32}
T_FT_LR=${T_FT_LR:-1e-3}
T_MAX_CHARS=${T_MAX_CHARS:-30}
export NLM_DATA_MIRROR=$DATA
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }

mkdir -p "$OUT/data"
log() { echo "[cws-benchmark $(date +%H:%M:%S)] $*" >&2; }
# the machine's load during the run, once a minute
(while true; do echo "$(date +%H:%M:%S) $(uptime)" >> "$OUT/load.log"; sleep 60; done) &
load_pid=$!
trap 'kill $load_pid 2>/dev/null' EXIT
# stage wall times (seconds), appended as "name seconds" lines; a rerun adds a line
timed() {  # $1 stage name, then the command
  local name=$1 start; shift
  start=$(date +%s)
  "$@"
  echo "$name $(( $(date +%s) - start ))" >> "$OUT/times.txt"
}

# 1. the split
if [[ ! -f $OUT/data/cws-test.jsonl ]]; then
  log "convert pku to B/M/E/S JSONL"
  $NLM finetune convert-cws --input "$DATA/pku/pku_test_gold.utf8" \
    --output "$OUT/data/cws-train.jsonl" --test-output "$OUT/data/cws-test.jsonl" --test-fraction 0.1
fi

# 2. pretraining text and shards
if [[ ! -f $OUT/data/pretrain.txt ]]; then
  lines=$(wc -l < "$DATA/pku/pku_test_gold.utf8")
  head -n $((lines * 9 / 10)) "$DATA/pku/pku_test_gold.utf8" > "$OUT/data/pretrain.txt.tmp"
  cat "$DATA/msr/msr_test_gold.utf8" >> "$OUT/data/pretrain.txt.tmp"
  mv "$OUT/data/pretrain.txt.tmp" "$OUT/data/pretrain.txt"
fi
if has bert; then
if [[ ! -f $OUT/shards/manifest.json ]]; then
  log "nlm prepare (char, mlm, seq_len $SEQ_LEN)"
  timed prepare $NLM prepare --input "$OUT/data/pretrain.txt" --line-docs --segmented --tokenizer char \
    --objective mlm --seq-len "$SEQ_LEN" --val-fraction 0.05 --output "$OUT/shards" \
    --overwrite --no-progress
fi

# 3a. pretrain BERT, in the background
set_args=()
for kv in $SET; do set_args+=(--set "$kv"); done
pretrain_pid=""
if [[ ! -f $OUT/bert-zh/model/config.json ]]; then
  log "nlm train bert $PRESET, $PRETRAIN_STEPS steps"
  timed pretrain $NLM train --data "$OUT/shards" --model bert --preset "$PRESET" "${set_args[@]}" --out "$OUT/bert-zh" \
    --workers "$WORKERS" --cpus-per-worker 1 --torch-threads "$THREADS" --zero-stage 0 \
    --micro-batch "$PRETRAIN_BATCH" \
    --max-steps "$PRETRAIN_STEPS" --lr "$PRETRAIN_LR" --min-lr 1e-4 \
    --warmup-steps $((PRETRAIN_STEPS / 10)) --eval-every $((PRETRAIN_STEPS / 5)) \
    --log-every 50 --no-progress &
  pretrain_pid=$!
fi

# 3b. the fine-tunes: the same recipe for the pretrained BERT and the from-scratch one
finetune() {  # $1 run name, $2 checkpoint, then extra flags
  local run=$1 checkpoint=$2; shift 2
  if [[ ! -f $OUT/$run/model/config.json ]]; then
    log "nlm finetune -> $run $*"
    timed "$run" $NLM finetune --checkpoint "$checkpoint" --task tag --train "$OUT/data/cws-train.jsonl" \
      --eval "$OUT/data/cws-test.jsonl" --out "$OUT/$run" --epochs "$FT_EPOCHS" \
      --micro-batch "$FT_BATCH" --lr "$FT_LR" --workers "$WORKERS" --cpus-per-worker 1 \
      --torch-threads "$THREADS" \
      --log-every 20 --overwrite --no-progress "$@" > "$OUT/$run.json.tmp"
    mv "$OUT/$run.json.tmp" "$OUT/$run.json"
  fi
}
# The from-scratch control needs only the architecture and the tokenizer: an untrained
# checkpoint built from the pretraining run's plan (written when it starts), fine-tuned while
# the pretraining runs (one core each).
until [[ -f $OUT/bert-zh/plan.json ]]; do
  if [[ -n $pretrain_pid ]] && ! kill -0 "$pretrain_pid" 2>/dev/null; then
    wait "$pretrain_pid"  # it ended before planning: its exit status ends this script
  fi
  sleep 5
done
if [[ ! -f $OUT/bert-arch/config.json ]]; then
  $PY - "$OUT" <<'EOF'
import json, sys
from nlm.checkpoint import save_checkpoint
from nlm.models.bert import BERT, BERTConfig
from nlm.tokenizers import load_tokenizer
out = sys.argv[1]
config = BERTConfig.from_dict(json.load(open(f"{out}/bert-zh/plan.json"))["model_config"])
save_checkpoint(f"{out}/bert-arch", BERT(config), load_tokenizer(f"{out}/shards/tokenizer"))
EOF
fi
finetune bert-cws-scratch "$OUT/bert-arch" --from-scratch
if [[ -n $pretrain_pid ]]; then wait "$pretrain_pid"; fi
pretrained_steps=$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['step'])" \
  "$OUT/bert-zh/model/metrics.json")
if (( PRETRAIN_MORE > pretrained_steps )); then
  log "nlm train --resume: $pretrained_steps -> $PRETRAIN_MORE steps"
  timed pretrain-more $NLM train --out "$OUT/bert-zh" --resume --max-steps "$PRETRAIN_MORE" \
    --torch-threads "$THREADS" --no-progress
fi
finetune bert-cws "$OUT/bert-zh"
fi  # has bert

# 3c. the dictionary baseline
timed maxmatch $NLM finetune maxmatch --train "$OUT/data/cws-train.jsonl" --eval "$OUT/data/cws-test.jsonl" \
  > "$OUT/maxmatch.json"

# 3d. jieba (0.42.1, its shipped dictionary, HMM for unknown words: what people install),
#     scored on the same test lines with the same scorer and training-word list (OOV recall)
if [[ ! -f $OUT/jieba.json ]]; then
  log "jieba on the test lines"
  timed jieba $PY - "$OUT" > "$OUT/jieba.json.tmp" <<'EOF'
import json, logging, sys
import jieba
from nlm.finetune.cws import score_segmentation, tags_to_words
from nlm.finetune.data import read_examples

jieba.setLogLevel(logging.WARNING)
out = sys.argv[1]
words = lambda path: [tags_to_words(e.tokens, e.tags) for e in read_examples(path, "tag")]
train = {w for line in words(f"{out}/data/cws-train.jsonl") for w in line}
gold = words(f"{out}/data/cws-test.jsonl")
predicted = [jieba.lcut("".join(line)) for line in gold]
print(json.dumps({"method": f"jieba {jieba.__version__}", **score_segmentation(gold, predicted, train)}))
EOF
  mv "$OUT/jieba.json.tmp" "$OUT/jieba.json"
fi

# 5. the encoder-decoder, text-to-text
if has transformer; then
if [[ ! -f $OUT/data/cws-s2s-test.jsonl ]]; then
  $NLM finetune convert-cws --format seq2seq --max-chars "$T_MAX_CHARS" \
    --input "$DATA/pku/pku_test_gold.utf8" --output "$OUT/data/cws-s2s-train.jsonl" \
    --test-output "$OUT/data/cws-s2s-test.jsonl" --test-fraction 0.1 > /dev/null
fi
if [[ ! -f $OUT/span-shards/manifest.json ]]; then
  log "nlm prepare (char, span, seq_len $SEQ_LEN)"
  timed t5-prepare $NLM prepare --input "$OUT/data/pretrain.txt" --line-docs --segmented --tokenizer char \
    --objective span --seq-len "$SEQ_LEN" --val-fraction 0.05 --output "$OUT/span-shards" \
    --overwrite --no-progress
fi
t_set_args=()
for kv in $T_SET; do t_set_args+=(--set "$kv"); done
if [[ ! -f $OUT/t5-zh/model/config.json ]]; then
  log "nlm train transformer $PRESET, $T_PRETRAIN_STEPS steps"
  timed t5-pretrain $NLM train --data "$OUT/span-shards" --model transformer --preset "$PRESET" \
    "${t_set_args[@]}" --out "$OUT/t5-zh" --workers "$WORKERS" --cpus-per-worker 1 \
    --torch-threads "$THREADS" --zero-stage 0 --micro-batch "$PRETRAIN_BATCH" \
    --max-steps "$T_PRETRAIN_STEPS" --lr "$T_PRETRAIN_LR" --min-lr 1e-4 \
    --warmup-steps $((T_PRETRAIN_STEPS / 10)) --eval-every $((T_PRETRAIN_STEPS / 5)) \
    --log-every 50 --no-progress
fi
if [[ ! -f $OUT/t5-cws/model/config.json ]]; then
  log "nlm finetune --task seq2seq -> t5-cws"
  timed t5-cws $NLM finetune --checkpoint "$OUT/t5-zh" --task seq2seq \
    --train "$OUT/data/cws-s2s-train.jsonl" --eval "$OUT/data/cws-s2s-test.jsonl" \
    --out "$OUT/t5-cws" --epochs "$T_FT_EPOCHS" --micro-batch "$T_FT_BATCH" --lr "$T_FT_LR" \
    --workers "$WORKERS" --cpus-per-worker 1 --torch-threads "$THREADS" \
    --log-every 20 --overwrite --no-progress > "$OUT/t5-cws.json.tmp"
  mv "$OUT/t5-cws.json.tmp" "$OUT/t5-cws.json"
fi
if [[ ! -f $OUT/t5-cws-score.json ]]; then
  log "nlm finetune evaluate t5-cws (constrained decoding, SIGHAN scorer)"
  timed t5-segment $NLM finetune evaluate --checkpoint "$OUT/t5-cws" \
    --eval "$OUT/data/cws-test.jsonl" --train "$OUT/data/cws-train.jsonl" > "$OUT/t5-cws-score.json.tmp"
  mv "$OUT/t5-cws-score.json.tmp" "$OUT/t5-cws-score.json"
fi
fi  # has transformer

# 4. the table
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def finetuned(run):
    m = json.loads((out / run / "model" / "metrics.json").read_text())
    return {k.removeprefix("test_"): m[k] for k in m if k.startswith("test_")} | {"steps": m["step"]}
def pretraining(run, keys):
    path = out / run / "model" / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    return {k: m.get(k) for k in keys}
rows = {}
if (out / "bert-cws").is_dir():
    rows["bert_pretrained_finetuned"] = finetuned("bert-cws")
    rows["bert_from_scratch"] = finetuned("bert-cws-scratch")
rows["forward_maximum_matching"] = json.loads((out / "maxmatch.json").read_text())
rows["jieba"] = json.loads((out / "jieba.json").read_text())
if (out / "t5-cws-score.json").is_file():
    rows["transformer_seq2seq"] = json.loads((out / "t5-cws-score.json").read_text())
times = {}
for line in (out / "times.txt").read_text().splitlines():
    name, seconds = line.split()
    times[name] = int(seconds)  # the last run of a stage counts
result = {
    "pretraining": pretraining("bert-zh", ("step", "val_loss", "val_mlm_acc", "val_nsp_acc", "params", "tokens")),
    "transformer_pretraining": pretraining("t5-zh", ("step", "val_loss", "val_ppl", "params", "tokens")),
    **rows,
    "wall_s": times,
}
(out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
print(f"{'system':28} {'P':>7} {'R':>7} {'F1':>7} {'OOV-R':>7} {'IV-R':>7}")
for name, r in rows.items():
    p, rec, f = (r.get(f"word_{k}", r.get(k)) for k in ("precision", "recall", "f1"))
    print(f"{name:28} {p:7.4f} {rec:7.4f} {f:7.4f} {r['oov_recall']:7.4f} {r['iv_recall']:7.4f}")
EOF
