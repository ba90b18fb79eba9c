"""What every adapter method shares: which parts of the model train, the base-model fingerprint, the layer protocol."""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .backbones import LINEARS, backbone_of

__all__ = [
    "VIT_LINEARS",
    "AdapterLayer",
    "freeze_for_adapter",
    "parameter_digests",
    "base_fingerprint",
    "count_trainable",
    "trainable_groups",
    "unfreeze",
    "check_rank",
    "check_choices",
    "options_dict",
]

# The transformer linears every matrix method adapts, by UNETR's names (paths inside ``vit.blocks.N``; Swin UNETR's
# ``attn.proj`` is called ``attn.out_proj``): the same weights tCURLoRA stacks.
VIT_LINEARS = LINEARS


class AdapterLayer(nn.Module):
    """A layer that wraps one frozen module (``base_layer``) and adds ``adapter_output(x)`` unless merged.

    Subclasses implement ``adapter_output`` (the update applied to x without forming ΔW where possible), ``merge``
    (fold ΔW into the base weight, so the layer costs the base) and ``unmerge``.
    """

    merged: bool = False

    def adapter_output(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.adapter_output(x).to(y.dtype)

    def merge(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def unmerge(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class ForwardCachedGroup(nn.Module):
    """Tensors shared by many wrapped linears whose derived factors are computed once per forward pass of the model.

    Every linear of a group needs the same factors (e.g. tCURLoRA's V = U ∗ R for 48 attention slices), so one
    autograd node serves them all. The cache is dropped by ``clear_forward_caches`` (a forward pre-hook on the model)
    and whenever a trainable tensor changes (optimizer step, load), the device or the grad mode differs, or a backward
    pass has gone through them, so stale or graph-less factors are never used.
    """

    def __init__(self) -> None:
        super().__init__()
        # one entry per grad mode: within one pass some linears may take their factors with autograd and others
        # without (tCURLoRA's fused path forms ΔW inside its own autograd node), and neither should evict the other
        self._cache: dict[tuple, tuple] = {}

    def cached(self, params: tuple[Tensor, ...], compute: Callable[[], Any]) -> Any:
        grad_mode = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        key = (tuple(p._version for p in params), params[0].device)
        entry = self._cache.get(grad_mode)
        if entry is None or entry[0] != key:
            entry = self._cache[grad_mode] = (key, compute())
            self._drop_after_backward(grad_mode, key, entry[1])
        return entry[1]

    def _drop_after_backward(self, grad_mode: tuple, key: tuple, value: Any) -> None:
        """Once a backward pass has gone through the factors, their graph is freed: drop them, so that the next call
        computes them again. The model's pre-hook does that for ``model(x)``; this covers a submodule called on its own
        twice (``model.swinViT(x)``), which would otherwise backpropagate into the first pass's freed graph."""
        ref = weakref.ref(self)  # no cycle through the tensor's hook: the group and its factors free as usual

        def drop(_grad: Tensor) -> None:
            group = ref()
            if group is not None and group._cache.get(grad_mode, (None,))[0] == key:
                del group._cache[grad_mode]

        for tensor in value if isinstance(value, tuple) else (value,):
            if isinstance(tensor, Tensor) and tensor.requires_grad:
                tensor.register_hook(drop)

    def clear_cache(self) -> None:
        self._cache = {}


def clear_forward_caches(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of an adapted model: every group computes its factors afresh, once, in this pass."""
    for module in model.modules():
        if isinstance(module, ForwardCachedGroup):
            module.clear_cache()


def freeze_for_adapter(model: nn.Module, *, train_decoder: bool = True, train_out: bool = False) -> None:
    """Freeze everything, then unfreeze the decoder (UNETR ``decoder2..5``, Swin UNETR ``decoder1..5``) and, if asked,
    the ``out`` head.

    The ``out`` head is frozen in the paper's code; it must train when the target's class count differs from the source.
    """
    backbone = backbone_of(model)
    model.requires_grad_(False)
    trainable = (backbone.decoder if train_decoder else ()) + (("out",) if train_out else ())
    for name in trainable:
        module = getattr(model, name, None)
        if module is None:
            raise ValueError(f"{type(model).__name__} has no `{name}` module: adapters expect a MONAI {backbone.name}")
        module.requires_grad_(True)


def _plain_name(name: str) -> str:
    """Parameter name as before wrapping: our layers and peft's both keep the frozen linear as ``base_layer``."""
    return name.replace(".base_layer", "")


@torch.no_grad()
def parameter_digests(model: nn.Module) -> dict[str, bytes]:
    """SHA-256 of each parameter (name, shape, dtype, bytes), keyed by its unwrapped name.

    Taken before an adapter is applied, so that methods that rewrite the frozen weights (PiSSA and LoRA-PT keep a
    residual) still fingerprint the pretrained values.
    """
    digests = {}
    for name, param in model.named_parameters():
        name = _plain_name(name)
        digest = hashlib.sha256(f"{name}:{tuple(param.shape)}:{param.dtype}".encode())
        digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        digests[name] = digest.digest()
    return digests


@torch.no_grad()
def base_fingerprint(model: nn.Module, pretrained: dict[str, bytes] | None = None) -> str:
    """SHA-256 over the frozen parameters: identifies the base an adapter was trained on.

    ``pretrained`` = ``parameter_digests`` taken before the adapter was applied: the fingerprint then means "the
    pretrained values of every weight the adapter file does not carry", whatever the method did to them since.
    Without it the current values are hashed (equal to the pretrained ones for all methods but PiSSA and LoRA-PT).
    Names are taken as before wrapping, so the value does not depend on the wrapper. Under full fine-tuning nothing
    is frozen and the fingerprint is that of the empty set: the file carries the whole model.
    """
    known = pretrained or {}
    current: dict[str, bytes] | None = None  # hashed lazily: only for tensors the pretrained digests lack
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if param.requires_grad:
            continue
        name = _plain_name(name)
        if name not in known and current is None:
            current = parameter_digests(model)
        digest.update(known[name] if name in known else current[name])
    return digest.hexdigest()


def unfreeze(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Make the modules ``names`` (top-level or dotted, e.g. ``encoder1``, ``vit.patch_embedding``) train fully."""
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            tops = [n for n, _ in model.named_children()]
            transformer = backbone_of(model).transformer
            dotted = [f"{transformer}.{n}" for n, _ in model.get_submodule(transformer).named_children()][:2]
            raise ValueError(f"peft.train_extra: {type(model).__name__} has no module {name!r}; name modules such as "
                             f"{', '.join(tops)} or dotted ones ({', '.join(dotted)})") from None
        module.requires_grad_(True)
    return names


def trainable_groups(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(the method's own tensors, the head's) among the trainable parameters, for two optimizer groups.

    The head is the decoder (``backbones``: UNETR ``decoder2..5``, Swin UNETR ``decoder1..5``) and ``out``, which every
    method trains alike, and the modules of ``train_extra``; the method's own tensors are every other trainable
    parameter: tCURLoRA's / CURLoRA's U, peft's LoRA / DoRA / LoHa / LoKr factors, LoRA-PT's factors and, under full
    fine-tuning, everything the other methods freeze (transformer, patch embedding, skip encoders). Decided by module,
    not by parameter name, so a new method needs no entry here. ``model`` may be wrapped (DDP: ``.module``).
    """
    base = getattr(model, "module", model)
    extra = (getattr(base, "adapter_config", None) or {}).get("options", {}).get("train_extra", [])
    decoder = backbone_of(base).decoder
    head = {id(p) for name in decoder + ("out",) if hasattr(base, name) for p in getattr(base, name).parameters()}
    head |= {id(p) for name in extra for p in base.get_submodule(name).parameters()}
    trainable = [p for p in base.parameters() if p.requires_grad]
    return [p for p in trainable if id(p) not in head], [p for p in trainable if id(p) in head]


def count_trainable(model: nn.Module) -> int:
    """Number of parameters that receive gradients."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_rank(rank: object) -> None:
    """``peft.rank`` must be a positive int (bool is an int in Python: refuse it)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"peft.rank must be a positive integer, got {rank!r}")


def check_choices(key: str, values: tuple, choices: tuple) -> tuple:
    """A non-empty tuple of distinct ``values`` from ``choices``; the message names ``peft.<key>``."""
    values = (values,) if isinstance(values, str) else tuple(values)
    unknown = [v for v in values if v not in choices]
    if not values or unknown or len(set(values)) != len(values):
        raise ValueError(f"peft.{key} must list distinct entries from {list(choices)}, got {list(values)}")
    return values


def options_dict(config) -> dict:
    """A config dataclass as plain types (tuples as lists), so options travel inside a ``weights_only`` checkpoint."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}
