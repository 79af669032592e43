# The README's two commands: `make demo` and `make test`. Both create or reuse .venv.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export GRPC_VERBOSITY := ERROR
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: install demo test test-fast lint format proto clean browser

install: $(STAMP)

# torch first, in its own pip command: it comes from local disk here, and a resolver
# that sees it together with the rest may pick another build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m deploy.local.demo --out out/demo

test: lint browser
	$(BIN)/python -m pytest -q

# The dashboard tests' headless Chromium (Debian's package). Installed when missing and this runs
# as root with apt-get; otherwise those tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed and could not be: the browser tests will skip"

# ruff (pinned in pyproject.toml): lint, and a formatting check; `make format` rewrites.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The generated exchange code is committed; regenerate it after editing common/exchange.proto.
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. common/exchange.proto

clean:
	rm -rf out .pytest_cache
