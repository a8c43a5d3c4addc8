# SparseQA: `make run` (the bundled QA model answers sample questions, then the speed table on the packaged MiniLM;
# `make run MODEL=<artifact or QA checkpoint dir>` answers with that model instead) and `make test`. Both install what
# they need.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
BUILD  := build/native
RUFF   := $(VENV)/bin/ruff
export SPARSEQA_THREADS ?= 2

.PHONY: install run test test-py test-cpp bench bench-full bench-students bench-gpu report lint clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml setup.py CMakeLists.txt $(wildcard scripts/install-system-deps.sh) \
		$(shell find csrc -type f 2>/dev/null)
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	@if [ -x scripts/install-system-deps.sh ]; then scripts/install-system-deps.sh; fi
	$(PIP) install -q --disable-pip-version-check -r requirements.txt
	$(PIP) install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	@if [ -f $(BUILD)/NATIVE-NOT-BUILT.txt ]; then cat $(BUILD)/NATIVE-NOT-BUILT.txt >&2; fi
	@touch $(STAMP)

run: install
	$(PY) -m engine.demo $(if $(MODEL),--model $(MODEL),)

test: test-py test-cpp

test-py: install
	$(PY) -m pytest -q tests

# Without a native build ctest is skipped with a notice, or fails under SPARSEQA_REQUIRE_NATIVE=1 (as in CI).
test-cpp: install
	@if [ -f $(BUILD)/CTestTestfile.cmake ]; then cd $(BUILD) && ctest --output-on-failure; \
	elif [ "$$SPARSEQA_REQUIRE_NATIVE" = 1 ]; then \
		echo "error: no C++ build in $(BUILD); see why: $(PY) setup.py build_ext --inplace" >&2; exit 1; \
	else echo "notice: C++ build not present, ctest skipped"; fi

# ruff (version pinned in requirements.txt) is all lint needs, so it installs only that.
$(RUFF): requirements.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$$(grep -E '^ruff==' requirements.txt)"
	@touch $(RUFF)

lint: $(RUFF)
	$(RUFF) check .
	$(RUFF) format --check .

bench: install
	SPARSEQA_WORKLOAD_LIMIT=$${SPARSEQA_WORKLOAD_LIMIT:-400} $(PY) -m pytest bench/test_cpu_latency.py -q \
		--benchmark-json=bench/results/cpu.json -p no:cacheprovider
	$(PY) -m pytest bench/test_precision.py -q --benchmark-json=bench/results/precision.json -p no:cacheprovider
	SPARSEQA_WORKLOAD_LIMIT=$${SPARSEQA_WORKLOAD_LIMIT:-400} $(PY) -m pytest bench/test_workload.py -q \
		--benchmark-json=bench/results/workload.json -p no:cacheprovider
	$(PY) -m pytest bench/test_coexist.py -q --benchmark-json=bench/results/coexist.json -p no:cacheprovider
	$(PY) -m pytest bench/test_train_throughput.py -q --benchmark-json=bench/results/train.json -p no:cacheprovider
	$(PY) -m pytest bench/test_tokenizer_speed.py -q --benchmark-json=bench/results/tokenizer.json -p no:cacheprovider

bench-full: install
	SPARSEQA_BENCH_FULL=1 $(PY) -m pytest bench/test_cpu_latency.py -q --benchmark-json=bench/results/cpu-full.json \
		-p no:cacheprovider
	SPARSEQA_WORKLOAD_LIMIT=0 $(PY) -m pytest bench/test_workload.py -q --benchmark-json=bench/results/workload-full.json \
		-p no:cacheprovider

bench-students: install
	$(PY) -m pytest bench/test_students.py -q --benchmark-json=bench/results/students.json -p no:cacheprovider

bench-serve: install
	$(PY) -m pytest bench/test_serve.py -q -s -p no:cacheprovider

bench-gpu:
	python3 bench/gpu_bench.py --out bench/results/gpu.json

report: install
	$(PY) -m bench.report

clean:
	rm -rf build $(VENV) *.egg-info engine/_C*.so
