#!/usr/bin/env bash
# bash launch/quickstart.sh [--sdxl]
#
# The embedded default, on a fresh 2-core CPU machine in under 20 minutes:
#   1. installs torch 2.13.0 (CPU) and this package with [dev] (skipped when already done for this pyproject)
#   2. builds the toy illustration world and its tiny components (cached in runs/toy/)
#   3. caches its VAE latents and the Gemma features of 4 caption variants per image once, on 2 ranks
#      (data/cache_latents.py -> runs/toy/cache_lu/; skipped when its manifest is there)
#   4. trains the tiny Lumina-2 on that cache with real DeepSpeed on 2 CPU ranks: launch/train_lu.sh
#      configs/toy_lu.yaml (exports a checkpoint every few steps into runs/toy_lu/ckpt/)
#   5. runs eval/char_recall.py over every exported checkpoint, prints and plots recall vs samples seen
# --sdxl also caches the SDXL VAE latents and frozen CLIP features of 4 caption variants per image once
# (runs/toy/cache_sdxl/), trains configs/toy_sdxl.yaml on them and puts both curves on one plot.
# Everything lands under runs/ (W&B offline files too); re-runs reuse the world, the components, finished
# training runs (the trainer resumes from its last checkpoint) and already generated eval images.
set -euo pipefail
cd "$(dirname "$0")/.."

SDXL=0
for arg in "$@"; do
  case "$arg" in
    --sdxl) SDXL=1 ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "quickstart.sh: unknown argument '$arg' (use --sdxl or --help)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
export DS_ACCELERATOR=cpu            # DeepSpeed on CPU: gloo process group, one rank per core
export OMP_NUM_THREADS=1             # 2 ranks x 1 thread = the 2 cores; more threads only contend
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # every component is local; nothing downloads
export WANDB_MODE="${WANDB_MODE:-offline}"
mkdir -p runs
START=$(date +%s)
stage() { echo; echo "==== [$(( $(date +%s) - START ))s] $*"; }

stage "1/5 install"
STAMP=runs/.installed
WANT="torch==2.13.0 $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$PY" -m pip install torch==2.13.0
  "$PY" -m pip install -e ".[dev]"
  echo "$WANT" > "$STAMP"
else
  echo "already installed for this pyproject.toml ($STAMP)"
fi

stage "2/5 toy world and tiny components (cached in runs/toy)"
WORLD_ARGS=(--out runs/toy --seed 0 --threads 2)
[ "$SDXL" = 1 ] && WORLD_ARGS+=(--sdxl)
"$PY" data/make_toy_world.py "${WORLD_ARGS[@]}"

# cache_once CONFIG DIR: the latents and the text features of 4 caption variants of every world image, as
# CONFIG's family encodes them, on 2 ranks into DIR; skipped when DIR/manifest.json exists (resumable: a
# killed run keeps its finished shards and a re-run does only the rest)
cache_once() {
  if [ -f "$2/manifest.json" ]; then
    echo "already cached: $2/manifest.json"
  else
    "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 data/cache_latents.py "$1" "$2" \
      --text-embeds --caption-variants 4 --threads 1 \
      --override data.cached_latents=false --override 'data.shards=[runs/toy/shards/toy-*.tar]'
  fi
}

stage "3/5 cached latents and text features (runs/toy/cache_lu, made once)"
CACHE=runs/toy/cache_lu
cache_once configs/toy_lu.yaml "$CACHE"
CACHE_SDXL=runs/toy/cache_sdxl
if [ "$SDXL" = 1 ]; then
  stage "3b/5 cached SDXL latents and CLIP features ($CACHE_SDXL, made once)"
  cache_once configs/toy_sdxl.yaml "$CACHE_SDXL"
fi

stage "4/5 training the tiny Lumina-2 on the cache with DeepSpeed on 2 CPU ranks"
deepspeed --num_gpus 2 launch/train_lu.sh configs/toy_lu.yaml
RUNS=(runs/toy_lu)
if [ "$SDXL" = 1 ]; then
  stage "4b/5 training the tiny SDXL on its cache with DeepSpeed on 2 CPU ranks"
  deepspeed --num_gpus 2 launch/train_sdxl.sh configs/toy_sdxl.yaml
  RUNS+=(--compare runs/toy_sdxl)
fi

stage "5/5 character recall of every checkpoint"
"$PY" eval/char_recall.py "${RUNS[@]}" \
  --characters runs/toy/characters.csv --tagger runs/toy/components/tagger \
  --sizes 64x64,96x96 --seeds 0,1 --threads 2 --out runs/toy_eval --wandb "$WANDB_MODE"
"$PY" -m lumina_illus.toyworld.summary runs/toy_eval/curve.json

stage "done in $(( $(date +%s) - START ))s. Where to look:"
cat <<EOF
  runs/toy_eval/report.html     open it: curves by frequency bucket, each character's training image
                                beside what the first, middle and last checkpoint drew
  runs/toy_eval/curve.png       recall vs image samples seen (one line per run)
  runs/toy_eval/curve.json      the same numbers; per-checkpoint details in runs/toy_eval/<run>/
  runs/toy_eval/cache/          every generated image, tagged
  runs/toy_lu/log.jsonl         training log (loss, lr, grad norm, tokens/s, MFU); config.yaml beside it
  runs/toy_lu/ckpt/             exported checkpoints (original/diffusers/comfy layouts, EMA in ema/)
  runs/toy/                     the world: shards/, characters.csv, components/ (VAE, Gemma-2, tagger), world.json,
                                cache_lu/ (its latents and caption features, what toy_lu trains on;
                                cache_sdxl/ the same for toy_sdxl with --sdxl)
  runs/toy_lu/wandb/            W&B offline run (wandb sync runs/toy_lu/wandb/offline-run-*); eval: runs/toy_eval/
EOF
