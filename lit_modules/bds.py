"""Bayesian Data Scheduler (BDS): LoRA fine-tuning of a causal LM on re-weighted user data.

Hu, Shen, Wang, Wei, Tao. "Adaptive Defense against Harmful Fine-Tuning for Large Language Models
via Bayesian Data Scheduler", NeurIPS 2025 (arXiv:2510.27172). Official code:
github.com/Egg-Hu/Bayesian-Data-Scheduler.

Idea. A fine-tuning service receives user data D_ft that may hide harmful (prompt -> compliant
answer) pairs. BDS treats the "safety attribute" of each sample as a latent weight w_i and samples
(theta, w) from p(theta, w | D_ft, D_safe), where the provider's alignment set D_safe (harmful prompt
-> refusal) makes harmful samples fit badly: a sample whose loss stays high while the model also
learns to refuse gets a low weight, and the model is trained on D_safe plus the re-weighted D_ft.
No attack is simulated and the trained model is delivered as is.

This module owns the mechanism: per-sequence token-mean NLL of the response tokens, the loss of
each mode and the LoRA update (Eq. 7). The weights come from ``callbacks.bayesian_weighting``
through ``core.protocols.SupportsSampleWeighting``; without the callback every weight is 1.

Equations -> code:
    l_i(theta) = mean_t -log p_theta(y_t | x, y_<t), prompt masked       -> ``core.sequence_loss.sequence_nll``
    Eq. (7): theta <- theta - eta grad[L_safe + 1/B sum_i sigma(w)_i l_i]  -> ``training_step`` (mode ``bds``)
    Eq. (8)/(11): the scheduler update                                      -> ``BayesianDataScheduler``
    p(D_ft | w)^-1: theta' on the weighted D_ft only, l_i(theta')          -> ``_reference_step`` (a 2nd adapter)
Modes (the release's ``--upperlevel_weight``): ``bds`` (-1), ``weighted_only`` (-2), ``sft`` (-3),
``mix`` (-4), ``seal`` (rho * L_safe + (1 - rho) * weighted ft loss, rho -= rho_decay per epoch).

Evaluation generates greedily (KV cache, left padding): the harmful score is the fraction of held-out
harmful prompts whose answer a pluggable judge flags; task accuracy compares answers with the benign
test set's gold answers. ``predict`` answers the prompts of ``data.predict_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
import torchmetrics
from torch import Tensor

from core.fsdp_init import loads_full_weights
from core.model_card import write_model_card
from core.packaged_models import resolve_model
from core.refusal_judge import answer_correct, load_judge
from core.run_dir import run_directory
from core.sequence_loss import sequence_nll

Mode = Literal["bds", "sft", "mix", "weighted_only", "seal"]
WEIGHTED_MODES = ("bds", "weighted_only", "seal")
ALIGNED_MODES = ("bds", "mix", "seal")
REFERENCE = "reference"
"""Name of the safety-agnostic reference adapter theta' (``reference_adapter: true``)."""


