# Two commands: `make demo` (tiny end-to-end run) and `make test`. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
# Re-install only when the declared dependencies or the lock change. Two steps: what the demo runs on (the
# package and its runtime dependencies), then the test and web-app extras.
# uv (pinned in the lock, installed by pip) installs the same locked versions as pip, and without byte-compiling:
# the runtime stack into a fresh venv took 18 s with uv, 83 s with pip --no-compile and 156 s with pip's default
# byte-compiling. Where uv cannot install (no wheel for the platform, an index only pip is configured for), pip does.
PIP       := $(BIN)/python -m pip install --quiet --disable-pip-version-check --no-compile
UV        := $(BIN)/uv pip install --quiet --python $(BIN)/python
install    = $(UV) $(1) || $(PIP) $(1)
RUN_STAMP := $(VENV)/.installed-run
STAMP     := $(VENV)/.installed
# The extras as a variable: a comma written inside $(call install,...) would split its argument.
EXTRAS    := .[dev,app]

.PHONY: demo test venv browser clean-runs

venv: $(STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) -c constraints.txt uv || true
	$(call install,-c constraints.txt -e .)
	touch $(RUN_STAMP)

# The second line is test-only: torchscale, the independent reference for the original Kosmos-G
# decoder and AlignerNet (tests/test_official.py, tests/models/test_aligner.py). --no-deps because torchscale pins an
# old timm; it needs only torch and fairscale.
$(STAMP): $(RUN_STAMP)
	$(call install,-c constraints.txt -e '$(EXTRAS)')
	$(call install,--no-deps torchscale==0.3.0 fairscale==0.4.0)
	touch $(STAMP)

demo: $(RUN_STAMP)
	$(BIN)/python -m kosmos_g.tinyworld.demo

# Every test, the end-to-end ones marked slow included (CI runs this); PYTEST_ARGS='-m "not slow"' skips those.
test: $(STAMP) browser
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The app's browser test (tests/test_app.py) drives Debian's Chromium with Playwright: Playwright's own browser
# download is not a package registry. Installed here when missing and apt-get runs as root; otherwise that
# test skips with a hint (and fails under CI=true).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "no Chromium found and no root apt-get: the app's browser test will skip (apt-get install chromium)"; fi

clean-runs:
	rm -rf runs
