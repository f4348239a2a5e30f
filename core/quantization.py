"""Data-free post-training fake quantisation of timm Vision Transformers (PSAQ-ViT "basic" PTQ).

The quantiser Sparse Model Inversion (SMI) calibrates with its inverted images (Li et al.,
"Patch Similarity Aware Data-Free Quantization for Vision Transformers", ECCV 2022, section 4,
"basic" min/max quantiser without reconstruction). Nothing is learned: weights are rounded
per output channel, activations per tensor with a range recorded on calibration images.

* Weights (every ``nn.Linear`` and ``nn.Conv2d``: patch-embed conv, qkv, proj, fc1, fc2, head):
  symmetric uniform k-bit per output channel (row of the weight reshaped to ``(C_out, -1)``);
  ``weight_granularity="tensor"`` uses one scale per layer instead (a harder setting, not PSAQ's).
* Activations: asymmetric uniform k-bit per tensor (:class:`QuantAct`), range = running global
  min/max over all calibration forwards, frozen afterwards. Per-tensor ranges make every
  quantiser valid for any sequence length N, so the model also runs on a token subset.
* LayerNorm, softmax, GELU, LayerScale stay float. Rounding uses a straight-through estimator
  (identity gradient), so the quantised model stays differentiable.

Where each activation quantiser lives in the model returned by :func:`quantize_vit` (the model
is still a timm ``VisionTransformer`` with the same attribute names, so callers that run
``patch_embed -> _pos_embed -> gather tokens -> blocks -> norm -> forward_head`` themselves get
every quantiser):

==================================  ==============================================================
input image                         ``patch_embed.proj.input_quant`` (``proj`` = input_quant, conv)
after patch + pos embedding         ``pos_drop.quant`` (``_pos_embed`` ends with ``pos_drop``; all
                                    tokens, i.e. before any token gather, as in SMI)
after norm1 / norm2                 ``blocks[i].norm1_quant`` / ``blocks[i].norm2_quant``
after qkv, pre-softmax scores,      ``blocks[i].attn.qkv_quant``, ``.score_quant``, ``.out_quant``
attn @ v, proj                      and ``.proj_quant``
after GELU (fc2 input, as PSAQ)     ``blocks[i].mlp_hidden_quant``
after the MLP (fc2 output)          ``blocks[i].mlp_out_quant``
after each residual add             ``blocks[i].add1_quant`` / ``blocks[i].add2_quant``
after the final norm                ``norm.quant`` (``norm`` = norm, quant)
logits                              ``head.quant`` (and ``head_dist.quant`` for distilled DeiT)
==================================  ==============================================================

Calibration is one context manager::

    qmodel = quantize_vit(model, weight_bits=4, act_bits=8)
    with torch.no_grad(), calibration(qmodel):
        for images in calib_batches:
            qmodel(images)            # or the piece-by-piece token-subset forward
    logits = qmodel(images)           # ranges frozen; before calibration this raises RuntimeError

Deviations from the PSAQ code: the range of the token sequence is one quantiser after pos-embed
(PSAQ has three: tokens, pos-embed, sum) and the patch-embed output is not quantised separately.
Load float checkpoints before quantising: the wrappers change ``state_dict`` key names.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Attention, Mlp, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from core.fake_quant import act_qparams, check_bits, fake_quant_act, fake_quant_weight

__all__ = [
    "QuantAct",
    "QuantAttention",
    "QuantBlock",
    "QuantConv2d",
    "QuantLinear",
    "act_qparams",
    "calibration",
    "fake_quant_act",
    "fake_quant_weight",
    "quantize_vit",
]

class QuantAct(nn.Module):
    """Per-tensor asymmetric activation fake quantiser with a recorded min/max range.

    While ``recording`` (inside :func:`calibration`) every call widens the range to the running
    global min/max and passes ``x`` through unquantised: ranges are those of the float network, as
    PSAQ-ViT and the SMI release record them (quantisation off), then quantisation is switched on.
    Outside calibration the range is frozen; using it before any range was recorded raises. Whether
    a range exists is a Python flag, so a forward never reads a tensor back to the host.

    Args:
        bits: Activation bit width k in [2, 16].
    """

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        self.bits = check_bits(bits, "act_bits")
        self.recording = False
        self.name = ""  # set by quantize_vit, for error messages
        self.register_buffer("x_min", torch.tensor(float("inf")))
        self.register_buffer("x_max", torch.tensor(float("-inf")))
        self.calibrated = False  # set when a calibration ends or a recorded range is loaded

    def reset(self) -> None:
        self.x_min.fill_(float("inf"))
        self.x_max.fill_(float("-inf"))
        self.calibrated = False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.calibrated = bool(torch.isfinite(self.x_min) & torch.isfinite(self.x_max))  # once, at load

    def forward(self, x: Tensor) -> Tensor:
        if self.recording:
            with torch.no_grad():
                self.x_min.copy_(torch.minimum(self.x_min, x.detach().amin().to(self.x_min)))
                self.x_max.copy_(torch.maximum(self.x_max, x.detach().amax().to(self.x_max)))
            return x  # float network while recording
        if not self.calibrated:
            raise RuntimeError(
                f"QuantAct {self.name or '(unnamed)'} has no activation range: calibrate the activation "
                "ranges first (run calibration images inside `with calibration(model): ...`)."
            )
        return fake_quant_act(x, self.x_min, self.x_max, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, range=[{self.x_min.item():.4g}, {self.x_max.item():.4g}]"


class _QuantWeight(nn.Module):
    """Fake-quantised weight of a layer, computed once while the weight is frozen.

    ``enabled`` is switched off by :func:`calibration` (ranges are recorded on the float network).
    The rounded weight is cached when the weight needs no gradient and re-made when it changes
    (a new tensor or an in-place update, seen through the tensor's version counter).
    """

    def _init_weight_quant(self, bits: int, per_channel: bool) -> None:
        self.bits = check_bits(bits, "weight_bits")
        self.per_channel = per_channel
        self.enabled = True
        self._cache: tuple[tuple[int, int, torch.device, torch.dtype], Tensor] | None = None

    def quant_weight(self) -> Tensor:
        w = self.weight
        if not self.enabled:
            return w
        if w.requires_grad and torch.is_grad_enabled():
            return fake_quant_weight(w, self.bits, self.per_channel)  # straight-through gradient to the float weight
        key = (id(w), w._version, w.device, w.dtype)
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, fake_quant_weight(w, self.bits, self.per_channel))
        return self._cache[1]


class QuantLinear(_QuantWeight):
    """``nn.Linear`` with symmetric fake-quantised weights (same parameters).

    Args:
        linear: The float layer; its ``weight`` and ``bias`` parameters are reused, not copied.
        bits: Weight bit width k in [2, 16].
        per_channel: One scale per output channel (PSAQ) or one per tensor.
    """

    def __init__(self, linear: nn.Linear, bits: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        self._init_weight_quant(bits, per_channel)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.quant_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, bits={self.bits}, "
                f"per_channel={self.per_channel}")


class QuantConv2d(_QuantWeight):
    """``nn.Conv2d`` with symmetric fake-quantised weights (same parameters).

    Args:
        conv: The float layer (``padding_mode="zeros"``); parameters are reused, not copied.
        bits: Weight bit width k in [2, 16].
        per_channel: One scale per output channel (PSAQ) or one per tensor.
    """

    def __init__(self, conv: nn.Conv2d, bits: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        if conv.padding_mode != "zeros":
            raise TypeError(f"QuantConv2d supports padding_mode='zeros' only, got {conv.padding_mode!r}")
        self._init_weight_quant(bits, per_channel)
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.padding, self.dilation, self.groups = (
            conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.quant_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, stride={self.stride}, bits={self.bits}"


class QuantAttention(nn.Module):
    """timm ``Attention`` with activation quantisers after qkv, on the scores, after attn@v and proj.

    Always computes attention explicitly (no fused SDPA) so the pre-softmax scores exist.

    Args:
        attn: The timm attention whose submodules (already weight-quantised) are reused.
        act_bits: Activation bit width.
    """

    def __init__(self, attn: Attention, act_bits: int = 8) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim, self.scale = (
            attn.num_heads, attn.head_dim, attn.attn_dim, attn.scale)
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm = attn.attn_drop, attn.norm
        self.proj, self.proj_drop = attn.proj, attn.proj_drop
        self.qkv_quant, self.score_quant, self.out_quant, self.proj_quant = (
            QuantAct(act_bits) for _ in range(4))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        qkv = self.qkv_quant(self.qkv(x)).reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = self.score_quant((q * self.scale) @ k.transpose(-2, -1))  # A = q k^T / sqrt(d)
        scores = maybe_add_mask(scores, resolve_self_attn_mask(N, scores, attn_mask, is_causal))
        out = self.attn_drop(scores.softmax(dim=-1)) @ v
        out = self.out_quant(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        return self.proj_drop(self.proj_quant(self.proj(self.norm(out))))


class QuantBlock(nn.Module):
    """Pre-norm timm ``Block`` quantising after norm1/norm2, the MLP and both residual adds.

    Args:
        block: The timm block whose submodules (already weight-quantised) are reused.
        act_bits: Activation bit width.
    """

    def __init__(self, block: Block, act_bits: int = 8) -> None:
        super().__init__()
        self.norm1, self.ls1, self.drop_path1 = block.norm1, block.ls1, block.drop_path1
        self.attn = QuantAttention(block.attn, act_bits)
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.norm1_quant, self.add1_quant, self.norm2_quant = (QuantAct(act_bits) for _ in range(3))
        self.mlp_hidden_quant, self.mlp_out_quant, self.add2_quant = (QuantAct(act_bits) for _ in range(3))

    def _mlp(self, x: Tensor) -> Tensor:
        m = self.mlp
        x = m.drop1(self.mlp_hidden_quant(m.act(m.fc1(x))))
        return m.drop2(self.mlp_out_quant(m.fc2(m.norm(x))))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        h = self.attn(self.norm1_quant(self.norm1(x)), attn_mask=attn_mask, is_causal=is_causal)
        x = self.add1_quant(x + self.drop_path1(self.ls1(h)))
        h = self._mlp(self.norm2_quant(self.norm2(x)))
        return self.add2_quant(x + self.drop_path2(self.ls2(h)))


def _then_quant(module: nn.Module, first: str, act_bits: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([(first, module), ("quant", QuantAct(act_bits))]))


def _check_supported(model: nn.Module) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"quantize_vit expects a timm VisionTransformer, got {type(model).__name__}")
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        for what, obj, cls in (("blocks", blk, Block), ("attn", attn, Attention), ("mlp", mlp, Mlp)):
            if type(obj) is not cls:
                raise TypeError(f"quantize_vit supports timm {cls.__name__} as block {i}'s {what}, "
                                f"got {type(obj).__name__}")
        if attn.gate is not None:
            raise TypeError(f"quantize_vit does not support gated Attention (block {i})")


def quantize_vit(model: VisionTransformer, weight_bits: int = 8, act_bits: int = 8,
                 weight_granularity: str = "channel") -> VisionTransformer:
    """Return a fake-quantised deep copy of a timm ViT/DeiT (the input model is left unchanged).

    Every ``nn.Linear``/``nn.Conv2d`` becomes a :class:`QuantLinear`/:class:`QuantConv2d`, each
    block a :class:`QuantBlock` (with a :class:`QuantAttention`), and :class:`QuantAct` modules are
    inserted at the points listed in the module docstring. Run :func:`calibration` before use.

    Args:
        model: A timm ``VisionTransformer`` (incl. distilled DeiT) with standard pre-norm blocks.
        weight_bits: Weight bit width in [2, 16] (4 and 8 in the papers).
        act_bits: Activation bit width in [2, 16] (8 in the papers).
        weight_granularity: ``channel`` (one weight scale per output channel, PSAQ) or ``tensor``
            (one per layer: a harder setting).

    Raises:
        TypeError: If ``model`` is not a timm ``VisionTransformer`` or has unsupported blocks.
        ValueError: If a bit width is outside [2, 16] or the granularity is unknown.
    """
    _check_supported(model)
    if weight_granularity not in ("channel", "tensor"):
        raise ValueError(f"weight_granularity must be 'channel' or 'tensor', got {weight_granularity!r}")
    per_channel = weight_granularity == "channel"
    check_bits(weight_bits, "weight_bits")
    check_bits(act_bits, "act_bits")
    qmodel = copy.deepcopy(model)
    for parent in list(qmodel.modules()):  # weights first, everywhere (shared by the wrappers below)
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, QuantLinear(child, weight_bits, per_channel))
            elif isinstance(child, nn.Conv2d):
                setattr(parent, name, QuantConv2d(child, weight_bits, per_channel))
    for i, blk in enumerate(qmodel.blocks):
        qmodel.blocks[i] = QuantBlock(blk, act_bits)
    pe = qmodel.patch_embed
    pe.proj = nn.Sequential(OrderedDict([("input_quant", QuantAct(act_bits)), ("conv", pe.proj)]))
    qmodel.pos_drop = _then_quant(qmodel.pos_drop, "drop", act_bits)
    qmodel.norm = _then_quant(qmodel.norm, "norm", act_bits)
    for head in ("head", "head_dist"):
        if isinstance(getattr(qmodel, head, None), QuantLinear):
            setattr(qmodel, head, _then_quant(getattr(qmodel, head), "linear", act_bits))
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantAct):
            m.name = name
    return qmodel


@contextlib.contextmanager
def calibration(model: nn.Module, reset: bool = True) -> Iterator[nn.Module]:
    """Record activation ranges of every :class:`QuantAct` in ``model`` during the ``with`` body.

    On entry the ranges are cleared (unless ``reset=False``, which widens the current ones), weight
    quantisation is switched off and every activation quantiser records the float network's range
    (PSAQ-ViT and the SMI release calibrate with quantisation off); on a normal exit quantisation is
    switched back on, the ranges are frozen and, under an initialised
    ``torch.distributed`` process group, reduced to the global min/max across ranks so every rank
    holds the same quantiser. Gradients are not disabled: wrap in ``torch.no_grad()`` as needed.

    Args:
        model: A model returned by :func:`quantize_vit` (or any module containing ``QuantAct``).
        reset: Start from empty ranges (True) or keep widening the recorded ones (False).

    Raises:
        ValueError: If ``model`` contains no ``QuantAct`` (it was not quantised).
    """
    quants = [m for m in model.modules() if isinstance(m, QuantAct)]
    if not quants:
        raise ValueError(f"{type(model).__name__} has no QuantAct modules: call quantize_vit(model) first")
    weights = [m for m in model.modules() if isinstance(m, _QuantWeight)]
    for q in quants:
        if reset:
            q.reset()
        q.recording = True
    for w in weights:
        w.enabled = False
    try:
        yield model
    finally:
        for q in quants:
            q.recording = False
        for w in weights:
            w.enabled = True
    if dist.is_available() and dist.is_initialized():
        for q in quants:
            dist.all_reduce(q.x_min, op=dist.ReduceOp.MIN)
            dist.all_reduce(q.x_max, op=dist.ReduceOp.MAX)
    for q in quants:  # one read-back per quantiser, at the end of calibration only
        q.calibrated = bool(torch.isfinite(q.x_min) & torch.isfinite(q.x_max))
