#!/usr/bin/env bash
# make demo: the main job on the embedded default model, end to end (see README).
# Every step is a CLI a user would run; outputs land in build/demo/. Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")"
# Knobs (the defaults are what `make demo` runs; tests/test_demo_smoke.py sets them):
#   BIN    where the clap-* commands and python live   MODEL  the model directory to export
#   OUT    the output directory                          SIZE   clap-corpus --size (tiny: CI)
BIN=${BIN:-.venv/bin}
OUT=${OUT:-build/demo}
MODEL=${MODEL:-models/default}
SIZE=${SIZE:-small}
mkdir -p "$OUT"
step() { printf '\n\033[1m== %s ==\033[0m\n' "$*"; }
t0=$(date +%s)

step "1/5 a held-out styled-speech set (espeak-ng; test sentences and voices unseen in training)"
$BIN/clap-corpus "$OUT/corpus" --size "$SIZE" --seed 7 --force

step "2/5 clap-export $MODEL --int8 (calibrated on that set, accuracy checked on its test split)"
# --max-drop 0.05: the demo's test split is small (tens of clips), so a task metric moves by
# a few points when one clip flips; the default budget (0.005) is for real held-out sets.
$BIN/clap-export "$MODEL" -o "$OUT/default-int8" --int8 --calib "$OUT/corpus" --max-drop 0.05 --force

step "3/5 clap-tag: predicted vs true attributes on a few test clips"
mapfile -t CLIPS < <($BIN/python -m clapedge.train.demo pick "$OUT/corpus" -n 6)
$BIN/clap-tag "$OUT/default-int8" "${CLIPS[@]}" --bank arousal --bank sex --bank voice_quality -k 1 --json \
  | $BIN/python -m clapedge.train.demo tags "$OUT/corpus"

step "4/5 clap-index the set, then clap-search three descriptions"
rm -rf "$OUT/index"
$BIN/clap-index add "$OUT/index" --bundle "$OUT/default-int8" "$OUT/corpus/wavs"
for q in "a woman whispering" "a calm, slow, low-pitched male voice" "a loud, fast, excited female speaker"; do
  $BIN/clap-search "$OUT/index" "$q" -k 5 --json | $BIN/python -m clapedge.train.demo search "$OUT/corpus"
done

step "5/5 clap-stream over one file (low, then mid, then high arousal clips)"
$BIN/python -m clapedge.train.demo concat "$OUT/corpus" "$OUT/arousal-ramp.wav"
$BIN/clap-stream "$OUT/default-int8" "$OUT/arousal-ramp.wav" --window 2 --hop 1 --bank arousal -k 1 --speed 0 \
  | $BIN/python -m clapedge.train.demo stream

step "done in $(( $(date +%s) - t0 )) s"
cat <<TXT
  corpus         $OUT/corpus (manifest.jsonl: paths, attributes, captions)
  INT8 bundle    $OUT/default-int8 (manifest.json, export_report.json)
  index          $OUT/index
  stream input   $OUT/arousal-ramp.wav
TXT
