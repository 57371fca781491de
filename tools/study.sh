#!/usr/bin/env bash
# The recipe study (issue 13): start, or resume from its newest checkpoint, each run in the background, the
# cores shared out between the runs (one run on 2 cores: 0.92 s an iteration on earlier machines, 2.3 s on an EPYC
# without AVX-512), in ~/anml_runs/NAME (outside the repository; NAME.out beside it holds the progress).
#   bash tools/study.sh              # start or resume every run below
#   bash tools/study.sh status       # each run's last logged iteration, and whether it is running
#   bash tools/study.sh eval 9999    # meta-test each run's checkpoint of that iteration, side by side (stop the
#                                    # training first): 100 and 600 classes, the rates below, 1 selection and 3
#                                    # reported runs each (the reported runs are the classes and splits of the old
#                                    # model's milestone table); JSON in docs/recipe_study/, output in ~/anml_runs/;
#                                    # run again, it goes on from the runs a stopped evaluation finished. Each
#                                    # run's training log so far is copied beside its JSON, to be committed with it
# Stop a run with Ctrl-C's signal, which saves first: pkill -INT -f 'train_omni.py'
set -euo pipefail
cd "$(dirname "$0")/.."
runs=~/anml_runs
export OMNIGLOT_ROOT=${OMNIGLOT_ROOT:-$PWD/../shared/omniglot}
python=$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )

# Ran to 29,999 (docs/recipe_study/README.md): A_outer_lr_0.001, C_outer_lr_0.001_kaiming (--conv-init kaiming),
# A_outer_lr_0.001_seed_2 (--seed 2), B_outer_lr_0.003_cosine (--outer-lr 0.003 --outer-lr-schedule cosine),
# D_outer_lr_0.0005 (--outer-lr 0.0005) and, last, the run below, a third seed of A's recipe. The study is finished:
# the outer rate's best is 0.001, and the three seeds of that recipe end 0.015 apart at 600 classes. The list keeps
# its last run for `status` and `eval`; resuming it ends at once (train_omni.py says the run is done, in NAME.out).
# For a new run, put its name in RUNS and its recipe's flags in the start line at the end.
RUNS=(A_outer_lr_0.001_seed_3)
RATES=(0.0003 0.0005 0.0008 0.001 0.0012 0.0016 0.002)
share=$(( $(nproc) / ${#RUNS[@]} ))
export OMP_NUM_THREADS=$(( share > 0 ? share : 1 ))

if [ "${1:-}" = eval ]; then
    it=${2:?give the checkpoint iteration to meta-test, e.g. bash tools/study.sh eval 9999}
    mkdir -p docs/recipe_study
    for name in "${RUNS[@]}"; do  # side by side, the output into ~/anml_runs/NAME_eval_IT.out
        # ~/anml_runs has been lost with a replaced machine more than once: the repository keeps the logs
        cp "$runs/$name/training_log.csv" "docs/recipe_study/${name}_training_log.csv"
        "$python" eval_omni.py -m "$runs/$name/256_112_2304_ANML-$it.pth" -c 100 600 -l "${RATES[@]}" -r 3 \
            --select-runs 1 -d cpu --out "docs/recipe_study/${name}_$it.json" --resume \
            >> "$runs/${name}_eval_$it.out" 2>&1 &
    done
    status=0
    for _ in "${RUNS[@]}"; do
        wait -n || status=1
    done
    for name in "${RUNS[@]}"; do
        echo "$name:"; tail -n 4 "$runs/${name}_eval_$it.out"
    done
    exit $status
fi

running() {  # NAME: whether a train_omni.py trains into that run's folder
    pgrep -f -- "$runs/$1( |\$)" > /dev/null
}

if [ "${1:-}" = status ]; then
    for name in "${RUNS[@]}"; do
        log=$runs/$name/training_log.csv
        echo "$name: $( [ -f "$log" ] && tail -n 1 "$log" | cut -d, -f1 || echo none) (last iteration logged)," \
             "$(running "$name" && echo running || echo stopped)"
    done
    exit
fi

start() {  # NAME, then the recipe's flags
    local name=$1 dir=$runs/$1; shift
    if running "$name"; then
        echo "$name: already running"
    elif [ -d "$dir" ]; then
        nohup "$python" train_omni.py --resume "$dir" -d cpu >> "$dir.out" 2>&1 &
        echo "$name: resumed"
    else
        mkdir -p "$runs"
        nohup "$python" train_omni.py "$@" --out-dir "$dir" -d cpu > "$dir.out" 2>&1 &
        echo "$name: new run"
    fi
}

start "${RUNS[0]}" --outer-lr 0.001 --seed 3
