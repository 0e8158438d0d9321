#!/bin/bash
# Queues the fold array, then the merge as a job that waits for all of it.
set -euo pipefail
# Run from the folder that should hold shards/ and kfold.json.
here=$(dirname "$0")
mkdir -p shards
array=$(sbatch --parsable "$here/kfold.sbatch")
sbatch --dependency="afterok:${array}" "$here/merge.sbatch"
echo "folds: job ${array}; the merge starts when all of them succeed"
