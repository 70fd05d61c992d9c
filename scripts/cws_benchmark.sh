#!/usr/bin/env bash
# The Chinese word segmentation benchmark of the fine-tuning issue (docs/BENCHMARKS.md):
#
#   1. split pku: the first 90 % of lines train, the last 10 % test (the pku-lm cut), as
#      B/M/E/S tagging JSONL (`nlm finetune convert-cws`);
#   2. pretrain a small BERT (MLM + NSP) on characters of the pku training lines + all of msr
#      (never the pku test lines): `nlm prepare --tokenizer char --objective mlm` + `nlm train`;
#   3. fine-tune it as a B/M/E/S tagger; train the same BERT (architecture, tokenizer, recipe)
#      from fresh weights; run forward maximum matching with the training words;
#   4. score all three on the test lines with the SIGHAN rules -> OUT/results.json.
#
#   scripts/cws_benchmark.sh                         # OUT=runs/cws-bench
#   PRETRAIN_STEPS=300 FT_EPOCHS=2 OUT=runs/cws-quick scripts/cws_benchmark.sh
#
# Each step is skipped when its output already exists, so an interrupted run continues.
set -euo pipefail

cd "$(dirname "$0")/.."
NLM=${NLM:-".venv/bin/python -m nlm"}
PY=${PY:-.venv/bin/python}
DATA=${NLM_DATA_MIRROR:-../shared/data}
OUT=${OUT:-runs/cws-bench}
PRESET=${PRESET:-small}
# The small preset narrowed to 2 x 128 (0.9 M parameters): what the shared 2-core machine could
# pretrain in the time it had. SET="" trains the full small preset (4 x 256, 4.2 M).
SET=${SET-"n_layer=2 n_embd=128 n_head=2 intermediate_size=512"}
SEQ_LEN=${SEQ_LEN:-128}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-800}
PRETRAIN_BATCH=${PRETRAIN_BATCH:-32}
PRETRAIN_LR=${PRETRAIN_LR:-1e-3}
FT_EPOCHS=${FT_EPOCHS:-6}
FT_BATCH=${FT_BATCH:-32}
FT_LR=${FT_LR:-5e-4}
WORKERS=${WORKERS:-1}
export NLM_DATA_MIRROR=$DATA

mkdir -p "$OUT/data"
log() { echo "[cws-benchmark $(date +%H:%M:%S)] $*" >&2; }

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
if [[ ! -f $OUT/shards/manifest.json ]]; then
  log "nlm prepare (char, mlm, seq_len $SEQ_LEN)"
  $NLM prepare --input "$OUT/data/pretrain.txt" --line-docs --segmented --tokenizer char \
    --objective mlm --seq-len "$SEQ_LEN" --val-fraction 0.05 --output "$OUT/shards" \
    --overwrite --no-progress
fi

# 3a. pretrain BERT
set_args=()
for kv in $SET; do set_args+=(--set "$kv"); done
if [[ ! -f $OUT/bert-zh/model/config.json ]]; then
  log "nlm train bert $PRESET, $PRETRAIN_STEPS steps"
  $NLM train --data "$OUT/shards" --model bert --preset "$PRESET" "${set_args[@]}" --out "$OUT/bert-zh" \
    --workers "$WORKERS" --cpus-per-worker 1 --zero-stage 0 --micro-batch "$PRETRAIN_BATCH" \
    --max-steps "$PRETRAIN_STEPS" --lr "$PRETRAIN_LR" --min-lr 1e-4 \
    --warmup-steps $((PRETRAIN_STEPS / 10)) --eval-every $((PRETRAIN_STEPS / 5)) \
    --log-every 50 --no-progress
fi

# 3b. fine-tune it, and the same BERT from scratch (same recipe)
finetune() {  # $1 run name, then extra flags
  local run=$1; shift
  if [[ ! -f $OUT/$run/model/config.json ]]; then
    log "nlm finetune -> $run $*"
    $NLM finetune --checkpoint "$OUT/bert-zh" --task tag --train "$OUT/data/cws-train.jsonl" \
      --eval "$OUT/data/cws-test.jsonl" --out "$OUT/$run" --epochs "$FT_EPOCHS" \
      --micro-batch "$FT_BATCH" --lr "$FT_LR" --workers "$WORKERS" --cpus-per-worker 1 \
      --log-every 20 --overwrite --no-progress "$@" > "$OUT/$run.json.tmp"
    mv "$OUT/$run.json.tmp" "$OUT/$run.json"
  fi
}
finetune bert-cws
finetune bert-cws-scratch --from-scratch

# 3c. the dictionary baseline
$NLM finetune maxmatch --train "$OUT/data/cws-train.jsonl" --eval "$OUT/data/cws-test.jsonl" \
  > "$OUT/maxmatch.json"

# 4. the table
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def finetuned(run):
    m = json.loads((out / run / "model" / "metrics.json").read_text())
    return {k.removeprefix("test_"): m[k] for k in m if k.startswith("test_")} | {"steps": m["step"]}
pretrain = json.loads((out / "bert-zh" / "model" / "metrics.json").read_text())
rows = {
    "bert_pretrained_finetuned": finetuned("bert-cws"),
    "bert_from_scratch": finetuned("bert-cws-scratch"),
    "forward_maximum_matching": json.loads((out / "maxmatch.json").read_text()),
}
result = {"pretraining": {k: pretrain.get(k) for k in ("step", "val_loss", "val_mlm_acc", "val_nsp_acc", "params", "tokens")}, **rows}
(out / "results.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
print(f"{'system':28} {'P':>7} {'R':>7} {'F1':>7} {'OOV-R':>7} {'IV-R':>7}")
for name, r in rows.items():
    p, rec, f = (r.get(f"word_{k}", r.get(k)) for k in ("precision", "recall", "f1"))
    print(f"{name:28} {p:7.4f} {rec:7.4f} {f:7.4f} {r['oov_recall']:7.4f} {r['iv_recall']:7.4f}")
EOF
