# The two commands of the README: `make demo` (the digits mini benchmark) and `make test`.
# Both create ./.venv and install what they need on first use.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: demo test bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade "pip>=23"
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/robbench demo

# pytest's exit code 5 (no tests collected) must fail, not pass silently.
test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	for f in benchmarks/*.py; do $(PY) $$f || exit 1; done

# GPU readiness check (docs/gpu.md). No install step: it runs with a python that already has torch (a lent
# GPU machine reaches no registry). Here: make gpu-check GPU_CHECK_PY=$(PY) GPU_CHECK_ARGS="--device cpu --quick"
GPU_CHECK_PY ?= python3
GPU_CHECK_OUT ?= reports/_tmp/gpu-check
gpu-check:
	PYTHONPATH=. $(GPU_CHECK_PY) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf runs results cache reports/_tmp
