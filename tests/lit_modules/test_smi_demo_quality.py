"""The demo's trained artefacts carry what the demo shows: inverted images beat Gaussian noise.

These read the teacher, student and pools `make demo` writes under runs/smi/demo (minutes to build, so
not built here); without them the tests are skipped. KD follows the demo summary's own protocol
(``benchmarks.smi.demo_summary``: 256 pool images, the temperature and step count that
``demo_kd_setting`` picks by the real-data ceiling on validation), on the validation split instead of test.
The bounds are loose for the first teacher they were set on: `make demo` there measured sparse KD 0.286
against noise 0.098 on test (bound 0.08), and W4/A8 PTQ 0.806 against 0.762. On a second machine's teacher
(test accuracy 0.830) the margins are narrower: sparse 0.222 against noise 0.120 on validation at T = 1 and
120 steps. With the earlier fixed T = 4 and 480 steps it was 0.172 against 0.102, and the KD test failed.
An earlier version trained KD for 30 epochs on 128 images, a protocol nothing else measured; on the demo's
artefacts that gave 0.112 against noise 0.120 and failed.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import yaml

from datamodules.smi import SMIDataModule
from lit_modules.smi_ptq import SMIQuantizationModule

REPO = Path(__file__).resolve().parents[2]
KD_MARGIN, PTQ_MARGIN = 0.08, 0.02  # about half of the gaps `make demo` printed (0.19 and 0.044, test split)
DEMO = REPO / "runs" / "smi" / "demo"
NEEDED = ("teacher.safetensors", "student.safetensors", "inverted/manifest.json")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not all((DEMO / f).is_file() for f in NEEDED), reason="needs `make demo`'s artefacts"),
]


def config(name: str) -> dict:
    return yaml.safe_load((REPO / "configs" / "smi" / name).read_text())


def val_acc(module: L.LightningModule, data: SMIDataModule, epochs: int) -> float:
    kwargs = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                  enable_checkpointing=False)
    L.seed_everything(0, verbose=False)
    L.Trainer(max_epochs=epochs, limit_val_batches=0, num_sanity_val_steps=0, **kwargs).fit(module, datamodule=data)
    return L.Trainer(**kwargs).validate(module, datamodule=data, verbose=False)[0]["val/acc"]


def pool(source: str, images: int) -> SMIDataModule:
    args = {**config("demo_kd.yaml")["data"]["init_args"], "inverted_dir": str(DEMO / "inverted"), "batch_size": 32}
    if source == "noise":
        args.update(train_source="noise", num_train=images)
    else:
        args.update(num_inverted=images)
    return SMIDataModule(**args)


def test_kd_on_the_demo_pool_beats_the_noise_floor() -> None:
    from benchmarks.smi import DEMO_KD_IMAGES, data, demo_kd_setting, distil

    temperature, steps = demo_kd_setting()
    accs = {source: distil(data(source, DEMO / "inverted", DEMO_KD_IMAGES, 0), 0, steps, temperature, "val")
            for source in ("noise", "sparse")}
    assert accs["sparse"] >= accs["noise"] + KD_MARGIN, accs


def test_calibration_on_the_demo_pool_beats_noise_at_the_hard_setting() -> None:
    args = {**config("demo_ptq.yaml")["model"]["init_args"], "checkpoint": str(DEMO / "teacher.safetensors")}
    accs = {source: val_acc(SMIQuantizationModule(**args), pool(source, 32), 1) for source in ("noise", "inverted")}
    assert accs["inverted"] >= accs["noise"] + PTQ_MARGIN, accs
