"""Bad input through the real CLI: each ends in at most five lines that name the key (and the fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

import train

C = Path(__file__).resolve().parents[1] / "configs"
REFRESH, SMI, SURGERY = str(C / "refresh" / "demo.yaml"), str(C / "smi" / "demo.yaml"), str(C / "surgery" / "demo.yaml")
BDS = str(C / "bds" / "demo.yaml")

# (id, argv, texts that must all appear in the message)
CASES = [
    ("typo in a model key", ["fit", "--config", REFRESH, "--model.init_args.buffer_sise=3"],
     ["model.init_args.buffer_sise", "did you mean buffer_size"]),
    ("typo in a callback key", ["fit", "--config", SMI, "--trainer.callbacks.keep_ratoi=0.5"],
     ["trainer.callbacks[0].init_args.keep_ratoi", "did you mean keep_ratio"]),
    ("typo in a data key", ["fit", "--config", REFRESH, "--data.init_args.datset=mnist5k"],
     ["data.init_args.datset", "did you mean dataset"]),
    ("typo in a trainer key", ["fit", "--config", SMI, "--trainer.max_epoch=3"],
     ["trainer.max_epoch", "did you mean max_epochs"]),
    ("wrong type", ["fit", "--config", REFRESH, "--model.init_args.buffer_size=abc"],
     ["model.init_args.buffer_size", "int"]),
    ("smi: keep_ratio out of range", ["fit", "--config", SMI, "--trainer.callbacks.keep_ratio=1.5"],
     ["trainer.callbacks[0].init_args.keep_ratio", "1.5"]),
    ("refresh: minibatch_size 0 with replay", ["fit", "--config", REFRESH, "--model.init_args.minibatch_size=0"],
     ["model.init_args.minibatch_size", "got 0"]),
    ("bds: harmful_ratio out of range", ["fit", "--config", BDS, "--data.init_args.harmful_ratio=1.5"],
     ["data.init_args.harmful_ratio", "1.5"]),
    ("surgery: unknown merge", ["fit", "--config", SURGERY, "--model.init_args.merge=avg"],
     ["model.init_args.merge", "avg"]),
    ("missing checkpoint", ["fit", "--config", SMI, "--model.init_args.teacher_checkpoint=/nonexistent/t.safetensors"],
     ["model.init_args.teacher_checkpoint", "/nonexistent/t.safetensors"]),
    ("paper config without its dataset", ["fit", "--config", str(C / "refresh" / "seq_cifar10.yaml"),
                                          "--data.init_args.root=/nonexistent/cifar"], ["data.init_args.root"]),
    ("GPU config on a CPU machine", ["fit", "--config", REFRESH, "--config", str(C / "_base" / "trainer_gpu.yaml")],
     ["trainer.accelerator", "--trainer.accelerator=cpu"]),
    ("unknown class", ["fit", "--model", "SMIModul"], ["model", "SMIModul", "did you mean SMIModule"]),
    ("missing config file", ["fit", "--config", "/nonexistent/run.yaml"], ["--config /nonexistent/run.yaml", "no such file"]),
]


@pytest.mark.parametrize(("argv", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_ends_in_a_short_message_naming_the_key(argv, expected, capsys, monkeypatch) -> None:
    monkeypatch.delenv("LITZOO_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 5, err
    assert "Traceback" not in err and "Given value type" not in err, err
    for text in expected:
        assert text in err, f"{text!r} not in:\n{err}"


def test_verbose_shows_the_parser_message(capsys) -> None:
    with pytest.raises(Exception, match="Option 'buffer_sise' is not accepted"):
        train.main(["--verbose", "fit", "--config", REFRESH, "--model.init_args.buffer_sise=3"])
