"""A model zoo on disk: one safetensors file per teacher plus a JSON manifest (what free and tgr load).

The manifest is the explicit record of what the zoo stage wrote: for every teacher the architecture,
the absolute class ids of the split it was trained on (its label ``j`` is class ``classes[j]``), their
names, the held-out accuracy and the SHA-256 of its weight file. Loading checks all of it, so a stale
or edited zoo fails with a message instead of silently teaching the wrong classes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.conv4 import Conv4
from core.resnet import DEPTHS, ResNet

MANIFEST = "manifest.json"


def build_teacher(arch: str, arch_kwargs: dict) -> nn.Module:
    """A teacher network by architecture name: ``conv4`` (kwargs of ``core.conv4.Conv4``) or
    ``resnet10``/``resnet18`` (kwargs of ``core.resnet.ResNet``)."""
    if arch == "conv4":
        return Conv4(**arch_kwargs)
    if arch in DEPTHS:
        return ResNet(**arch_kwargs)
    raise ValueError(f"unknown teacher architecture {arch!r} in the zoo manifest; known: conv4, {', '.join(DEPTHS)}")


@dataclass
class ZooTeacher:
    """One manifest entry."""

    file: str
    arch: str
    arch_kwargs: dict
    classes: list[int]
    class_names: list[str] = field(default_factory=list)
    accuracy: float = float("nan")
    sha256: str = ""
    domain: str = ""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_zoo(directory: str | Path, states: list[dict[str, Tensor]], teachers: list[ZooTeacher],
             meta: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``teacher_XXX.safetensors`` and ``manifest.json`` under ``directory``; returns the manifest path.

    An existing manifest is kept unless ``overwrite`` (runs never overwrite earlier outputs silently).
    """
    directory = Path(directory)
    manifest = directory / MANIFEST
    if manifest.exists() and not overwrite:
        raise FileExistsError(f"{manifest} exists: choose a new output_dir or set overwrite")
    directory.mkdir(parents=True, exist_ok=True)
    for i, (state, teacher) in enumerate(zip(states, teachers, strict=True)):
        teacher.file = f"teacher_{i:03d}.safetensors"
        save_file(state, str(directory / teacher.file))
        teacher.sha256 = _sha256(directory / teacher.file)
    tmp = manifest.with_suffix(".tmp")
    tmp.write_text(json.dumps({"meta": meta or {}, "teachers": [asdict(t) for t in teachers]}, indent=1))
    tmp.replace(manifest)  # atomic: a half-written manifest never exists
    return manifest


def read_manifest(path: str | Path, key: str = "zoo") -> tuple[Path, list[ZooTeacher], dict]:
    """``(directory, teachers, meta)`` of a manifest file or of a directory holding ``manifest.json``."""
    path = Path(path)
    manifest = path / MANIFEST if path.is_dir() else path
    if not manifest.is_file():
        raise FileNotFoundError(f"{key}={path}: no zoo manifest {manifest}; train the zoo stage first")
    record = json.loads(manifest.read_text())
    try:
        teachers = [ZooTeacher(**t) for t in record["teachers"]]
    except (KeyError, TypeError) as err:
        raise ValueError(f"{key}={path}: malformed manifest ({err}); rebuild the zoo") from err
    if not teachers:
        raise ValueError(f"{key}={path}: the manifest lists no teacher")
    return manifest.parent, teachers, record.get("meta", {})


def load_zoo(path: str | Path, key: str = "zoo", check_hash: bool = True) -> tuple[list[nn.Module], list[ZooTeacher], dict]:
    """Load every teacher of a zoo (eval mode, frozen), checking files, hashes and architectures."""
    directory, teachers, meta = read_manifest(path, key)
    models = []
    for i, teacher in enumerate(teachers):
        file = directory / teacher.file
        if not file.is_file():
            raise FileNotFoundError(f"{key}={path}: teacher {i} file {file} is missing; rebuild the zoo")
        if check_hash and teacher.sha256 and _sha256(file) != teacher.sha256:
            raise ValueError(f"{key}={path}: teacher {i} ({file.name}) does not match its manifest hash; "
                             "the zoo was modified after it was written: rebuild it")
        model = build_teacher(teacher.arch, teacher.arch_kwargs)
        try:
            model.load_state_dict(load_file(str(file)))
        except RuntimeError as err:
            first = ([line.strip() for line in str(err).splitlines()[1:]] or [str(err)])[0]
            raise ValueError(f"{key}={path}: teacher {i} weights do not fit architecture {teacher.arch} "
                             f"{teacher.arch_kwargs}: {first}") from err
        models.append(model.eval().requires_grad_(False))
    return models, teachers, meta


def distilled_shape(teachers: list[ZooTeacher], replay_n_way: int) -> tuple[int, int, int]:
    """``(classes, channels, image_size)`` of a zoo's teachers, for a meta-learner whose ``replay_n_way``-way
    head distils them (free, tgr); a head of another size is refused."""
    kwargs = teachers[0].arch_kwargs
    if replay_n_way != kwargs["num_classes"]:
        raise ValueError(f"model.init_args.replay_n_way={replay_n_way} must equal the teachers' class count "
                         f"{kwargs['num_classes']} (the meta-learner's head distils them)")
    return kwargs["num_classes"], kwargs["in_channels"], kwargs["image_size"]


def combine_zoos(parts: list[str | Path], directory: str | Path, overwrite: bool = False) -> Path:
    """One zoo from several (a multi-domain or multi-architecture zoo); returns the new manifest.

    Parts from the same data source share one class space; each further source gets its own block of
    absolute class ids (offset by the classes of the sources before it), so classes of different domains
    are never pooled together. Every teacher is copied (and re-hashed) with its ``domain`` recorded.
    """
    states, teachers, offsets, names, sources = [], [], {}, [], []
    for part in parts:
        folder, records, meta = read_manifest(part, key="combine_zoos")
        source = str(meta.get("source", ""))
        if source not in offsets:
            offsets[source] = len(names)
            names += [f"{source}:{c}" for c in meta.get("class_names", [])]
        for record in records:
            states.append(load_file(str(folder / record.file)))
            record.classes = [c + offsets[source] for c in record.classes]
            record.domain = source
            teachers.append(record)
        sources.append({"zoo": str(part), "source": source, "offset": offsets[source], "teachers": len(records)})
    meta = {"source": "+".join(offsets), "n_classes": len(names), "class_names": names, "parts": sources}
    return save_zoo(directory, states, teachers, meta, overwrite)
