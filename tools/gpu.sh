#!/usr/bin/env bash
# The procedure on a lent GPU machine (it has PyTorch, but not higher and not Omniglot, and no network).
#
#   here:  bash tools/gpu.sh prepare
#          .carry/ (git-ignored): the higher wheel and Omniglot zipped, 17 MB; name .carry in the run's `carry`
#   there: bash tools/gpu.sh STEP [STEP ...]
#          the steps in the order given, each into $OUT/STEP.txt, the card named in card.txt, all of them inside
#          $SECONDS_LEFT seconds (default 540): a step gets what its own limit allows of the time left, and once the
#          time is spent the remaining steps are skipped, so put first what matters most. The steps:
#            tests      the CUDA tests
#            benchmark  benchmarks/meta_step.py: plain loop, eager step and graph
#            timing     train_omni.py timed end to end over 100 and 2,000 iterations
#            together   train_omni.py --seed 1 2 3 4 (four runs, a stream each) against one run, end to end
#            variants   benchmarks/step_variants.py (candidate changes to the step, timed as graphs, kernels counted;
#                       the costliest kernels of today's replay by name)
#            best       after variants: the timing of `timing` with the candidate that replayed fastest there in
#                       place (benchmarks/train_variant.py), its log as best_log.csv
#            batched    benchmarks/batched_runs.py (several runs batched into one network)
#            streams    benchmarks/concurrent_runs.py (several runs' graphs at once), then again without a cuBLAS
#                       workspace
#            checks     tests, benchmark and timing
#   there: bash tools/gpu.sh train [train_omni.py flags]
#          starts, or resumes from its newest checkpoint, a run in runs/gpu for at most $SECONDS_LEFT seconds
#          (default 540), then copies the newest weights (24 MB, in 15 MB parts: a call brings back 16 MiB a
#          file; here, join them with `cat NAME.part* > NAME`), the log and the curve into $OUT. Files stay on the
#          machine only while it is warm (30 s after a call): call it again at once to go on.
#   there: bash tools/gpu.sh state
#          right after `train`: the newest checkpoint's state file (48 MB, more than a call brings back beside the
#          weights) into $OUT in 15 MB parts, so that the run can go on here:
#          cat NAME.pth.part* > DIR/NAME.pth; cat NAME.state.pth.part* > DIR/NAME.state.pth; copy the log into DIR;
#          python train_omni.py --resume DIR
set -euo pipefail
cd "$(dirname "$0")/.."

setup() {
    python3 -m pip install -q --no-index --no-deps .carry/higher-*.whl
    [ -d data/omniglot-py ] || python3 -m zipfile -e .carry/omniglot.zip data/
    export OMNIGLOT_ROOT=$PWD/data
    python3 -c "import datasets; datasets.load_split(datasets.find_root(), 'images_background')"  # decoded once
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/card.txt"
}

newest() {  # the checkpoint of runs/gpu's newest resumable save
    python3 -c "import checkpoints; print(checkpoints.newest_resumable('runs/gpu'))"
}

train=(python3 train_omni.py)  # what timed_run runs (the best step runs a candidate in its place)

timed_run() {  # iterations, out-dir, [flags]: the wall seconds of a whole training run, start-up included
    local start iterations=$1 out=$2
    shift 2
    start=$(date +%s.%N)
    within 200 "${train[@]}" --epochs "$iterations" --out-dir "$out" -d cuda --no-download "$@" > /dev/null \
        2>> "$OUT/timing.txt" ||
        echo "${train[*]} --epochs $iterations $* failed or ran out of time" >> "$OUT/timing.txt"
    python3 -c "import time; print(f'{time.time() - $start:.1f}')"
}

time_training() {  # log, csv: 100 and 2,000 iterations of "${train[@]}" timed, the difference per iteration
    local short long
    rm -rf /tmp/t100 /tmp/t2000
    short=$(timed_run 100 /tmp/t100)
    long=$(timed_run 2000 /tmp/t2000)
    [ -f /tmp/t2000/training_log.csv ] || return 0
    echo "$(cat "$OUT/card.txt"): ${train[*]:1} 100 iterations ${short} s, 2000 iterations ${long} s, so" \
         "$(python3 -c "print(f'{($long - $short) / 1900 * 1000:.1f}')") ms an iteration end to end" | tee -a "$1"
    cp /tmp/t2000/training_log.csv "$2"
}

ends_at=$((SECONDS + ${SECONDS_LEFT:-540}))

within() {  # LIMIT COMMAND...: the command under LIMIT seconds or the time left, whichever is less
    local left=$((ends_at - SECONDS)) limit=$1; shift
    [ "$left" -lt "$limit" ] && limit=$left
    [ "$limit" -ge 10 ] || { echo "skipped for want of time: $*" >&2; return; }
    timeout -k 20 "$limit" "$@"  # SIGTERM, then SIGKILL 20 s on if the command is hung
}

