#!/usr/bin/env bash
# Regenerates every quality figure and plot of BENCHMARKS.md "Paper tables on the default data" (and the CLIP-CID
# tables of README.md): one command, 72 min 33 s on 2 CPU cores when measured.
#   0. the default run (the README's main job): detector, base CLIP, DCLIP teacher, DCLIP student, evaluated;
#   1. students distilled from that run's base CLIP and teacher, 300 steps each, evaluated on the same 1,000 test
#      scenes: without a teacher (contrastive only), CLIP-CID (cluster + instance), DCLIP + CLIP-CID, instance only,
#      cluster + instance at K = 16 and 256;
#   2. image semantic balance on the scenes with 40% injected redundancy (10% exact copies, 15% jittered re-renders,
#      15% repeats of three popular concepts): DCLIP students on the full set and on the sets kept at two thresholds;
#   3. benchmarks/paper_tables.py: results.json, the tables in BENCHMARKS.md and the plots in benchmarks/figures/.
# REUSE_DEFAULT=1 skips step 0 and reuses $DEFAULT.
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT=${DEFAULT:-outputs/default}
OUT=${OUT:-outputs/paper_tables}
REDUNDANCY="--exact_duplicate_fraction 0.1 --near_duplicate_fraction 0.15 --concept_fraction 0.15"
# the small CLIP's image embeddings of these scenes are tightly packed: nearest neighbours of distinct originals sit
# at cosine ~0.9994 (median), exact copies at 1.0, so the thresholds sit close to 1
DUPLICATE="--duplicate_threshold 0.99999"

if [ -z "${REUSE_DEFAULT:-}" ]; then
  rm -rf "$DEFAULT"
  accelerate launch examples/train.py --output_dir "$DEFAULT"
fi

from_default() {  # a run folder holding the default run's base CLIP, teacher, processor and detector
  rm -rf "$1" && mkdir -p "$1" && cp -r "$DEFAULT"/{base_clip,teacher,processor,detector} "$1"/
}
student() {  # output_dir, extra arguments...: distil a student, then evaluate it
  local dir=$1; shift
  from_default "$dir"
  python examples/train.py --output_dir "$dir" --stage distill "$@"
  python examples/train.py --output_dir "$dir" --stage evaluate --eval_models student "$@"
}

student "$OUT/no_teacher" --cosine_image_weight 0 --cosine_text_weight 0
student "$OUT/clip_cid" --method clip_cid
student "$OUT/dclip_clip_cid" --method dclip+clip_cid
student "$OUT/instance_only" --method clip_cid --cluster_image_weight 0 --cluster_text_weight 0
for k in 16 256; do
  student "$OUT/clip_cid_k$k" --method clip_cid --num_clusters $k
done

student "$OUT/redundant_full" $REDUNDANCY
for threshold in 0.9999 0.9998; do
  python examples/curate.py --model_name_or_path "$DEFAULT/base_clip/final" $REDUNDANCY $DUPLICATE \
    --semantic_threshold $threshold --output_dir "$OUT/curated_$threshold"
  student "$OUT/redundant_balanced_$threshold" $REDUNDANCY --train_indices "$OUT/curated_$threshold/kept_indices.npy"
done

python benchmarks/paper_tables.py --default "$DEFAULT" --runs "$OUT" --write BENCHMARKS.md --seconds "$SECONDS"
