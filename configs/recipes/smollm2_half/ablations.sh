#!/usr/bin/env bash
# Ablations of the smollm2_half recipe (run.sh), each one change from it, each seed in its own
# working directory runs/ablations/NAME/seedS/ (so its runs/ holds only its own stages):
#
#   recipe          the recipe as it is
#   no_clone_loss   stage 1 without the activation clone loss (model.loss.clone_weight 0)
#   normal_init     stage 1 with the paper's N(0, 0.02) projections instead of activation PCA
#   uniform         stage 2 with uniform weights instead of PACED's, and so no pass-rate estimate
#   two_stage       stage 2 from two_stage.yaml: forward KL, then on-policy reverse KL
#
#   bash configs/recipes/smollm2_half/ablations.sh uniform two_stage    # seed 0
#   SEEDS="0 1 2" bash configs/recipes/smollm2_half/ablations.sh no_clone_loss
#   python benchmarks/recipe_ablations.py                              # the table
#
# The stage-1 ablations stop after stage 1 (FULL=1: go on through stages 2 and 3); their score
# is the held-out next-token loss that stage 1's LMEvalCallback logs at its end. The stage-2
# ablations start from the recipe's stage-1 student of the same seed: runs/ablations/recipe/
# seedS/runs/smollm2_half_clone/student, or for seed 0 runs/smollm2_half_clone/student (a run
# of run.sh in this directory); without one they run stage 1 first. None shows the teacher
# (COMPARE=none); run.sh alone shows its saved scores. Each seed is SEED=S to run.sh.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root=$PWD
[ $# -gt 0 ] || { sed -n '2,21p' "$0" >&2; exit 2; }
for name in "$@"; do
  case $name in
    recipe | no_clone_loss | normal_init | uniform | two_stage) ;;
    *) echo "ablations.sh: unknown ablation '$name' (recipe, no_clone_loss, normal_init, uniform, two_stage)" >&2; exit 2 ;;
  esac
done
for name in "$@"; do
  for seed in ${SEEDS:-0}; do
    dir=$root/runs/ablations/$name/seed$seed
    mkdir -p "$dir/runs"
    env_args=(COMPARE=none "SEED=$seed")
    case $name in
      no_clone_loss) env_args+=("STAGE1_ARGS=--model.loss.clone_weight 0") ;;
      normal_init) env_args+=("STAGE1_ARGS=--model.student.init_args.init normal") ;;
      uniform) env_args+=("STAGE2_ARGS=--data.pacing.weighting uniform --data.pacing.estimate_every_n_steps 0") ;;
      two_stage) env_args+=(STAGE2=two_stage) ;;
    esac
    case $name in
      no_clone_loss | normal_init) [ "${FULL:-}" = 1 ] || env_args+=(STOP_AFTER=1) ;;
      uniform | two_stage)
        for base in "$root/runs/ablations/recipe/seed$seed/runs/smollm2_half_clone/student" \
          $([ "$seed" = 0 ] && echo "$root/runs/smollm2_half_clone/student"); do
          if [ -f "$base/config.json" ]; then
            mkdir -p "$dir/runs/smollm2_half_clone"
            ln -sfn "$base" "$dir/runs/smollm2_half_clone/student"
            env_args+=(STAGE1=skip)
            break
          fi
        done ;;
    esac
    echo "=== ablation $name, seed $seed, in $dir: ${env_args[*]} ==="
    (cd "$dir" && env "${env_args[@]}" bash "$here/run.sh") \
      2>&1 | tee "$dir/log.txt"
  done
done
