# Every target creates .venv on first use and installs the project into it.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN ?= runs
CKPT ?= $(RUN)/ddpm/version_0/checkpoints/last.ckpt

.PHONY: venv demo test test-all lint format tensorboard eval bench bench-avx2 gpu-wheels bench-diffae bench-pdae bench-guided bench-guided-cfg bench-ldm bench-ldm-vq bench-fast bench-reliability bench-precision clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

## demo: train configs/ddpm.yaml on the embedded digits, then write 64 DDIM-50 samples
demo: $(STAMP)
	$(PY) -m diffusion_apps fit --config configs/ddpm.yaml --trainer.logger.init_args.version 0
	$(PY) -m diffusion_apps sample --ckpt_path $(CKPT) --num_samples 64 --out_dir $(RUN)/ddpm/version_0/samples_demo

## test: the test suite without the slow quality checks, one pytest worker per core (a file per worker)
test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q -n auto --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check diffusion_apps tests benchmarks
	$(PY) -m ruff format --check diffusion_apps tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format diffusion_apps tests benchmarks
	$(PY) -m ruff check --fix diffusion_apps tests benchmarks

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir $(RUN)

## eval: score every checkpoint under $(RUN) (or CKPT=a.ckpt,b.ckpt) -> reports/eval.md, eval.json, grids
##   make eval N=500 SAMPLERS=ddpm:1000,ddim:100,ddim:50,ddim:20,ddim:10 SPACE=digits PRECISION=auto
##   (N=500 matches the floor's 500 real val images; auto: bf16 where the CPU/GPU runs it natively)
N ?= 500
PRECISION ?= auto
SAMPLERS ?= ddpm:1000,ddim:100,ddim:50,ddim:20,ddim:10
SPACE ?= digits
REPORTS ?= reports
eval: $(STAMP)
	$(PY) -m diffusion_apps eval --run_dir $(RUN) --num_samples $(N) --samplers $(SAMPLERS) \
		--space $(SPACE) --out_dir $(REPORTS) --precision $(PRECISION) \
		$(if $(filter command line environment,$(origin CKPT)),--ckpt_paths $(CKPT))

## bench: our UNet against diffusers and denoising-diffusion-pytorch -> benchmarks/results/<device>.md
##   make bench BENCH_ARGS="--reps 3 --shapes mnist32"   (add --compile for torch.compile rows)
BENCH_ARGS ?=
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(BENCH_STAMP)
	$(PY) benchmarks/speed.py $(BENCH_ARGS)

## bench-avx2: the same matrix as an AVX2-only CPU runs it (torch and oneDNN capped at AVX2)
bench-avx2: $(BENCH_STAMP)
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
		$(PY) benchmarks/speed.py --name cpu-avx2 $(BENCH_ARGS)

## gpu-wheels: the contenders' wheels for benchmarks/gpu.sh on a lent GPU (its image lacks them)
GPU_WHEELS := diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 \
	denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3 pytorch-fid==0.3.0 \
	jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0  # our CLI (gpu_fit.py)
gpu-wheels:
	grep -qx '/.whl/' .git/info/exclude || echo /.whl/ >> .git/info/exclude
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	python3 -m pip wheel -q --no-deps -w .whl guided-diffusion-sdk==1.0.0  # an sdist only

## bench-diffae: DiffAE's quality run: trains both stages unless their checkpoints exist (about
##   45 min on 2 CPU cores), scores them beside the DDPM checkpoint $(CKPT) when it exists
##   -> benchmarks/results/diffae/{eval,extras}.md, and draws docs/diffae/*.png
DIFFAE := $(RUN)/diffae/version_0/checkpoints/last.ckpt
LATENT := $(RUN)/diffae_latent/version_0/checkpoints/last.ckpt
comma := ,
bench-diffae: $(STAMP)
	test -f $(DIFFAE) || $(PY) -m diffusion_apps fit --config configs/diffae.yaml \
		--trainer.logger.init_args.version 0
	test -f $(LATENT) || $(PY) -m diffusion_apps fit --config configs/diffae_latent.yaml \
		--model.init_args.autoencoder $(DIFFAE) --trainer.logger.init_args.version 0
	$(PY) -m diffusion_apps eval --ckpt_paths $(DIFFAE),$(LATENT)$(if $(wildcard $(CKPT)),$(comma)$(CKPT)) \
		--num_samples 500 --samplers ddim:50 --out_dir benchmarks/results/diffae
	$(PY) benchmarks/autoencoder_extras.py --ckpt $(DIFFAE)
	for mode in reconstruct interpolate variations; do \
		$(PY) -m diffusion_apps autoencode --ckpt_path $(DIFFAE) --mode $$mode --out_dir docs/diffae; done
	$(PY) -m diffusion_apps autoencode --ckpt_path $(DIFFAE) --mode manipulate --attribute 8 --scales "[0, 1, 2, 3, 4]" \
		--out_dir docs/diffae