class BDSModule(L.LightningModule):
    """LoRA fine-tuning on alignment data plus (re-)weighted user data, evaluated by generation.

    Args:
        model: Hugging Face id or local folder of the causal LM, or ``smollm2`` (demo: the folder that
            ``datamodules.sources.smollm2_path()`` builds under ``$LITZOO_CACHE`` or
            ``~/.cache/litzoo``; paper: ``meta-llama/Llama-2-7b-hf``).
        dtype: dtype of the frozen base weights (``float32``, ``bfloat16``, ``float16``); LoRA
            weights are always float32.
        lora_r: LoRA rank (paper 32).
        lora_alpha: LoRA alpha (paper 4, i.e. scale 0.125).
        lora_dropout: LoRA dropout (paper 0).
        lora_target_modules: names of the linear layers that get adapters (paper q/k/v).
        lora_layers: put adapters only on the top ``lora_layers`` transformer blocks (None: all).
            Backpropagation then stops below them, which makes CPU runs affordable.
        mode: loss: ``bds`` L_safe + mean(w l), ``sft`` mean(l) (no alignment data), ``mix``
            L_safe + mean(l), ``weighted_only`` mean(w l), ``seal`` rho L_safe + (1 - rho) mean(w l).
        rho: initial rho of mode ``seal``.
        rho_decay: subtracted from rho after every epoch (release script: 1 / epochs).
        lr: AdamW learning rate of the LoRA weights (paper 1e-5, constant).
        betas: AdamW betas (paper (0.9, 0.95)).
        weight_decay: AdamW weight decay (paper 0.1).
        grad_clip: gradient-norm clip of the LoRA weights (paper 1.0; 0 disables).
        gradient_checkpointing: recompute activations in the backward pass (paper: on).
        max_new_tokens: greedy tokens generated per held-out harmful prompt (paper 512).
        task_max_new_tokens: greedy tokens per benign test prompt (paper: SST2 10, GSM8K 200, AlpacaEval
            256); None: ``max_new_tokens``.
        judge: class path of the harmful-answer judge; instances map (prompts, answers) to bools.
        judge_kwargs: keyword arguments of the judge.
        predictions_file: JSON-lines file that ``predict`` writes (prompt, answer); None: not written.
        trust_remote_code: allow the model repository's own code (off: only built-in architectures).
        export_adapter: at the end of ``fit``, save the LoRA weights as a PEFT adapter folder with a model
            card in ``<run folder>/adapter`` (``PeftModel.from_pretrained(base, folder)`` loads it).
        init_adapter: PEFT adapter folder merged into the base weights before the fine-tuning LoRA is added
            (the release's ``--pretrained_lora_path``: start from an aligned model); None: the base as is.
        reference_adapter: train a second LoRA adapter theta' on the weighted fine-tuning batch only (never on
            the alignment data) every step; its per-sample losses are the safety-agnostic reference of Eq. (8).
            False: the reference is the starting model with the adapters off (no extra cost).
    """

    def __init__(
        self,
        model: str = "smollm2",
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        lora_r: int = 32,
        lora_alpha: float = 4.0,
        lora_dropout: float = 0.0,
        lora_target_modules: list[str] | None = None,
        lora_layers: int | None = None,
        mode: Mode = "bds",
        rho: float = 0.5,
        rho_decay: float = 0.0,
        lr: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.95),
        weight_decay: float = 0.1,
        grad_clip: float = 1.0,
        gradient_checkpointing: bool = False,
        max_new_tokens: int = 32,
        task_max_new_tokens: int | None = None,
        judge: str = "core.refusal_judge.KeywordRefusalJudge",
        judge_kwargs: dict[str, Any] | None = None,
        predictions_file: str | None = None,
        trust_remote_code: bool = False,
        export_adapter: bool = True,
        init_adapter: str | None = None,
        reference_adapter: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if mode not in get_args(Mode):
            raise ValueError(f"model.init_args.mode must be one of {', '.join(get_args(Mode))}, got {mode!r}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"model.init_args.rho must lie in [0, 1], got {rho}")
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints hold the trainable (LoRA) weights only
        self.target_modules = list(lora_target_modules or ["q_proj", "k_proj", "v_proj"])
        self.model: Any = None
        self.tokenizer: Any = None
        self.judge: Any = None
        self.rho = rho
        self._weights: Tensor | None = None
        self._finite: Tensor | None = None  # all losses so far finite (a device flag)
        self._last: dict[str, Tensor] = {}
        self._predictions: list[dict[str, str]] = []
        self.metrics = torch.nn.ModuleDict({
            f"{split}_{name}": torchmetrics.MeanMetric()
            for split in ("val", "test") for name in ("harmful_score", "task_acc")
        })

    # ------------------------------------------------------------------ model
    def configure_model(self) -> None:
        if self.model is not None:
            return
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        hp = self.hparams
        path = resolve_model(hp.model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=hp.trust_remote_code)
            if getattr(self, "_trainer", None) is None or loads_full_weights(self.trainer):
                base = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, hp.dtype),
                                                            trust_remote_code=hp.trust_remote_code)
            else:  # FSDP broadcasts rank 0's weights: the other ranks only need the architecture
                config = AutoConfig.from_pretrained(path, trust_remote_code=hp.trust_remote_code)
                with torch.device("meta"):
                    base = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, hp.dtype),
                                                            trust_remote_code=hp.trust_remote_code)
        except OSError as err:
            hint = (" (build the SmolLM2 folder once with: python -c 'from datamodules.sources import smollm2_path; "
                    "smollm2_path()')") if "smollm2" in path else ""
            raise FileNotFoundError(f"model.init_args.model: cannot load {hp.model!r}{hint}: {err}") from err
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._check_targets(base)
        layers = None
        if hp.lora_layers is not None:
            depth = base.config.num_hidden_layers
            if not 1 <= hp.lora_layers <= depth:
                raise ValueError(f"model.init_args.lora_layers must lie in [1, {depth}], got {hp.lora_layers}")
            layers = list(range(depth - hp.lora_layers, depth))
        config = LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout, bias="none",
                            target_modules=self.target_modules, layers_to_transform=layers, task_type="CAUSAL_LM")
        if hp.init_adapter:
            from peft import PeftModel

            if not (Path(hp.init_adapter).expanduser() / "adapter_config.json").is_file():
                raise FileNotFoundError(f"model.init_args.init_adapter: no PEFT adapter folder at {hp.init_adapter}")
            base = PeftModel.from_pretrained(base, str(Path(hp.init_adapter).expanduser())).merge_and_unload()
        self.model = get_peft_model(base, config)
        if hp.reference_adapter:
            self.model.add_adapter(REFERENCE, config)
            self.model.set_adapter("default")
        self.model.train()  # from_pretrained returns eval mode; no dropout in the paper setting either way
        for p in self.lora_parameters():
            p.data = p.data.float()  # LoRA weights in fp32 whatever the base dtype (release asserts it)
        if hp.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
            self.model.enable_input_require_grads()

    def _check_targets(self, base: torch.nn.Module) -> None:
        leaves = {name.rsplit(".", 1)[-1] for name, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
        missing = [t for t in self.target_modules if t not in leaves]
        if missing:
            raise ValueError(f"model.init_args.lora_target_modules: {missing} not found in {self.hparams.model!r}; "
                             f"its linear layers are named {sorted(leaves)}")

    def lora_parameters(self, adapter: str | None = None) -> list[torch.nn.Parameter]:
        """LoRA weights of one adapter (``default`` or the reference), or of all when None."""
        return [p for n, p in self.model.named_parameters()
                if "lora_" in n and (adapter is None or n.endswith(f".{adapter}.weight"))]

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        adapters = ["default"] + ([REFERENCE] if hp.reference_adapter else [])
        return [torch.optim.AdamW(self.lora_parameters(a), lr=hp.lr, betas=tuple(hp.betas),
                                  weight_decay=hp.weight_decay) for a in adapters]

    def sequence_losses(self, batch: dict[str, Any]) -> Tensor:
        """(B,) token-mean NLL of each row's response tokens."""
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return sequence_nll(logits, batch["labels"])

    # ------------------------------------------------------------------ SupportsSampleWeighting
    @staticmethod
    def _ft(batch: dict[str, Any]) -> dict[str, Any]:
        ft = batch.get("ft") if isinstance(batch, dict) else None
        if ft is None or "index" not in ft:
            raise ValueError("the fine-tuning batch has no dataset 'index': sample weighting needs the index of every "
                             "row (use datamodules.bds.BDSDataModule as data, or add 'index' to your collate)")
        return ft

    def num_weighted_samples(self) -> int:
        datamodule = self.trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "num_finetune_samples"):
            raise TypeError("sample weighting needs a data module with num_finetune_samples (e.g. BDSDataModule)")
        return int(datamodule.num_finetune_samples)

    def sample_weighting_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        ft = self._ft(batch)
        return {"index": ft["index"], "text": list(ft["text"]), "source": ft.get("source")}

    def set_sample_weights(self, weights: Tensor | None) -> None:
        self._weights = None if weights is None else weights.detach()

    def last_sample_losses(self) -> tuple[Tensor, Tensor]:
        return self._last["index"], self._last["losses"]

    @torch.no_grad()
    def recompute_sample_losses(self) -> Tensor:
        return self.sequence_losses(self._last["batch"]).float()

    @torch.no_grad()
    def reference_sample_losses(self) -> Tensor:
        if self.hparams.reference_adapter:  # theta', trained on the weighted D_ft only (this step's losses)
            return self._last["reference"]
        # Released-style stand-in: the starting model with the LoRA adapters off (it never saw this D_safe).
        with self.model.disable_adapter():
            return self.sequence_losses(self._last["batch"]).float()

    def _reference_step(self, ft: dict[str, Any], weights: Tensor, opt: Any) -> Tensor:
        """One update of theta' on the weighted fine-tuning batch: p(D_ft | w)'s safety-agnostic model."""
        self.model.set_adapter(REFERENCE)
        try:
            losses = self.sequence_losses(ft)
            opt.zero_grad()
            self.manual_backward((weights * losses).mean())
            if self.hparams.grad_clip > 0:
                self.clip_gradients(opt, gradient_clip_val=self.hparams.grad_clip, gradient_clip_algorithm="norm")
            opt.step()
        finally:
            self.model.set_adapter("default")
        return losses.detach().float()

    # ------------------------------------------------------------------ training
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        hp = self.hparams
        ft = self._ft(batch)
        ft_losses = self.sequence_losses(ft)
        weights = torch.ones_like(ft_losses)
        if hp.mode in WEIGHTED_MODES and self._weights is not None:
            if self._weights.shape != ft_losses.shape:
                raise ValueError(f"got {tuple(self._weights.shape)} sample weights for a batch of {len(ft_losses)}")
            weights = self._weights.to(ft_losses)
        self._weights = None  # weights are valid for one step: the callback sets fresh ones every step
        ft_loss = (weights * ft_losses).mean()
        align_loss = torch.zeros((), device=ft_losses.device)
        if hp.mode in ALIGNED_MODES:
            if batch.get("align") is None:
                raise ValueError(f"mode {hp.mode!r} needs an alignment batch: give the data module a non-empty "
                                 "alignment set (data.init_args.num_alignment) or use model.init_args.mode: sft")
            align_loss = self.sequence_losses(batch["align"]).mean()
        if hp.mode == "seal":
            loss = self.rho * align_loss + (1.0 - self.rho) * ft_loss
        else:  # Eq. (7); sft/weighted_only carry no alignment term, sft/mix have weights 1
            loss = align_loss + ft_loss
        # A non-finite loss is flagged on the device and checked when Lightning logs (it syncs then anyway),
        # not with a host sync every step.
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        if self.global_step % max(1, self.trainer.log_every_n_steps) == 0 and not bool(self._finite):
            raise FloatingPointError(f"non-finite loss at or before step {self.global_step}: lower model.init_args.lr")
        optimizers = self.optimizers()
        opt = optimizers[0] if isinstance(optimizers, list) else optimizers
        opt.zero_grad()
        self.manual_backward(loss)
        if hp.grad_clip > 0:
            self.clip_gradients(opt, gradient_clip_val=hp.grad_clip, gradient_clip_algorithm="norm")
        opt.step()
        self._last = {"index": ft["index"], "losses": ft_losses.detach().float(), "batch": ft}
        if hp.reference_adapter:
            self._last["reference"] = self._reference_step(ft, weights.detach(), optimizers[1])
        self.log_dict({"train/loss": loss.detach(), "train/loss_align": align_loss.detach(),
                       "train/loss_ft": ft_losses.detach().mean(), "train/weight_mean": weights.mean()},
                      prog_bar=True, batch_size=len(ft_losses))
        return loss.detach()

    def on_train_epoch_end(self) -> None:
        if self.hparams.mode == "seal":
            self.rho = max(0.0, self.rho - self.hparams.rho_decay)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {f"model.{n}" for n, p in self.model.named_parameters() if "lora_" in n}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in trainable or k.startswith("metrics.")}
        checkpoint["bds_rho"] = self.rho

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # strict_loading is off (the frozen base is not saved), so a LoRA layout mismatch must be caught here.
        expected = {f"model.{n}": tuple(p.shape) for n, p in self.model.named_parameters() if "lora_" in n}
        saved = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items() if not k.startswith("metrics.")}
        if saved != expected:
            missing, unexpected = sorted(expected.keys() - saved.keys()), sorted(saved.keys() - expected.keys())
            reshaped = sorted(k for k in saved.keys() & expected.keys() if saved[k] != expected[k])
            raise ValueError(
                f"the checkpoint's LoRA weights do not fit model.init_args (lora_r, lora_target_modules, lora_layers): "
                f"{len(missing)} missing, {len(unexpected)} unexpected, {len(reshaped)} of another shape "
                f"(e.g. {(missing or unexpected or reshaped)[0]}); resume with the checkpoint's LoRA settings"
            )
        self.rho = checkpoint.get("bds_rho", self.rho)

    def on_fit_end(self) -> None:
        folder = run_directory(self.trainer) / "adapter"  # collective: every rank
        if not self.hparams.export_adapter or not self.trainer.is_global_zero:
            return
        self.model.save_pretrained(folder, selected_adapters=["default"])
        self.tokenizer.save_pretrained(folder)
        data = self.trainer.datamodule
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if v.numel() == 1}
        write_model_card(
            folder, f"LoRA adapter: {self.hparams.mode} fine-tuning of {self.hparams.model}",
            "LoRA weights trained by litzoo's BDSModule (Bayesian Data Scheduler, Hu et al., NeurIPS 2025, and its "
            f"baselines); mode `{self.hparams.mode}`, rank {self.hparams.lora_r}, targets {self.target_modules}.",
            base_model=str(self.hparams.model), data=dict(data.hparams) if data is not None else None,
            metrics=metrics, config=dict(self.hparams), tags=["peft", "lora", "bds"],
            usage=("from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
                   f"base = AutoModelForCausalLM.from_pretrained({str(resolve_model(self.hparams.model))!r})\n"
                   f"model = PeftModel.from_pretrained(base, {str(folder)!r})"))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def generate(self, batch: dict[str, Any]) -> list[str]:
        """Greedy answers (KV cache) to a left-padded batch of prompts."""
        hp = self.hparams
        budget = hp.task_max_new_tokens if batch["kind"] == "task" and hp.task_max_new_tokens else hp.max_new_tokens
        out = self.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  max_new_tokens=budget, do_sample=False, use_cache=True,
                                  pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        answers = self.generate(batch)
        if batch["kind"] == "harmful":
            if self.judge is None:
                self.judge = load_judge(self.hparams.judge, self.hparams.judge_kwargs, "model.init_args.judge")
            values, name = self.judge(batch["prompt"], answers), "harmful_score"
        else:
            values, name = [answer_correct(a, g) for a, g in zip(answers, batch["gold"])], "task_acc"
        metric = self.metrics[f"{split}_{name}"]
        metric.update(torch.tensor(values, dtype=torch.float32, device=self.device))
        self.log(f"{split}/{name}", metric, batch_size=len(answers), add_dataloader_idx=False, prog_bar=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, str]]:
        rows = [{"prompt": p, "answer": a} for p, a in zip(batch["prompt"], self.generate(batch))]
        self._predictions.extend(rows)
        return rows

    def on_predict_end(self) -> None:
        if self.hparams.predictions_file:
            path = Path(self.hparams.predictions_file)
            path = path.with_name(f"{path.stem}.rank{self.global_rank}{path.suffix}") if self.trainer.world_size > 1 else path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in self._predictions))
        self._predictions = []
