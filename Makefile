# Two commands do all the set-up on a fresh machine:
#   make demo   - the main job: joint fine-tuning + compression of MiniLM on Rotten Tomatoes, ONNX model in out/demo
#   make test   - the test suite on a worker per core, at most 2 (each holds models in memory),
#                 a whole test file to each so that module fixtures build once, and one BLAS
#                 thread apiece: threaded kernels stall when the cores are busy
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install
install: $(STAMP)

# --no-cache-dir: torch's CUDA build and its libraries take about 6 GB in the venv; pip's cache
# would write what it downloads a second time, on machines whose disks can be nearly full.
$(STAMP): pyproject.toml requirements-nodeps.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --no-cache-dir -e '.[dev]'
	$(PY) -m pip install -q --no-cache-dir --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m tunecomp_fx.demo

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --maxprocesses 2 --dist loadfile
