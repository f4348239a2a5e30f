"""Per-profession gender directions in a text encoder's residual space, and the bank that stores them.

SAE Debias (arXiv 2507.20973) builds "a biased direction per profession from sparse latents"; the exact
formula is not public, so this is the reconstruction of the method notes (s. 1.4), every choice an option:

    delta_p = mean_{male texts of p} z - mean_{female texts of p} z      z: pooled SAE codes      (D1)
    v_p     = delta_p W_dec   (``source="decoder"``)  or  delta_p W_enc^T  (``source="encoder"``)    (D2)
    u_p     = v_p / ||v_p||                                                                         (D3)
    u_g     from delta_g = mean_p delta_p  (fallback for professions the corpus does not contain)   (D4)

``latents=n`` keeps only the n latents with the largest |delta_p| (the "gender-relevant" ones). The
dense baseline skips the SAE (delta_p on the raw pooled features, v_p = delta_p) and the control uses
random dictionary rows.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def class_mean_difference(codes: Tensor, gender: Tensor, profession: Tensor, n_professions: int) -> Tensor:
    """(P, D) mean over male rows minus mean over female rows, per profession (Eq. D1); gender 1 = male."""
    onehot = torch.nn.functional.one_hot(profession, n_professions).to(codes.dtype)  # (N, P)
    male, female = onehot * (gender == 1)[:, None], onehot * (gender == 0)[:, None]
    if bool(((male.sum(0) == 0) | (female.sum(0) == 0)).any()):
        raise ValueError("every profession needs male and female texts to estimate its direction")
    return male.T @ codes / male.sum(0)[:, None] - female.T @ codes / female.sum(0)[:, None]


def keep_top_latents(delta: Tensor, latents: int) -> Tensor:
    """Zero all but the ``latents`` entries of largest magnitude in each row (0 keeps all)."""
    if latents <= 0 or latents >= delta.shape[-1]:
        return delta
    idx = delta.abs().topk(latents, dim=-1).indices
    return torch.zeros_like(delta).scatter(-1, idx, delta.gather(-1, idx))


def unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class DirectionBank:
    """Unit gender directions per profession, a global fallback and the projection origin.

    Args:
        directions: ``{profession: (d,) direction}`` (normalised here).
        fallback: (d,) direction for prompts with no known profession; ``None`` makes them an error.
        origin: (d,) point the projection is taken about (0 for the plain projection).
        scales: ``{profession: ||v_p||}`` (the gender gap the direction was decoded from; used by
            ``mode: subtract``); default 1.
    """

    def __init__(self, directions: dict[str, Tensor], fallback: Tensor | None = None, origin: Tensor | None = None,
                 scales: dict[str, float] | None = None) -> None:
        if not directions:
            raise ValueError("a direction bank needs at least one profession")
        self.directions = {p: unit(v.detach().float()) for p, v in directions.items()}
        self.dim = next(iter(self.directions.values())).shape[-1]
        self.fallback = None if fallback is None else unit(fallback.detach().float())
        self.origin = torch.zeros(self.dim) if origin is None else origin.detach().float()
        self.scales = {p: float((scales or {}).get(p, 1.0)) for p in self.directions}
        # Longest names first, so "nurse practitioner" wins over "nurse"; whole words only.
        names = sorted(self.directions, key=len, reverse=True)
        self._pattern = re.compile(r"\b(" + "|".join(re.escape(n) for n in names) + r")s?\b", re.IGNORECASE)

    @property
    def professions(self) -> list[str]:
        return list(self.directions)

    def profession_of(self, prompt: str) -> str | None:
        match = self._pattern.search(prompt)
        return None if match is None else match.group(1).lower()

    def direction(self, profession: str | None, prompt: str = "") -> tuple[Tensor, float]:
        """(unit direction, scale) for ``profession`` (``None``: looked up in ``prompt``), else the fallback."""
        name = profession.lower() if profession else self.profession_of(prompt)
        if name in self.directions:
            return self.directions[name], self.scales[name]
        if self.fallback is None:
            raise ValueError(f"profession {name or prompt!r} is not in the direction bank ({', '.join(self.directions)}) "
                             "and it has no fallback: build it with fallback: global")
        return self.fallback, float(sum(self.scales.values()) / len(self.scales))

    def save(self, path: str | Path) -> Path:
        """One safetensors file; profession names and scales in its metadata."""
        tensors = {f"direction.{i}": v for i, v in enumerate(self.directions.values())}
        tensors["origin"] = self.origin
        if self.fallback is not None:
            tensors["fallback"] = self.fallback
        meta = {"professions": json.dumps(self.professions), "scales": json.dumps(self.scales)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> DirectionBank:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            meta = handle.metadata()
        tensors = load_file(str(path))
        names = json.loads(meta["professions"])
        return cls({n: tensors[f"direction.{i}"] for i, n in enumerate(names)}, tensors.get("fallback"),
                   tensors["origin"], json.loads(meta["scales"]))


def bank_from_deltas(delta: Tensor, basis: Tensor | None, professions: list[str], origin: Tensor,
                     fallback: bool = True) -> DirectionBank:
    """Bank from (P, D) per-profession differences mapped to residual space by ``basis`` (D, d) (Eq. D2-D4)."""
    vectors = delta if basis is None else delta @ basis
    glob = delta.mean(0, keepdim=True)
    glob_v = (glob if basis is None else glob @ basis)[0]
    return DirectionBank(dict(zip(professions, vectors)), glob_v if fallback else None, origin,
                         {p: float(v.norm()) for p, v in zip(professions, vectors)})


def random_latent_bank(basis: Tensor, professions: list[str], origin: Tensor, latents: int, scale: float,
                       generator: torch.Generator) -> DirectionBank:
    """Control: per profession a random signed combination of ``latents`` dictionary rows of ``basis``."""
    rows = []
    for _ in professions:
        idx = torch.randperm(basis.shape[0], generator=generator)[:latents]
        signs = torch.randint(0, 2, (latents,), generator=generator).float() * 2 - 1
        rows.append(signs @ basis[idx])
    return DirectionBank(dict(zip(professions, rows)), torch.stack(rows).mean(0), origin,
                         {p: scale for p in professions})


def concat_banks(parts: list[DirectionBank | int]) -> DirectionBank:
    """One bank over several text encoders' concatenated widths (SDXL: CLIP-L then OpenCLIP-bigG), from one bank
    per encoder; an int is the width of an encoder left unedited (a zero slice, which the hook skips)."""
    banks = [p for p in parts if isinstance(p, DirectionBank)]
    if not banks:
        raise ValueError("concat_banks needs at least one direction bank")
    names = banks[0].professions
    if any(b.professions != names for b in banks):
        raise ValueError(f"the banks cover different professions: {[b.professions for b in banks]}; "
                         "train every encoder's SAE on the same corpus")

    def joined(get) -> Tensor:
        return torch.cat([torch.zeros(p) if isinstance(p, int) else get(p) for p in parts])

    directions = {n: joined(lambda b, n=n: b.directions[n]) for n in names}
    has_fallback = all(b.fallback is not None for b in banks)
    fallback = joined(lambda b: b.fallback) if has_fallback else None
    origin = joined(lambda b: b.origin)
    scales = {n: sum(b.scales[n] ** 2 for b in banks) ** 0.5 for n in names}
    return DirectionBank(directions, fallback, origin, scales)
