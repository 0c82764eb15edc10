# After full_profile.sh, on the GPU's full profile: the heads-only form at 0.7 (joint against the sequential
# pipelines on the same structure, seeds 0 and 1) and the main methods at seeds 1 and 2, the questions the
# CPU quick profile left open (README "Heads only"). Six processes share the GPU; each results.json goes to $OUT.
# Not run yet: no GPU was lent between writing it and the session's end.
source benchmarks/gpu/setup.sh
export OMP_NUM_THREADS=2
run() { name=$1; shift; timeout 545 python3 benchmarks/minilm_sentiment.py --device cuda --output /tmp/$name "$@" > /tmp/$name.log 2>&1; }
heads=(--methods --ablations prune_heads=0.5 --ablation-ratios 0.7)
heads_sequential=(--methods ft_c_ft c_ft --ratios 0.7 --ablations --form prune_heads=0.5)
main=(--methods joint ft_c_ft c_ft --ratios 0.7 0.5 --ablations)
run heads "${heads[@]}" & run heads_seq "${heads_sequential[@]}" &
run heads_s1 --seed 1 "${heads[@]}" & run heads_seq_s1 --seed 1 "${heads_sequential[@]}" &
run main_s1 --seed 1 "${main[@]}" & run main_s2 --seed 2 "${main[@]}" &
wait
for name in heads heads_seq heads_s1 heads_seq_s1 main_s1 main_s2; do cp /tmp/$name/results.json $OUT/$name.json; grep -v "it/s]\|s/it]" /tmp/$name.log | tail -3; done
