# The two commands of the README. Setup is incremental: the stamps below are only
# rebuilt when a package's pyproject.toml changes, so a second `make run` starts at once.

PYTHON ?= python3
VENV   ?= .venv
# SkyPilot's own virtualenv (see the skypilot target below)
SKY_VENV ?= .venv-sky
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
PYPROJECTS := packages/mlforge/pyproject.toml packages/reactor-core/pyproject.toml packages/jarvis-prime/pyproject.toml packages/jarvis/pyproject.toml

.PHONY: run test setup setup-test bench clean llama-cpp-converter skypilot

run: $(VENV)/.stamp-run $(VENV)/.stamp-converter  # the converter builds the vision model on its first image
	$(VENV)/bin/jarvis chat

test: $(VENV)/.stamp-test $(VENV)/.stamp-converter $(SKY_VENV)/.stamp
	$(PY) -m pytest

setup: $(VENV)/.stamp-run
setup-test: $(VENV)/.stamp-test $(VENV)/.stamp-converter $(SKY_VENV)/.stamp

bench: $(VENV)/.stamp-test
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/dedup.py

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned to the CPU build on this machine's disk, so that nothing later
# resolves `torch` to a multi-GB CUDA wheel.
$(VENV)/.stamp-torch: | $(PY)
	$(PIP) install "torch==2.13.0"
	touch $@

# MLForge (C++, compiled here by scikit-build-core + CMake) first, so that reactor-core's
# `native` extra finds it installed rather than asking an index for it.
$(VENV)/.stamp-run: $(VENV)/.stamp-torch $(PYPROJECTS)
	$(PIP) install ./packages/mlforge
	$(PIP) install -e "packages/reactor-core[native]" -e "packages/jarvis-prime[transformers,training,serve]" -e packages/jarvis
	touch $@

# The web page's end-to-end test drives Debian's chromium through Playwright (its own
# browser download needs a CDN this project does not rely on).
$(VENV)/.stamp-test: $(VENV)/.stamp-run $(PYPROJECTS)
	$(PIP) install -e "packages/reactor-core[native,dev]" -e "packages/jarvis-prime[transformers,training,serve,dev]" -e "packages/jarvis[dev]"
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
	  { command -v apt-get >/dev/null && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
	  echo "note: no chromium; the browser test will skip (set JARVIS_CHROMIUM to a Chromium binary)"
	touch $@

# llama.cpp's convert_hf_to_gguf.py (with its conversion/ and gguf-py/) from the sdist of the
# installed llama-cpp-python, for the tests that convert tiny Hugging Face models the way
# llama.cpp does (tests/test_mtmd.py: Idefics3 text model + mmproj). Without it they skip.
llama-cpp-converter: $(VENV)/.stamp-converter
$(VENV)/.stamp-converter: $(VENV)/.stamp-run
	@ver=$$($(PY) -c "import llama_cpp; print(llama_cpp.__version__)"); \
	dest=$(VENV)/share/llama-cpp-python-$$ver; src=llama_cpp_python-$$ver/vendor/llama.cpp; \
	tmp=$$(mktemp -d); \
	if $(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$$ver" -d $$tmp; then \
	  mkdir -p $$dest && tar -xzf $$tmp/llama_cpp_python-$$ver.tar.gz -C $$dest --strip-components=1 \
	    $$src/convert_hf_to_gguf.py $$src/conversion $$src/gguf-py $$src/models/templates && touch $@; \
	else echo "note: no llama-cpp-python $$ver sdist; the llama.cpp converter tests will skip"; fi; \
	rm -rf $$tmp

# SkyPilot for `reactor launch` (issue #26), in its own virtualenv: skypilot 0.14 pins
# click<8.2, huggingface-hub needs a newer click, so it cannot live in $(VENV). The
# launch tests run its task parser from here ($(SKY_VENV)/bin/python); without it they skip.
skypilot: $(SKY_VENV)/.stamp
$(SKY_VENV)/.stamp:
	$(PYTHON) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/python -m pip --disable-pip-version-check install "skypilot==0.14.1"
	touch $@

clean:
	rm -rf $(VENV) $(SKY_VENV)
