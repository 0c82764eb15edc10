source benchmarks/gpu/setup.sh
export OMP_NUM_THREADS=2
run() { name=$1; shift; timeout 400 python3 benchmarks/minilm_sentiment.py --device cuda --methods --output /tmp/$name "$@" > /tmp/$name.log 2>&1; }
run s07 --ablations rank_slack=0 --ablation-ratios 0.7 & run s05 --ablations rank_slack=0 --ablation-ratios 0.5 &
run s03 --ablations rank_slack=0 --ablation-ratios 0.3 & run sT --ablations rank_slack=0,T=0.25 --ablation-ratios 0.7 &
run t01 --ablations T=0.1 --ablation-ratios 0.7 & run seed --ablations seed=1 --ablation-ratios 0.7 &
wait
for name in s07 s05 s03 sT t01 seed; do cp /tmp/$name/results.json $OUT/$name.json; grep '^{' /tmp/$name.log | cut -c1-90; done
