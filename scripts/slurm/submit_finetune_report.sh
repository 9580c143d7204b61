#!/usr/bin/env bash
# Submit the fine-tuning array (one task per session of EIDS_FILE), then the report once every task is done.
#   bash scripts/slurm/submit_finetune_report.sh [--dry-run] EIDS_FILE PRETRAINED_RUN [overrides...]
set -euo pipefail
DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
EIDS_FILE="${1:?usage: submit_finetune_report.sh [--dry-run] EIDS_FILE PRETRAINED_RUN [overrides...]}"
PRETRAINED="${2:?usage: submit_finetune_report.sh [--dry-run] EIDS_FILE PRETRAINED_RUN [overrides...]}"
shift 2
N="$(grep -cv '^\s*\(#\|$\)' "$EIDS_FILE")"
METHOD="${METHOD:-finetune_$(basename "$PRETRAINED")}"
here="$(cd "$(dirname "$0")" && pwd)"
array=(sbatch --parsable "--array=1-${N}" --export=ALL,METHOD="${METHOD}" "$here/finetune_array.sbatch" "$EIDS_FILE"
       "$PRETRAINED" "$@")
report=(sbatch --dependency=afterany:JOBID --job-name=ibl_jax_report --time=00:30:00 --output=logs/%x-%j.out
        --wrap "python -m ibl_jax.report --results=results --out=results/report")
if [[ $DRY_RUN == 1 ]]; then
  echo "${array[*]}"
  echo "${report[*]}"
  exit 0
fi
mkdir -p logs
jobid="$("${array[@]}")"
report[1]="--dependency=afterany:${jobid}"
"${report[@]}"
echo "submitted fine-tuning array ${jobid} (${N} sessions) and the report after it"