run_step() {  # STEP: one step of the list in the header, its output into $OUT/STEP.txt (a call brings back 8 files)
    local log=$OUT/$1.txt
    case "$1" in
    tests)
        within 240 python3 -m pytest -q --tb=short tests/test_cuda_graph.py 2>&1 | grep -v "meta-train\|decoding" |
            tee "$log" || true ;;
    benchmark)
        within 150 python3 benchmarks/meta_step.py -d cuda --iterations 20 2>&1 | tail -8 | tee "$log" || true ;;
    timing)
        time_training "$log" "$OUT/timing_log.csv" ;;
    together)
        rm -rf /tmp/g1 /tmp/g1l /tmp/g4 /tmp/g4l
        local one one_long four four_long
        one=$(timed_run 100 /tmp/g1); one_long=$(timed_run 1100 /tmp/g1l)
        four=$(timed_run 100 /tmp/g4 --seed 1 2 3 4); four_long=$(timed_run 1100 /tmp/g4l --seed 1 2 3 4)
        [ -f /tmp/g4l/seed_4/training_log.csv ] || return 0
        python3 -c "one, four = ($one_long - $one) / 1000, ($four_long - $four) / 1000
print(f'$(cat "$OUT/card.txt"): train_omni.py end to end, iterations 100-1,099: one run {one * 1000:.1f} ms an '
      f'iteration; --seed 1 2 3 4 {four * 1000:.1f} ms a round of four, {4 * one / four:.2f}x the run-iterations a '
      f'second of one run')" | tee -a "$log" ;;
    variants)
        within 300 python3 benchmarks/step_variants.py -d cuda --iterations 10 2>&1 | tee "$log" || true ;;
    best)
        local variant
        variant=$(sed -n "s/^fastest graph: //p" "$OUT/variants.txt" 2> /dev/null || true)
        if [ -z "$variant" ] || [ "$variant" = today ]; then
            echo "no candidate replayed faster than today's step in variants.txt" | tee "$log"
            return 0
        fi
        local train=(python3 benchmarks/train_variant.py "$variant")  # what timed_run runs, until this step returns
        # Untimed first: it fills Inductor's on-disk caches, which would else speed the second timed run alone.
        rm -rf /tmp/warm; timed_run 5 /tmp/warm > /dev/null
        time_training "$log" "$OUT/best_log.csv" ;;
    batched)
        within 120 python3 benchmarks/batched_runs.py -d cuda --iterations 10 2>&1 | tail -5 | tee "$log" || true ;;
    streams)
        within 120 python3 benchmarks/concurrent_runs.py --watchdog 60 2>&1 | tail -30 | tee "$log" || true
        echo "again with CUBLAS_WORKSPACE_CONFIG=:0:0" | tee -a "$log"
        CUBLAS_WORKSPACE_CONFIG=:0:0 within 120 python3 benchmarks/concurrent_runs.py --watchdog 60 2>&1 | tail -30 |
            tee -a "$log" || true ;;
    checks)
        run_step tests; run_step benchmark; run_step timing ;;
    *)
        sed -n "2,/^set -euo/{/^#/p}" "$0"; exit 2 ;;
    esac
}

case "${1:-}" in
prepare)
    mkdir -p .carry
    grep -qxF ".carry/" .git/info/exclude 2> /dev/null || echo ".carry/" >> .git/info/exclude
    python3 -m pip download -q higher==0.2.1 --no-deps -d .carry
    root=${OMNIGLOT_ROOT:-../shared/omniglot}
    (cd "$root" && python3 -m zipfile -c "$OLDPWD/.carry/omniglot.zip" omniglot-py)
    du -sh .carry ;;
train)
    shift
    setup
    if [ -d runs/gpu ]; then
        set -- --resume runs/gpu "$@"
    else
        set -- --out-dir runs/gpu "$@"
    fi
    timeout -s INT "${SECONDS_LEFT:-540}" python3 train_omni.py -d cuda --no-download "$@" 2>&1 | tail -3 || true
    weights=$(newest)
    split -b 15M -d "$weights" "$OUT/$(basename "$weights").part"
    cp runs/gpu/training_log.csv runs/gpu/training_curve.png runs/gpu/config.json "$OUT/" ;;
state)
    state=$(python3 -c "import checkpoints as c; print(c.state_path(c.newest_resumable('runs/gpu')))")
    split -b 15M -d "$state" "$OUT/$(basename "$state").part" ;;
''|-h|--help)
    sed -n "2,/^set -euo/{/^#/p}" "$0"; exit 2 ;;
*)
    setup
    for step in "$@"; do run_step "$step"; done ;;
esac
