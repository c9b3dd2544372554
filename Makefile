# Two commands do all the set-up on a fresh machine with python3:
#   make demo   create .venv, install requirements.txt, run the demo job
#   make test   create .venv, install requirements.txt, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO := results/demo

.PHONY: demo demo-extract test test-fast lint browser fonts docs-images docs-images-generation clean
# The viewer's browser test runs Debian's chromium; root installs it directly, others via sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

# The main job: the Snakemake workflow over the demo corpus x 4 checkpoints (configs/demo.yaml).
# The local profile gives 2 cores and --rerun-incomplete (a killed demo continues where it was).
demo: $(STAMP)
	$(PY) -m snakemake --profile configs/profiles/local --configfile configs/demo.yaml
	@echo "report: results/demo/report.md"

# The extraction stage alone, plus a figure, the HTML view, metrics and a report for MiniLM.
demo-extract: $(STAMP)
	mkdir -p $(DEMO)/extract
	$(PY) extract_attention.py --texts-file data/demo_corpus.jsonl --max-length 128 \
		--dtype float16 --verify --output_file $(DEMO)/extract/attention.h5
	$(PY) extract_attention.py --text "The cat sat on the mat because it was warm." \
		--verify --output_file $(DEMO)/extract/attention_data.json
	$(PY) visualize_attention.py --input_file $(DEMO)/extract/attention_data.json --mode heads --layer -1 \
		--output_file $(DEMO)/extract/attention_heads_last.png
	$(PY) visualize_attention.py --input_file $(DEMO)/extract/attention.h5 --text-id amb-001 --mode html \
		--output_file $(DEMO)/extract/attention_interactive.html
	$(PY) analyze_attention.py metrics $(DEMO)/extract/attention.h5 --output-dir $(DEMO)/extract/metrics
	$(PY) analyze_attention.py report $(DEMO)/extract/attention.h5 --output-dir $(DEMO)/extract/report

# Two worker processes (pytest-xdist), each taking whole test files (module fixtures built once):
# most of the suite waits on single-threaded start-ups and subprocesses, so 2 cores run it ~1.4x faster.
TEST_WORKERS ?= 2
test: $(STAMP) browser fonts lint
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile

# ruff's rules are in pyproject.toml ([tool.ruff]); .ci/run runs it through make test
lint: $(STAMP)
	$(PY) -m ruff check .

browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

test-fast: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# The README's pictures, made from the packaged MiniLM on a 45-token text (kept small: 70-100 dpi),
# and the viewer's four views as headless-chromium screenshots of one page.
IMG := docs/img
README_TEXT := The old lighthouse keeper, who had watched the harbour for forty years, finally \
	handed the brass key to his granddaughter because she understood the sea better than anyone else, \
	and then he walked slowly home along the windy cliffs.
CHROME_SHOT := /usr/bin/chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
	--host-resolver-rules="MAP * ~NOTFOUND" --window-size=1100,900
docs-images: $(STAMP) browser fonts
	mkdir -p $(IMG) results/readme
	$(PY) extract_attention.py --text "$(README_TEXT)" -q --output_file results/readme/attention.json
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode plot --layer 2 --head 0 \
		--dpi 80 --output_file $(IMG)/plot.png
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode heads --layer 2 \
		--dpi 60 --output_file $(IMG)/heads.png
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode layers \
		--dpi 70 --output_file $(IMG)/layers.png
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode average --layer all \
		--dpi 60 --output_file $(IMG)/average.png
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode plot --layer 0 --head 3 \
		--tokens-range 10:30 --hide-special --log --title "L0.H3, tokens 10-29, log colours" \
		--dpi 80 --output_file $(IMG)/window_log.png
	$(PY) analyze_attention.py clusters results/readme/attention.json --output-dir results/readme/clusters
	cp results/readme/clusters/clusters.png $(IMG)/clusters.png
	$(PY) visualize_attention.py --input_file results/readme/attention.json --mode html \
		--output_file results/readme/page.html
	for view in lines matrix model tokens; do \
		$(CHROME_SHOT) --screenshot=$(CURDIR)/$(IMG)/viewer_$$view.png \
			"file://$(CURDIR)/results/readme/page.html#view=$$view&layer=2&head=0" 2>/dev/null; done

# CJK token labels: Debian's Noto CJK fonts (attnpipe/visualize/fonts.py puts them in the chain).
fonts:
	@fc-list 2>/dev/null | grep -q "Noto Sans CJK" || { \
		$(SUDO) apt-get update && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y fonts-noto-cjk; }

# The README's generation pictures: two tiny models trained on a toy language (a minute on CPU),
# a translation the model writes itself (seed 003's figures) and a causal LM's continuation.
GEN := results/generation
docs-images-generation: $(STAMP)
	mkdir -p $(IMG) $(GEN)
	$(PY) scripts/make_generators.py --out-dir results/generators
	$(PY) extract_attention.py --model_dir results/generators/translator --input "the red cat sleeps on the old mat" \
		-q --verify --output_file $(GEN)/translation.json
	$(PY) visualize_attention.py --input_file $(GEN)/translation.json --mode seq2seq --output-dir $(GEN) --dpi 70
	cp $(GEN)/cross_attention_layer1.png $(IMG)/generation_cross.png
	cp $(GEN)/cross_attention_multihead_layer1.png $(IMG)/generation_cross_heads.png
	cp $(GEN)/self_attention_layer1.png $(IMG)/generation_self.png
	$(PY) extract_attention.py --model_dir results/generators/lm --text "the big dog sleeps on" --generate 8 \
		-q --verify --output_file $(GEN)/lm.json
	$(PY) visualize_attention.py --input_file $(GEN)/lm.json --mode average --layer -1 --dpi 70 \
		--output_file $(IMG)/generation_lm.png

clean:
	rm -rf $(VENV) results
