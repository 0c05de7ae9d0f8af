# Two entry points: `make demo` (the main job on the demo data) and `make test`.
PY      := .venv/bin/python
PIP     := .venv/bin/pip
STAMP   := .venv/.installed
DEMOOUT := demo_out

# Debian tools the tests use: dciodvfy (DICOM validation), Orthanc + its DICOMweb plugin (a real
# PACS for the DICOMweb tests), Chromium (the audit report rendered in a real browser). Installed
# with apt-get when missing and this user may; otherwise the tests that need them skip and say why.
DEBS    := dicom3tools orthanc orthanc-dicomweb chromium
TOOLS   := /usr/bin/dciodvfy /usr/sbin/Orthanc /usr/bin/chromium

.PHONY: install debian demo results test lint clean

install: debian $(STAMP)

debian:
	@if ! ls $(TOOLS) >/dev/null 2>&1 || ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBS)) >/dev/null \
	      || echo "warning: apt-get could not install $(DEBS); the tests that need them will skip"; \
	  else echo "note: not root or no apt-get: $(DEBS) not installed; the tests that need them will skip"; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -c constraints.txt -e '.[test]'
	# lxt (AttnLRP's reference rules, used by a test) without its model-zoo dependencies
	# (transformers, open_clip, bitsandbytes, ...): only its torch-only functional rules are used
	$(PIP) install -q -c constraints.txt --no-deps lxt
	touch $(STAMP)

demo: install
	$(PY) -m c2f_med.demo --out $(DEMOOUT)

# the demo, then its tables written to docs/results.md with the date, machine and versions
results: install
	$(PY) -m c2f_med.demo --out $(DEMOOUT) --results docs/results.md

lint: install
	.venv/bin/ruff check .

test: lint
	$(PY) -m pytest -q

clean:
	rm -rf $(DEMOOUT)
