"""TopK sparse autoencoder (Gao et al. 2024, openai/sparse_autoencoder) with SAELens' parameter layout.

Encoder  z = TopK_k(ReLU((x - b_dec) W_enc + b_enc))   (k largest pre-activations kept, the rest zero)
Decoder  x_hat = z W_dec + b_dec                        (rows of W_dec unit-norm)
Loss     mse_scale * MSE(x_hat, x) + auxk_coef * NMSE(e_hat, x - x_hat)     (e_hat: AuxK on dead latents)

SAELens mapping (``sae_weights.safetensors`` + ``cfg.json`` of SAELens' ``topk`` architecture):
``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in]; the openai
"pre-bias" b_pre is ``b_dec`` (subtracted from the input, ``apply_b_dec_to_input: true``), openai's
latent bias is ``b_enc``; openai's ``encoder.weight`` is ``W_enc.T`` and ``decoder.weight`` is ``W_dec.T``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"


def geometric_median(points: Tensor, max_iter: int = 100, tol: float = 1e-5) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the summed euclidean distance to ``points`` (N, d)."""
    median = points.mean(0)
    for _ in range(max_iter):
        weights = 1.0 / (points - median).norm(dim=1).clamp_min(1e-8)
        updated = (weights[:, None] * points).sum(0) / weights.sum()
        if (updated - median).norm() <= tol * median.norm().clamp_min(1e-8):
            return updated
        median = updated
    return median