## bench-pdae: PDAE on the DDPM $(CKPT) (make demo), side by side with bench-diffae's DiffAE: trains
##   PDAE and its latent DDIM unless present (about 40 min on 2 CPU cores)
##   -> benchmarks/results/pdae/{eval,extras,cost,gap}.md, and draws docs/pdae/*.png
PDAE := $(RUN)/pdae/version_0/checkpoints/last.ckpt
PDAE_LATENT := $(RUN)/pdae_latent/version_0/checkpoints/last.ckpt
bench-pdae: $(STAMP)
	test -f $(PDAE) || $(PY) -m diffusion_apps fit --config configs/pdae.yaml \
		--model.init_args.ddpm $(CKPT) --trainer.logger.init_args.version 0
	test -f $(PDAE_LATENT) || $(PY) -m diffusion_apps fit --config configs/pdae_latent.yaml \
		--model.init_args.autoencoder $(PDAE) --trainer.logger.init_args.version 0
	$(PY) -m diffusion_apps eval --ckpt_paths $(PDAE),$(PDAE_LATENT)$(if $(wildcard $(DIFFAE)),$(comma)$(DIFFAE))$(if $(wildcard $(LATENT)),$(comma)$(LATENT)) \
		--num_samples 500 --samplers ddim:50 --out_dir benchmarks/results/pdae
	$(PY) benchmarks/autoencoder_extras.py --ckpt $(PDAE) --out benchmarks/results/pdae/extras.md
	test ! -f $(DIFFAE) || $(PY) benchmarks/pdae_cost.py --pdae_run $(RUN)/pdae/version_0 --diffae $(DIFFAE)
	$(PY) benchmarks/pdae_gap.py --ckpt $(PDAE)
	for mode in reconstruct interpolate trajectory variations; do \
		$(PY) -m diffusion_apps autoencode --ckpt_path $(PDAE) --mode $$mode --out_dir docs/pdae; done

## bench-guided: classifier guidance of the DDPM $(CKPT): trains its noisy classifier unless
##   present (about 8 min on 2 CPU cores), then the scale x {DDIM-50, DDPM-1000} table, 150 samples
##   per digit: minutes on a GPU, hours on 2 CPU cores (there, about 13 min with
##   GUIDED_ARGS="--per_class 20 --samplers ddim:50,ddpm:100")
##   -> benchmarks/results/guided/guided.md
CLASSIFIER := $(RUN)/guided_classifier/version_0/checkpoints/last.ckpt
GUIDED_ARGS ?=
bench-guided: $(STAMP)
	test -f $(CLASSIFIER) || $(PY) -m diffusion_apps fit --config configs/guided_classifier.yaml \
		--model.init_args.diffusion $(CKPT) --trainer.logger.init_args.version 0
	$(PY) benchmarks/guided.py --ddpm $(CKPT) --classifier $(CLASSIFIER) $(GUIDED_ARGS)

## bench-guided-cfg: classifier-free guidance against classifier guidance, one table: trains the
##   label-dropout DDPM (configs/ddpm_cfg.yaml, 28 min on 2 CPU cores) and the classifier unless
##   present, then w x scale rows beside the classifier's guidance of $(CKPT) (when it exists)
##   -> benchmarks/results/guided/guided_cfg.md
CFG := $(RUN)/ddpm_cfg/version_0/checkpoints/last.ckpt
CFG_ARGS ?= --per_class 25 --samplers ddim:50 --scales 0,1,5,10 --cfg_scales 0,0.5,1,3
bench-guided-cfg: $(STAMP)
	test -f $(CFG) || $(PY) -m diffusion_apps fit --config configs/ddpm_cfg.yaml \
		--trainer.max_time 00:00:28:00 --trainer.logger.init_args.version 0
	test -f $(CLASSIFIER) || $(PY) -m diffusion_apps fit --config configs/guided_classifier.yaml \
		--model.init_args.diffusion $(CFG) --trainer.logger.init_args.version 0
	$(PY) benchmarks/guided.py --cfg $(CFG) --classifier $(CLASSIFIER) \
		--ddpm $(if $(wildcard $(CKPT)),$(CKPT),"") $(CFG_ARGS)

