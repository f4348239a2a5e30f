"""TGR's task-embedding stage (run once per zoo, cached per teacher): the probe and the similarity matrix.

Every teacher's embedding is the Fisher of the probe on images recovered from it
(``core.task_embedding``); it is cached as safetensors under a key made of the teacher file's SHA-256,
the probe weights' hash and every setting that shapes the recovery and the estimator, so a changed
zoo, probe or setting never reuses a stale embedding (the release keys its caches by folder name).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from core.atomic_write import atomic_write_bytes
from core.packaged_models import default_cache_dir
from core.state_hash import state_hash
from core.task_embedding import check_probe_labels, teacher_embedding, train_probe
from core.task_similarity import normalised_cosine_similarity, stack_embeddings

EMBEDDING_KEY = 1 << 30  # recovery key of the embedding images: the same for every teacher (cache by hash)


def _cache_root(setting: str | None, name: str) -> Path | None:
    if setting == "":
        return None
    return (Path(setting) if setting else default_cache_dir() / "tgr") / name


def build_probe(module: Any, data: Any) -> nn.Module:
    """The probe: a Conv4 trained on the datamodule's reserved classes (cached), or torchvision ResNet-34
    weights from a local file (the paper's ImageNet probe)."""
    hp = module.hparams
    if hp.probe != "conv4":
        path = Path(hp.probe)
        if not path.is_file():
            raise FileNotFoundError(f"model.init_args.probe={hp.probe}: no such weight file (torchvision "
                                    "resnet34 IMAGENET1K_V1 state dict; or use probe: conv4)")
        from torchvision.models import resnet34

        probe = resnet34()
        probe.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return probe.eval()
    if not hasattr(data, "probe_set"):
        raise TypeError("model.init_args.probe=conv4 trains the probe on the datamodule's probe classes: "
                        "use data: datamodules.tgr.TGRData")
    images, labels, names = data.probe_set()
    teacher_names = {n for r in module.records if r.domain in ("", data.hparams.source) for n in r.class_names}
    shared = sorted(teacher_names & set(names))
    if shared:
        raise ValueError(f"data.init_args.probe_classes: the probe classes {shared[:5]} are also teacher classes; "
                         "build the zoo with the same probe_classes reserved (ZooData.probe_classes)")
    key = hashlib.sha256(images.numpy().tobytes() + json.dumps([hp.probe_hidden, hp.probe_epochs]).encode())
    root = _cache_root(hp.embedding_cache, "probes")
    file = root / f"conv4_{key.hexdigest()[:16]}.safetensors" if root else None
    if file is not None and file.is_file():
        from core.conv4 import Conv4

        probe = Conv4(images.shape[1], hp.probe_hidden, int(labels.max()) + 1, images.shape[-1])
        probe.load_state_dict(load_file(str(file)))
        return probe.eval()
    probe = train_probe(images, labels, hp.probe_hidden, hp.probe_epochs)
    if file is not None:
        # atomic: runs of other seeds share the probe and may read it while this one writes
        atomic_write_bytes(file, save({k: v.contiguous() for k, v in probe.state_dict().items()}))
    return probe


def zoo_similarity(module: Any, data: Any, n_models: int) -> Tensor:
    """(n_models, n_models) normalised-cosine similarity of the first ``n_models`` teachers' embeddings."""
    hp = module.hparams
    probe = build_probe(module, data).to(module.device)
    if hp.fisher == "batch":
        check_probe_labels(probe, module.n_classes_teacher)
    settings = json.dumps([hp.fisher, hp.embedding_images_per_class, hp.embedding_steps, hp.nz, hp.ngf, hp.ce_weight,
                           hp.bn_weight, hp.augment_padding, hp.augment_flip, hp.inversion_lr, hp.rng_seed])
    probe_hash = state_hash(probe.state_dict())
    root = _cache_root(hp.embedding_cache, "embeddings")
    embeddings = []
    for t in range(n_models):
        digest = hashlib.sha256(f"{module.records[t].sha256}|{probe_hash}|{settings}".encode()).hexdigest()[:20]
        file = root / f"{digest}.safetensors" if root else None
        if file is not None and file.is_file():
            embeddings.append(load_file(str(file)))
            continue
        with torch.enable_grad():
            images = module.recover(t, hp.embedding_images_per_class, hp.embedding_steps, (EMBEDDING_KEY,))
            labels = torch.arange(len(images), device=images.device) % module.n_classes_teacher
            fisher = teacher_embedding(probe, images, labels, hp.fisher, seed=hp.rng_seed)
        fisher = {k: v.detach().cpu().contiguous() for k, v in fisher.items()}
        if file is not None:
            atomic_write_bytes(file, save(fisher))
        embeddings.append(fisher)
    flat, segment = stack_embeddings(embeddings)
    return normalised_cosine_similarity(flat, segment)
