#!/usr/bin/env bash
# The smollm2_half recipe: distil the built-in SmolLM2-135M-Instruct into a student with half of
# its non-embedding parameters, on one machine, end to end (docs/benchmarks.md, "Halving the
# built-in teacher"):
#
#   1. clone.yaml   Low-Rank Clone, activation-PCA init, on the built-in general-text corpus;
#                   exports the student as a plain Hugging Face Llama
#   2. paced.yaml   that student, paced forward KL on the teacher's correct answers to
#                   arithmetic problems (the evaluation's items left out); exports the final
#                   student
#   3. lrkd eval    the final student against the teacher on held-out items: arithmetic
#                   pass@1 (lrkd_arithmetic), next-token loss on held-out built-in text
#                   (lrkd_corpus) and on real text it never saw (lrkd_pydoc). The teacher's
#                   scores are read from smollm2-135m-instruct.json beside this script (lm-eval's
#                   results of the same lrkd eval of the teacher; lrkd eval checks that they are
#                   for the same tasks, versions and items): scoring the teacher again takes
#                   5-11 minutes and gives the same numbers (COMPARE=smollm2-135m-instruct does)
#
#   bash configs/recipes/smollm2_half/run.sh                    # writes ./runs/smollm2_half_*
#   STAGE2=two_stage bash configs/recipes/smollm2_half/run.sh   # + on-policy reverse KL
#
# Everything is written under the working directory's runs/ (run it elsewhere to keep runs
# apart; ablations.sh does). Environment:
#   STAGE2=two_stage       stage 2 from two_stage.yaml instead of paced.yaml
#   STAGE1_ARGS="..."      extra arguments of stage 1's lrkd fit, e.g. "--model.loss.clone_weight 0"
#   STAGE2_ARGS="..."      the same for stage 2
#   STAGE1=skip            keep runs/smollm2_half_clone/student from an earlier run
#   STOP_AFTER=1           stop after stage 1 (its held-out losses are in its TensorBoard log)
#   COMPARE=smollm2-135m-instruct   score the teacher again in stage 3 (default: its saved
#                          scores, smollm2-135m-instruct.json); COMPARE=none: no teacher
#   SEED=S                 seed S for every random choice: --seed_everything, the data seed
#                          (the corpus sample and its order; the problems, their split, order
#                          and rollouts), stage 1's normal-init seed and stage 2's on-policy
#                          sampling seed. Each of these has its own seed in the configs (0), so
#                          --seed_everything alone changes nothing in this recipe.
# Extra arguments go to both lrkd fit commands. Needs the eval extra:
# pip install -c constraints.txt -e '.[eval]'.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
stage2=${STAGE2:-paced}
compare=${COMPARE:-$here/smollm2-135m-instruct.json}
read -r -a stage1_args <<< "${STAGE1_ARGS:-}"
read -r -a stage2_args <<< "${STAGE2_ARGS:-}"
seed1_args=() seed2_args=()
if [ -n "${SEED:-}" ]; then
  seed1_args=(--seed_everything "$SEED" --data.init_args.seed "$SEED"
    --model.student.init_args.seed "$SEED")
  seed2_args=(--seed_everything "$SEED" --data.init_args.seed "$SEED" --model.on_policy.seed "$SEED")
fi
t0=$SECONDS
report=()
stage() {
  local name=$1 t=$SECONDS
  shift
  echo "=== $name: $* ==="
  "$@"
  report+=("$(printf '%-28s %5d s' "$name" $((SECONDS - t)))")
}
finish() {
  echo "=== smollm2_half: stage times ==="
  printf '%s\n' "${report[@]}"
  printf '%-28s %5d s\n' "total" $((SECONDS - t0))
}

if [ "${STAGE1:-}" = skip ]; then
  [ -f runs/smollm2_half_clone/student/config.json ] || {
    echo "run.sh: STAGE1=skip needs runs/smollm2_half_clone/student in $PWD" >&2
    exit 2
  }
else
  stage "1 low-rank clone" lrkd fit --config "$here/clone.yaml" "${seed1_args[@]}" "${stage1_args[@]}" \
    "$@"
fi
if [ "${STOP_AFTER:-}" = 1 ]; then
  finish
  exit 0
fi
stage "2 $stage2 distillation" lrkd fit --config "$here/$stage2.yaml" "${seed2_args[@]}" \
  "${stage2_args[@]}" "$@"
compare_args=()
[ "$compare" != none ] && compare_args=(--compare "$compare")
stage "3 evaluation" lrkd eval --model runs/smollm2_half_paced/student "${compare_args[@]}" \
  --tasks lrkd_arithmetic,lrkd_corpus,lrkd_pydoc --output_path runs/smollm2_half_eval
finish
echo "student: runs/smollm2_half_paced/student (loads with AutoModelForCausalLM.from_pretrained)"
