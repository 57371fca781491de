#!/usr/bin/env bash
# The recipe study (issue 13): start, or resume from its newest checkpoint, each run in the background, one
# thread each, in ~/anml_runs/NAME (outside the repository; NAME.out beside it holds the progress).
#   bash tools/study.sh            # start or resume every run below
# Stop a run with Ctrl-C's signal, which saves first: pkill -INT -f 'train_omni.py'
set -euo pipefail
cd "$(dirname "$0")/.."
runs=~/anml_runs
export OMNIGLOT_ROOT=${OMNIGLOT_ROOT:-$PWD/../shared/omniglot} OMP_NUM_THREADS=1
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )

start() {  # NAME, then the recipe's flags
    local name=$1 dir=$runs/$1; shift
    local newest
    newest=$(ls "$dir"/*_ANML-*.state.pth 2>/dev/null | sed 's/.*ANML-\([0-9]*\)\.state\.pth/\1 &/' | sort -n | tail -1 |
             cut -d' ' -f2 || true)
    if [ -n "$newest" ]; then
        nohup "$python" train_omni.py --resume "${newest%.state.pth}.pth" -d cpu >> "$dir.out" 2>&1 &
    else
        mkdir -p "$runs"
        nohup "$python" train_omni.py "$@" --out-dir "$dir" -d cpu > "$dir.out" 2>&1 &
    fi
    echo "$name: ${newest:-new run}"
}

start A_outer_lr_0.001 --outer-lr 0.001 --seed 1
start C_outer_lr_0.001_kaiming --outer-lr 0.001 --seed 1 --conv-init kaiming
