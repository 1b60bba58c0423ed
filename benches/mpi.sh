#!/usr/bin/env bash
# The MPI backend against the local process backend at equal workers, in one
# sitting: W1 (items/s), W2 (efficiency), a job's fixed cost (new pool + first
# result) and the word count. Needs Open MPI; run from the project root.
# Usage: benches/mpi.sh [WORKERS]   (default 2)
set -euo pipefail
workers=${1:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
cargo build --release --features mpi --example mpi_bench --example wordcount >/dev/null
bench=target/release/examples/mpi_bench
wc=target/release/examples/wordcount
echo "# workload backend workers median_s value"
"$bench" "$workers"
for ranks in 1 2 3; do
    mpirun -n "$ranks" --bind-to none "$bench" "$workers"
done
# The word count: median of three, whole process (MPI start included for mpirun).
median() { sort -n | sed -n 2p; }
time_of() {
    local s e
    s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N)
    local ms=$(( (e - s) / 1000000 ))
    printf '%d.%03d\n' $((ms / 1000)) $((ms % 1000))
}
"$wc" --no-progress --top 1 >/dev/null # writes the corpus on first use
t=$(for _ in 1 2 3; do time_of "$wc" --no-progress --top 1 --workers "$workers"; done | median)
echo "wordcount process $workers $t -"
for ranks in 1 2 3; do
    t=$(for _ in 1 2 3; do
        time_of mpirun -n "$ranks" --bind-to none "$wc" --no-progress --top 1 --workers "$workers"
    done | median)
    echo "wordcount mpi-$ranks $workers $t -"
done
