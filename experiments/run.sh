#!/usr/bin/env bash
# bash experiments/run.sh q1|q2|q3 [--quick]
#
# The seed's three questions (../shared/seeds/illustrious-lu-v0.03.md) on the toy world, one command each.
# Each first runs the quickstart (cached: the world, its components and finished runs are reused), then:
#   q1  does the model absorb character knowledge without training the LLM?  trains runs/toy_lu_te
#       (configs/toy_lu.yaml with Gemma-2 trainable, its own LR) and puts its curve beside the frozen
#       runs/toy_lu: recall vs samples seen                         -> runs/exp_q1/curve.png, report.html
#   q2  does Lumina-2 adapt faster than SDXL?  the quickstart with --sdxl, SDXL also for 1600 steps
#       (runs/toy_sdxl_1600), then the curves against samples seen, training compute (model FLOPs) and
#       wall-clock                                                   -> runs/exp_q2/curve{,_flops,_hours}.png
#   q3  is the resolution arbitrary?  runs/toy_lu's checkpoints drawn at sizes and aspect ratios outside
#       the 64-128 px it trained on (48, 160, 192 px; 1:2, 2:1, 1:3): recall and colour statistics per
#       size, one line per size                                      -> runs/exp_q3/curve_sizes.png
# --quick: the extra run of q1/q2 trains 300 steps, not the config's (a smoke run of the wiring, not an answer).
# Results are summarised in experiments/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
Q="${1:-}"
QUICK=()
[ "${2:-}" = "--quick" ] && QUICK=(--override train.max_steps=300 checkpoint.export_every_steps=100)
case "$Q" in
  q1|q2|q3) ;;
  -h|--help|"") sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; [ -n "$Q" ]; exit $? ;;
  *) echo "experiments/run.sh: unknown question '$Q' (q1, q2 or q3)" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}"
EVAL=(--characters runs/toy/characters.csv --tagger runs/toy/components/tagger --seeds 0,1 --threads 2
      --wandb "$WANDB_MODE" --quiet)

if [ "$Q" = q2 ]; then bash launch/quickstart.sh --sdxl; else bash launch/quickstart.sh; fi

case "$Q" in
  q1)
    deepspeed --num_gpus 2 launch/train_lu.sh configs/toy_lu.yaml --override run.name=toy_lu_te \
      model.text_encoder.trainable=true model.text_encoder.lr=3.0e-4 "${QUICK[@]:1}"
    "$PY" eval/char_recall.py runs/toy_lu --compare runs/toy_lu_te "${EVAL[@]}" --sizes 64x64,96x96 \
      --out runs/exp_q1 --cache runs/toy_eval/cache ;;
  q2)
    # SDXL as long as Lumina-2 (1600 steps, 51.2k samples): the curves then meet every budget
    deepspeed --num_gpus 2 launch/train_sdxl.sh configs/toy_sdxl.yaml --override run.name=toy_sdxl_1600 \
      train.max_steps=1600 "${QUICK[@]:1}"
    for x in samples flops hours; do
      "$PY" eval/char_recall.py runs/toy_lu --compare runs/toy_sdxl runs/toy_sdxl_1600 "${EVAL[@]}" \
        --sizes 64x64,96x96 --out runs/exp_q2 --cache runs/toy_eval/cache --x "$x"
    done ;;
  q3)
    "$PY" eval/char_recall.py runs/toy_lu "${EVAL[@]}" --per-size --out runs/exp_q3 --cache runs/toy_eval/cache \
      --sizes 48x48,64x64,96x96,128x128,160x160,192x192,64x128,128x64,64x192 ;;
esac
"$PY" -m lumina_illus.toyworld.summary "runs/exp_$Q/curve.json"
echo "results: runs/exp_$Q/ (curve*.png, report.html, curve.json)"
