# The full profile on the GPU as six processes sharing it; each part's results.json goes to $OUT.
source benchmarks/gpu/setup.sh
export OMP_NUM_THREADS=2
run() { name=$1; shift; timeout 545 python3 benchmarks/minilm_sentiment.py --device cuda --output /tmp/$name "$@" > /tmp/$name.log 2>&1; }
run r07 --ratios 0.7 --ablations & run r05 --ratios 0.5 --ablations & run r03 --ratios 0.3 --ablations &
run a1 --methods --ablations blend=linear T=0.25 & run a2 --methods --ablations distill=0 init=svd &
run a3 --methods --ablations rank_selection=site allocation=global &
wait
for name in r07 r05 r03 a1 a2 a3; do cp /tmp/$name/results.json $OUT/$name.json; grep -v "it/s]\|s/it]" /tmp/$name.log | tail -3; done
nvidia-smi --query-gpu=name,driver_version --format=csv