class TopKSAE(nn.Module):
    """k-sparse autoencoder on d_in-dimensional vectors with d_sae = expansion * d_in latents.

    Args:
        d_in: width of the features it reads.
        expansion: d_sae / d_in (Concept Steerers: 4).
        k: latents kept per vector (Concept Steerers: 32).
        auxk: dead latents the AuxK loss reconstructs the residual with (openai: 256).
        auxk_coef: weight of the AuxK loss (openai: 1/32).
        dead_tokens: a latent that has not fired (> 1e-3) on this many vectors counts as dead.
        hook_name: where the features come from (written to ``cfg.json``).
        model_name: the model they come from (written to ``cfg.json``).
    """

    def __init__(self, d_in: int, expansion: int = 4, k: int = 32, auxk: int = 256, auxk_coef: float = 1 / 32,
                 dead_tokens: int = 10_000_000, hook_name: str = "", model_name: str = "") -> None:
        super().__init__()
        if k < 1 or k > expansion * d_in:
            raise ValueError(f"k={k}: needs 1 <= k <= expansion * d_in = {expansion * d_in}")
        self.d_in, self.d_sae, self.k = d_in, expansion * d_in, k
        self.auxk, self.auxk_coef, self.dead_tokens = min(auxk, self.d_sae), auxk_coef, dead_tokens
        self.hook_name, self.model_name = hook_name, model_name
        w = torch.empty(d_in, self.d_sae)
        nn.init.kaiming_uniform_(w)
        self.W_enc = nn.Parameter(w)
        self.b_enc = nn.Parameter(torch.zeros(self.d_sae))
        self.W_dec = nn.Parameter(w.T.clone())  # tied initialisation, then unit rows
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.normalize_decoder()
        self.register_buffer("tokens_since_fired", torch.zeros(self.d_sae, dtype=torch.long))
        self.register_buffer("mse_scale", torch.ones(()))

    @torch.no_grad()
    def initialize(self, sample: Tensor) -> None:
        """Data-dependent init from (N, d_in) vectors: b_dec at their geometric median, the MSE scaled by
        their variance (so the loss is a fraction of variance unexplained), W_enc rescaled so that a
        typical centred input is reconstructed at its own norm (openai's init)."""
        self.b_dec.copy_(geometric_median(sample))
        centred = sample - sample.mean(0)
        self.mse_scale.copy_(1.0 / centred.pow(2).sum(1).mean().clamp_min(1e-12) * self.d_in)
        x = sample - self.b_dec
        gain = x.norm(dim=1).mean() / self.decode(self.encode(sample)).sub(self.b_dec).norm(dim=1).mean()
        self.W_enc.mul_(gain.clamp(1e-3, 1e3))

    def pre_activations(self, x: Tensor) -> Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """(..., d_in) -> (..., d_sae) with exactly k non-negative values kept (the rest zero)."""
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values.relu())

    def encode_dense(self, x: Tensor) -> Tensor:
        """ReLU codes without top-k (Concept Steerers' ``encode_without_topk`` used for steering)."""
        return self.pre_activations(x).relu()

    def decode(self, z: Tensor) -> Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def loss(self, x: Tensor, weight: Tensor | None = None, target_offset: bool = False) -> dict[str, Tensor]:
        """Training loss on (N, d_in) vectors; also updates the dead-latent counters.

        Args:
            x: the feature vectors.
            weight: (N,) 1 for real tokens, 0 for padding (masked instead of dropped: no host sync).
            target_offset: Concept Steerers' released behaviour, which compares x_hat with x - b_dec
                instead of x (see the method notes); default off (openai: reconstruct x).
        """
        weight = torch.ones(x.shape[0], device=x.device) if weight is None else weight.to(x.dtype)
        n = weight.sum().clamp_min(1.0)
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
        x_hat = self.decode(z)
        target = x - self.b_dec if target_offset else x
        mse = ((x_hat - target).pow(2).sum(-1) * weight).sum() / n / self.d_in
        fired = ((z > 1e-3) & (weight[:, None] > 0)).any(0)
        self.tokens_since_fired.add_(weight.sum().long()).masked_fill_(fired, 0)
        # AuxK: the k_aux largest pre-activations among dead latents reconstruct the residual error.
        dead = self.tokens_since_fired > self.dead_tokens
        aux_pre = pre.masked_fill(~dead, float("-inf"))
        aux_values, aux_indices = aux_pre.topk(self.auxk, dim=-1)
        aux_z = torch.zeros_like(pre).scatter(-1, aux_indices, aux_values.relu().nan_to_num(0.0))
        residual = (target - x_hat).detach()
        aux_hat = aux_z @ self.W_dec
        centred = residual - (residual * weight[:, None]).sum(0) / n
        nmse = ((aux_hat - residual).pow(2).sum(-1) * weight).sum() / (centred.pow(2).sum(-1) * weight).sum()
        auxk = nmse.nan_to_num(0.0) * dead.any()
        return {"loss": self.mse_scale * mse + self.auxk_coef * auxk, "mse": mse, "auxk": auxk,
                "dead_fraction": dead.float().mean(), "l0": ((z > 0).sum(-1) * weight).sum() / n}

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Project out of W_dec's gradient its component along each (unit) decoder row."""
        if self.W_dec.grad is not None:
            along = (self.W_dec.grad * self.W_dec).sum(1, keepdim=True)
            self.W_dec.grad.sub_(along * self.W_dec)

    def sae_state_dict(self) -> dict[str, Tensor]:
        """The four SAELens tensors (no training buffers)."""
        return {name: getattr(self, name).detach().contiguous() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}

    def cfg(self) -> dict:
        """SAELens ``cfg.json`` (the v6 keys plus the legacy ``activation_fn_*`` ones older loaders read)."""
        return {"architecture": "topk", "d_in": self.d_in, "d_sae": self.d_sae, "k": self.k,
                "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
                "activation_fn_str": "topk", "activation_fn_kwargs": {"k": self.k},
                "hook_name": self.hook_name, "model_name": self.model_name,
                "metadata": {"hook_name": self.hook_name, "model_name": self.model_name},
                "litzoo": {"auxk": self.auxk, "auxk_coef": self.auxk_coef, "dead_tokens": self.dead_tokens}}

    def save(self, folder: str | Path) -> Path:
        """Write ``sae_weights.safetensors`` and ``cfg.json`` into ``folder`` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(self.sae_state_dict(), str(folder / WEIGHTS_FILE))
        (folder / CFG_FILE).write_text(json.dumps(self.cfg(), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TopKSAE:
        """Read an SAE written by :meth:`save` or by SAELens (``topk`` architecture)."""
        folder = Path(folder)
        cfg = json.loads((folder / CFG_FILE).read_text())
        k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
        if cfg.get("architecture", "topk") != "topk" or k is None:
            raise ValueError(f"{folder / CFG_FILE}: not a TopK SAE (architecture {cfg.get('architecture')!r})")
        extra = cfg.get("litzoo", {})
        meta = cfg.get("metadata", {})
        sae = cls(cfg["d_in"], cfg["d_sae"] // cfg["d_in"], int(k), **extra,
                  hook_name=cfg.get("hook_name") or meta.get("hook_name", ""),
                  model_name=cfg.get("model_name") or meta.get("model_name", ""))
        state = load_file(str(folder / WEIGHTS_FILE))
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if state[name].shape != getattr(sae, name).shape:
                raise ValueError(f"{folder / WEIGHTS_FILE}: {name} has shape {tuple(state[name].shape)}, "
                                 f"cfg.json implies {tuple(getattr(sae, name).shape)}")
            getattr(sae, name).data.copy_(state[name])
        return sae
