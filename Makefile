# The two entry points: `make run` (the whole system on the built-in model pair) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
GEN := specserve/v1

.PHONY: run test proto install models bench clean

run: install models
	$(VENV)/bin/specserve up

test: install models
	$(PY) -m pytest -q

install: $(STAMP) proto

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet --no-deps flexeval==0.18.3
	touch $(STAMP)

proto: $(STAMP)
	rm -rf $(GEN)
	mkdir -p $(GEN)
	PATH=$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. --mypy_out=. \
		proto/specserve/v1/*.proto
	touch $(GEN)/__init__.py

models: install
	$(VENV)/bin/specserve models prepare

bench: install models
	$(VENV)/bin/specserve bench

clean:
	rm -rf $(GEN) $(VENV)
