#!/usr/bin/env bash
# `make demo`: train a small bottom-up multi-scale LM on the shipped corpus (Python 3.11 docs), report
# validation and test perplexity with fairseq-eval-lm, and sample a continuation with fairseq-interactive.
# Re-running resumes from checkpoints/demo/checkpoint_last.pt (fairseq's own resume).
set -euo pipefail
cd "$(dirname "$0")/../.."

DATA=data-bin/pydoc
SAVE_DIR=${SAVE_DIR:-checkpoints/demo}
UPDATES=${DEMO_UPDATES:-1000}
PROMPT=${PROMPT:-"The built-in function"}
DEVICE=--cpu
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" && DEVICE=""
COMMON=(--user-dir fairseq_msformer --task multiscale_language_modeling $DEVICE)

echo "== fairseq-train: msformer_lm_bottom_up_tiny, $UPDATES updates (adaptive input + adaptive softmax)"
fairseq-train "$DATA" "${COMMON[@]}" \
  --arch msformer_lm_bottom_up_tiny --tokens-per-sample 128 \
  --adaptive-input --adaptive-input-cutoff 2000,6000 --adaptive-softmax-cutoff 2000,6000 --tie-adaptive-weights \
  --criterion adaptive_loss --ddp-backend legacy_ddp \
  --optimizer adam --adam-betas '(0.9, 0.98)' --clip-norm 1.0 --lr 3e-3 \
  --lr-scheduler inverse_sqrt --warmup-updates 100 --warmup-init-lr 1e-5 \
  --max-tokens 2048 --max-update "$UPDATES" --num-workers 0 --seed 1 \
  --save-dir "$SAVE_DIR" --no-epoch-checkpoints --save-interval-updates 250 --keep-interval-updates 1 \
  --log-format tqdm --log-interval 25

for split in valid test; do
  echo "== fairseq-eval-lm on $split (--context-window 64)"
  fairseq-eval-lm "$DATA" "${COMMON[@]}" --path "$SAVE_DIR/checkpoint_last.pt" --gen-subset "$split" \
    --tokens-per-sample 128 --context-window 64 --max-tokens 4096 --num-workers 0 2>&1 | grep -E "Loss|Evaluated"
done

echo "== fairseq-interactive: sampling a continuation of \"$PROMPT\""
echo "$PROMPT" | fairseq-interactive "$DATA" "${COMMON[@]}" --path "$SAVE_DIR/checkpoint_last.pt" \
  --tokenizer moses --moses-no-escape --sampling --sampling-topk 20 --beam 1 --max-len-b 40 --seed 7 2>/dev/null | grep -E "^D-"
