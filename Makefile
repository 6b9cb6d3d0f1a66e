# Fresh machine: `make run` / `make test` create .venv and install what they need.
# torch is pinned through constraints.txt so no dependency can pull a newer CUDA build.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: install run demo test test-fast test-numerics bench bench-compare clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install            ## the main job: the embedded-default comparison (trains, samples, measures)
	$(PY) ablations/run.py

demo: install           ## seconds: random tiny models through every sampler
	$(PY) -m d2c.demo

test: install           ## the whole suite, slow tests included (CI runs this)
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# the numerical tests again on other float rounding: PyTorch's plain kernels, one thread
NUMERIC_TESTS = tests/test_mar.py tests/test_mar_sampler.py tests/test_diffusion.py tests/test_gpt.py tests/test_kernels.py \
                tests/test_tokenizers.py tests/test_api.py tests/test_sampling.py tests/test_train.py
test-numerics: install
	ATEN_CPU_CAPABILITY=default D2C_TEST_THREADS=1 $(PY) -m pytest -q -m "not slow" $(NUMERIC_TESTS)

bench: install         ## saves the run's JSON under .benchmarks/ (pytest-benchmark autosave)
	$(PY) -m pytest bench/ --benchmark-only --benchmark-autosave

bench-compare: install ## runs again and compares with the last saved run (medians, min, max)
	$(PY) -m pytest bench/ --benchmark-only --benchmark-autosave --benchmark-compare \
	    --benchmark-columns=min,median,max,rounds

clean:
	rm -rf $(VENV) outputs .pytest_cache
