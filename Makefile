# The two entry points: `make run` (the whole system on the built-in model pair) and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
GEN := specserve/v1
# llama.cpp is compiled for the CPU it is built on, so its wheel is cached per CPU feature set and
# never reused on a machine whose CPU differs.
LLAMA_CPP := llama-cpp-python==0.3.36
# Built for this CPU, less AMX: on machines whose CPU reports AMX (some VMs among them) ggml's AMX
# matmul died with SIGILL at the first decode, while the AVX-512/AVX2 kernels run everywhere.
LLAMA_ISA := -DCMAKE_C_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16 \
	-DCMAKE_CXX_FLAGS=-mno-amx-tile\ -mno-amx-int8\ -mno-amx-bf16
CPU_KEY := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | sort; echo '$(LLAMA_ISA)') | sha256sum | cut -c1-12)
LLAMA_WHEELS := $(HOME)/.cache/specserve/wheels/$(subst ==,-,$(LLAMA_CPP))-cpu-$(CPU_KEY)
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF $(LLAMA_ISA)

.PHONY: run test proto install models bench peers clean

run: install models
	$(VENV)/bin/specserve up

test: install models
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

install: $(STAMP) proto

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	ls $(LLAMA_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CMAKE)" \
		$(PIP) wheel --no-deps --no-cache-dir --wheel-dir $(LLAMA_WHEELS) $(LLAMA_CPP)
	$(PIP) install --quiet --no-deps --force-reinstall $(LLAMA_WHEELS)/*.whl
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

# The system benchmark replays the Azure LLM traces: TRACES names their folder.
bench: install models
	$(VENV)/bin/specserve bench --traces "$(TRACES)"

# The benchmark's peer: llama.cpp's own server, built from the llama.cpp source that the pinned
# llama-cpp-python release vendors (the same kernels our llama.cpp runtime runs), once per CPU.
PEERS := $(HOME)/.cache/specserve/peers/llama-server-$(subst llama-cpp-python==,,$(LLAMA_CPP))-cpu-$(CPU_KEY)
LLAMA_SERVER_CMAKE := -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
	-DLLAMA_OPENSSL=OFF $(LLAMA_ISA)

peers: $(PEERS)/llama-server

$(PEERS)/llama-server: $(STAMP)
	rm -rf $(PEERS)/src && mkdir -p $(PEERS)/src
	$(PIP) download --quiet --no-deps --no-binary :all: --dest $(PEERS)/src $(LLAMA_CPP)
	tar xzf $(PEERS)/src/*.tar.gz -C $(PEERS)/src
	cmake -S $(PEERS)/src/llama_cpp_python-*/vendor/llama.cpp -B $(PEERS)/build $(LLAMA_SERVER_CMAKE)
	cmake --build $(PEERS)/build --target llama-server -j $$(nproc)
	grep -m1 '^flags' /proc/cpuinfo > $(PEERS)/cpu-flags
	cp $(PEERS)/build/bin/llama-server $@
	rm -rf $(PEERS)/src $(PEERS)/build

clean:
	rm -rf $(GEN) $(VENV)