## bench-ldm: latent diffusion: trains the first stage, then the class- and caption-conditional
##   LDMs on it, unless present (about 45 min on 2 CPU cores); scores them with the pixel DDPM
##   $(CKPT) when it exists -> benchmarks/results/ldm/{eval,ldm}.md, docs/ldm/*.png
LDM_AE := $(RUN)/ldm_autoencoder/version_0/checkpoints/last.ckpt
LDM := $(RUN)/ldm/version_0/checkpoints/last.ckpt
LDM_CAPTION := $(RUN)/ldm_caption/version_0/checkpoints/last.ckpt
bench-ldm: $(STAMP)
	test -f $(LDM_AE) || $(PY) -m diffusion_apps fit --config configs/ldm_autoencoder.yaml \
		--trainer.logger.init_args.version 0
	test -f $(LDM) || $(PY) -m diffusion_apps fit --config configs/ldm.yaml \
		--model.init_args.first_stage $(LDM_AE) --trainer.logger.init_args.version 0
	test -f $(LDM_CAPTION) || $(PY) -m diffusion_apps fit --config configs/ldm_caption.yaml \
		--model.init_args.first_stage $(LDM_AE) --trainer.logger.init_args.version 0
	$(PY) -m diffusion_apps eval --ckpt_paths $(LDM_AE),$(LDM),$(LDM_CAPTION)$(if $(wildcard $(CKPT)),$(comma)$(CKPT)) \
		--num_samples 500 --samplers ddim:50 --out_dir benchmarks/results/ldm
	$(PY) benchmarks/ldm.py --ldm $(LDM) --caption $(LDM_CAPTION)

## bench-ldm-vq: the two first-stage kinds at equal budgets: KL and VQ autoencoders trained
##   1,108 batches each, a class-conditional LDM 2,000 steps on each, unless present (about
##   40 min on 2 CPU cores) -> benchmarks/results/ldm/equal_budget/, docs/ldm/vq_*.png
EQ := $(RUN)/ldm_equal
EQ_FIT := --trainer.max_time null --trainer.logger.init_args.save_dir $(EQ) --trainer.logger.init_args.version 0
EQ_OUT := benchmarks/results/ldm/equal_budget
bench-ldm-vq: $(STAMP)
	for kind in kl vq; do \
		config=configs/ldm_autoencoder$$( [ $$kind = vq ] && echo _vq ).yaml; \
		ae=$(EQ)/ae_$$kind/version_0/checkpoints/last.ckpt; \
		ldm=$(EQ)/ldm_$$kind/version_0/checkpoints/last.ckpt; \
		test -f $$ae || $(PY) -m diffusion_apps fit --config $$config --trainer.max_steps 1108 \
			$(EQ_FIT) --trainer.logger.init_args.name ae_$$kind || exit 1; \
		test -f $$ldm || $(PY) -m diffusion_apps fit --config configs/ldm.yaml --trainer.max_steps 2000 \
			--model.init_args.first_stage $$ae $(EQ_FIT) --trainer.logger.init_args.name ldm_$$kind || exit 1; \
		$(PY) benchmarks/ldm.py --ldm $$ldm --caption "" --per_class 20 --out $(EQ_OUT)/$$kind \
			--docs $(EQ)/docs_$$kind || exit 1; \
	done
	$(PY) benchmarks/ldm.py --ldm "" --out $(EQ_OUT) \
		--first_stages $(EQ)/ae_kl/version_0/checkpoints/last.ckpt,$(EQ)/ae_vq/version_0/checkpoints/last.ckpt
	cp $(EQ)/docs_vq/classes_w2.png docs/ldm/vq_classes_w2.png
	cp $(EQ)/docs_vq/reconstructions.png docs/ldm/vq_reconstructions.png

## bench-fast: quality against NFE for the DDPM $(CKPT): distils its consistency model unless present
##   (about 40 min on 2 CPU cores), trains one without a teacher (iCT) unless present (70 min at
##   most), then DDPM-1000, DDIM-100…1, DPM-Solver++ 20/10/5 and both consistency models at 1/2/4
##   steps, N = 500 each (about an hour on 2 CPU cores, mostly DDPM-1000)
##   -> benchmarks/results/fast_sampling/{curve.md,curve.png,eval.md}
CONSISTENCY := $(RUN)/consistency/version_0/checkpoints/last.ckpt
CONSISTENCY_TRAINING := $(RUN)/consistency_training/version_0/checkpoints/last.ckpt
bench-fast: $(STAMP)
	test -f $(CONSISTENCY) || $(PY) -m diffusion_apps fit --config configs/consistency.yaml \
		--model.init_args.teacher $(CKPT) --trainer.logger.init_args.version 0
	test -f $(CONSISTENCY_TRAINING) || $(PY) -m diffusion_apps fit \
		--config configs/consistency_training.yaml --trainer.logger.init_args.version 0
	$(PY) benchmarks/fast_sampling.py --teacher $(CKPT) --consistency $(CONSISTENCY) \
		--consistency_training $(CONSISTENCY_TRAINING)

## bench-reliability: exact resume and DDP on configs/ddpm.yaml (40 steps, the CPU's precision)
##   -> benchmarks/results/reliability/reliability.md
bench-reliability: $(STAMP)
	$(PY) benchmarks/reliability.py --steps 40

## bench-precision: configs/ddpm.yaml's training step and sampling call in fp32 and bf16-mixed on
##   this CPU, side by side, with the flags the automatic choice reads (about 5 min on 2 CPU cores)
##   -> benchmarks/results/precision/precision.md
bench-precision: $(STAMP)
	$(PY) benchmarks/precision.py --steps 20 --rounds 2

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
