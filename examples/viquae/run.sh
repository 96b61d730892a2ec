#!/usr/bin/env bash
# The ViQuAE recipe, each step one command with a config file (examples/viquae/*.yaml):
#   bash examples/viquae/run.sh --questions Q --articles A --passages P --images DIR --output OUT [--small]
# Q: PaulLerner/viquae_dataset, a save_to_disk copy or a folder of {train,validation,test}.jsonl
# A: PaulLerner/viquae_wikipedia or a folder with its three .jsonl.gz files;  P: PaulLerner/viquae_v4-alpha_passages
# or a save_to_disk copy;  DIR: the images folder.
# --small: a tiny random starting model built offline, CPU settings for a KB of ~1,000 passages (minutes on 2 cores).
# Full scale: VIQUAE_START_MODEL=<a joint encoder with a CLIP tower> (see README "ViQuAE"), VIQUAE_GPUS (default 1).
# VIQUAE_MAX_STEPS=N: stop training after N steps (a quick check of the whole pipeline).
# Writes OUT/qrels.test.json (provenance relevance) and OUT/metrics.json ({system: {metric: value}}, test split,
# answer-extended fused qrels) for bm25, dense, dense-text-only, fused (gzmuv wsum tuned on validation), fused-rrf.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
small=0; questions=""; articles=""; passages=""; images=""; out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --questions) questions="$2"; shift 2 ;;
    --articles) articles="$2"; shift 2 ;;
    --passages) passages="$2"; shift 2 ;;
    --images) images="$2"; shift 2 ;;
    --output) out="$2"; shift 2 ;;
    --small) small=1; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
for name in questions articles passages images out; do
  if [ -z "${!name}" ]; then echo "run.sh: --${name/out/output} is required" >&2; exit 2; fi
done
mkdir -p "$out"
VJE="python -m vl_joint_encoder"
suffix=""; [ "$small" = 1 ] && suffix="_small"
export TOKENIZERS_PARALLELISM=false
if [ "$small" = 1 ]; then export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1; fi
seconds() { date +%s; }
step() { echo "== $1"; }

step "1. prepare: relevance, BM25 runs and negatives, qrels"
t0=$(seconds)
[ -f "$out/data/prepare.json" ] || $VJE viquae-prepare "$here/prepare$suffix.yaml" --questions "$questions" \
  --articles "$articles" --passages "$passages" --output "$out/data"
data="--questions $out/data/questions --articles $out/data/articles --passages $passages --image_root $images"

step "2. starting model"
if [ "$small" = 1 ]; then
  start="$out/start-model"
  [ -f "$start/config.json" ] || python "$here/make_tiny_model.py" --questions "$out/data/questions" \
    --passages "$passages" --output "$start"
else
  start="${VIQUAE_START_MODEL:?set VIQUAE_START_MODEL to a joint encoder with a CLIP tower (README: ViQuAE)}"
fi

step "3. train on BM25 positives / negatives"
t1=$(seconds)
steps=""; [ -n "${VIQUAE_MAX_STEPS:-}" ] && steps="--max_steps $VIQUAE_MAX_STEPS"
if [ ! -f "$out/model/config.json" ]; then
  if [ "$small" = 1 ]; then
    $VJE viquae-train "$here/train_small.yaml" --model_name_or_path "$start" $data --output_dir "$out/model" $steps
  else
    accelerate launch --multi_gpu --num_processes "${VIQUAE_GPUS:-1}" -m vl_joint_encoder viquae-train \
      "$here/train.yaml" --model_name_or_path "$start" $data --output_dir "$out/model" $steps
  fi
fi

step "4. dense runs: with images, and text only"
t2=$(seconds)
$VJE viquae-search "$here/search$suffix.yaml" $data --model "$out/model" --embeddings "$out/embeddings/dense" \
  --output "$out/runs" --system dense
$VJE viquae-search "$here/search$suffix.yaml" $data --model "$out/model" --embeddings "$out/embeddings/text" \
  --output "$out/runs" --system dense-text-only --text_only
cp "$out/data/runs/bm25.validation.json" "$out/data/runs/bm25.test.json" "$out/runs/"

step "5. fusion tuned on validation (answer-extended qrels), applied to test"
t3=$(seconds)
eval_args="--questions $out/data/questions --passages $passages"
$VJE viquae-evaluate $eval_args --split validation --runs bm25="$out/runs/bm25.validation.json" \
  dense="$out/runs/dense.validation.json" --qrels_output "$out/qrels.validation.extended.json"
for method in wsum rrf; do
  name=fused; norm=gzmuv; [ "$method" = rrf ] && name=fused-rrf && norm=none
  $VJE fuse --runs "$out/runs/bm25.test.json" "$out/runs/dense.test.json" --method "$method" --norm "$norm" \
    --fit_runs "$out/runs/bm25.validation.json" "$out/runs/dense.validation.json" \
    --fit_qrels "$out/qrels.validation.extended.json" --output "$out/runs/$name.test.json"
done

step "6. metric table (test, answer-extended fused qrels)"
$VJE viquae-evaluate $eval_args --split test --output "$out/metrics.json" \
  --qrels_output "$out/qrels.test.extended.json" --runs bm25="$out/runs/bm25.test.json" \
  dense="$out/runs/dense.test.json" dense-text-only="$out/runs/dense-text-only.test.json" \
  fused="$out/runs/fused.test.json" fused-rrf="$out/runs/fused-rrf.test.json"
cp "$out/data/qrels.test.json" "$out/qrels.test.json"
t4=$(seconds)
echo "seconds: prepare $((t1 - t0)), train $((t2 - t1)), dense runs $((t3 - t2)), fusion+evaluation $((t4 - t3))"
echo "-> $out/metrics.json, $out/qrels.test.json"
