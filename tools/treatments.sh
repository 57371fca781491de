#!/usr/bin/env bash
# The treatments' training runs (issue 54): start each, or resume it from its newest resumable checkpoint, in the
# background, in ~/anml_runs/NAME (outside the repository; NAME.out beside it holds the progress), one thread each
# unless THREADS says otherwise (a run alone on the 2-core machine: THREADS=2).
#   bash tools/treatments.sh            # start or resume every run below
#   bash tools/treatments.sh status     # each run's last logged iteration, and whether it is running
#   bash tools/treatments.sh keep       # copy each run's training log into trained_anmls/treatments/, to commit
# Stop the runs with Ctrl-C's signal, which saves first: pkill -INT -f 'train_omni.py'
set -euo pipefail
cd "$(dirname "$0")/.."
runs=~/anml_runs
export OMNIGLOT_ROOT=${OMNIGLOT_ROOT:-$PWD/../shared/omniglot}
export OMP_NUM_THREADS=${THREADS:-1}
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )

# NAME and the flags of its new run (docs/treatments.md says where each recipe comes from).
declare -A RUNS=(
    [sanml_seed_1]="--treatment sanml --outer-lr 0.001 --seed 1"
    [oml_seed_1]="--treatment oml --inner-lr 0.03 --outer-lr 0.0001 --epochs 25000 --seed 1"
    [pretrain_seed_1]="--treatment pretrain --outer-lr 0.001 --seed 1"
)

running() {  # NAME: whether a train_omni.py trains into that run's folder
    pgrep -f -- "$runs/$1( |/|\$)" > /dev/null
}

case "${1:-start}" in
status)
    for name in "${!RUNS[@]}"; do
        log=$runs/$name/training_log.csv
        echo "$name: $( [ -f "$log" ] && tail -n 1 "$log" | cut -d, -f1 || echo none) (last iteration logged)," \
             "$(running "$name" && echo running || echo stopped)"
    done ;;
keep)
    mkdir -p trained_anmls/treatments
    for name in "${!RUNS[@]}"; do
        cp "$runs/$name/training_log.csv" "trained_anmls/treatments/${name}_training_log.csv"
    done ;;
start)
    mkdir -p "$runs"
    for name in "${!RUNS[@]}"; do
        dir=$runs/$name
        if running "$name"; then
            echo "$name: already running"
        elif ls "$dir"/*.state.pth > /dev/null 2>&1; then
            nohup "$python" train_omni.py --resume "$dir" -d cpu >> "$dir.out" 2>&1 &
            echo "$name: resumed"
        else  # ${RUNS[$name]} unquoted: its words are the flags
            # shellcheck disable=SC2086
            nohup "$python" train_omni.py ${RUNS[$name]} --out-dir "$dir" -d cpu >> "$dir.out" 2>&1 &
            echo "$name: new run"
        fi
    done ;;
*)
    echo "usage: bash tools/treatments.sh [start|status|keep]" >&2
    exit 2 ;;
esac
