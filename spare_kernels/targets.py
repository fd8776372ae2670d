"""Which layers a target spec names: the one matching rule that ``patch``, ``SaliencyCollector`` and the
recipe share (peft's semantics), and the denoiser families whose presets it resolves.

A family lists its layers by peft-style name suffixes (a qualified name equals an entry or ends with
``"." + entry``), in four groups: ``attention`` (every attention projection, both streams), ``mlp``
(the feed-forward layers), ``modulation`` (AdaLN / adaLN-single / time and pooled-text embeddings:
in no preset unless named) and ``other`` (every remaining Linear/Conv2d, listed so that a test can
classify every layer of the real diffusers class: a diffusers rename fails it). ``cross`` names the
attention *modules* whose parameters ESD-x fine-tunes (image tokens attending to text).

Presets: ``"attention"``, ``"attention+mlp"``, ``"all"``. For ``"unet"`` (and ``"generic"``) ``"all"``
is every Linear and Conv2d (SPARE's meaning, unchanged). For the transformer families ``"all"`` is
every Linear and Conv2d except the modulation layers (and Sana's depthwise conv): the patch and
caption embedders and the final ``proj_out`` are in. In transformer families the attention, MLP and
cross entries match inside the blocks only (``transformer_blocks.<i>.`` / ``single_transformer_blocks.
<i>.``): Flux's single-block ``proj_out`` is an attention output projection, the model's own
``proj_out`` (to latent channels) is not.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

from torch import nn

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
PRESETS = ("attention", "attention+mlp", "all")
Targets = Union[None, str, list, tuple, set, frozenset, Callable[[str, nn.Module], bool]]


@dataclass(frozen=True)
class Family:
    """One denoiser family's layers by name suffix (see the module docstring)."""
    classes: Tuple[str, ...]      # diffusers class names, matched on the model's MRO
    blocks: Tuple[str, ...]       # ModuleLists of blocks: attention/mlp/cross match inside them; () = anywhere
    attention: Tuple[str, ...]
    mlp: Tuple[str, ...]
    modulation: Tuple[str, ...]
    other: Tuple[str, ...]
    cross: Tuple[str, ...]
    no_preset: Tuple[str, ...] = ()   # layers of no group's preset, adapted only when named
    all_is_every_layer: bool = False  # "all" = every Linear/Conv2d, modulation included (the UNet's)


_TIME = ("timestep_embedder.linear_1", "timestep_embedder.linear_2")
_GUIDANCE = ("guidance_embedder.linear_1", "guidance_embedder.linear_2")
_FF = ("ff.net.0.proj", "ff.net.2")
_FF_CONTEXT = ("ff_context.net.0.proj", "ff_context.net.2")
# Joint (MMDiT) attention: the image stream's projections and the text stream's (add_*, to_add_out).
_JOINT = ATTENTION_TARGETS + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

FAMILIES: Dict[str, Family] = {
    # SD-1.x/2.x, SDXL, MiniCanvas: diffusers' UNet2DConditionModel.
    "unet": Family(
        classes=("UNet2DConditionModel",), blocks=(),
        attention=ATTENTION_TARGETS,
        mlp=_FF,   # GEGLU's proj and the output Linear
        modulation=("time_embedding.linear_1", "time_embedding.linear_2", "time_emb_proj",
                    "add_embedding.linear_1", "add_embedding.linear_2"),   # add_embedding: SDXL's micro-conditions
        other=("conv_in", "conv_out", "conv1", "conv2", "conv_shortcut", "proj_in", "proj_out",
               "downsamplers.0.conv", "upsamplers.0.conv"),
        cross=("attn2",), all_is_every_layer=True),
    # SD3 and SD3.5: joint blocks (attn over image + text tokens); SD3.5-medium's first blocks add attn2,
    # image-only self-attention, in the attention group but not in cross. The last block is
    # context_pre_only (no to_add_out, no ff_context).
    "sd3": Family(
        classes=("SD3Transformer2DModel",), blocks=("transformer_blocks",),
        attention=_JOINT,
        mlp=_FF + _FF_CONTEXT,
        modulation=("norm1.linear", "norm1_context.linear", "norm_out.linear") + _TIME
        + ("text_embedder.linear_1", "text_embedder.linear_2"),   # the pooled text joins the timestep embedding
        other=("pos_embed.proj", "context_embedder", "proj_out"),
        cross=("attn",)),
    # Flux: double blocks as SD3's; single blocks run attention (to_q/to_k/to_v, no to_out) and an MLP
    # (proj_mlp) side by side and project their concatenation with one proj_out: the attention's output
    # projection fused with the MLP's second Linear. It is in the attention group (it carries the
    # attention output), so "attention" adapts it and "attention+mlp" adds proj_mlp.
    "flux": Family(
        classes=("FluxTransformer2DModel",), blocks=("transformer_blocks", "single_transformer_blocks"),
        attention=_JOINT + ("proj_out",),
        mlp=_FF + _FF_CONTEXT + ("proj_mlp",),
        modulation=("norm1.linear", "norm1_context.linear", "norm.linear", "norm_out.linear") + _TIME + _GUIDANCE
        + ("text_embedder.linear_1", "text_embedder.linear_2"),
        other=("x_embedder", "context_embedder", "proj_out"),
        cross=("attn",)),   # double and single blocks: every block's attention sees image and text tokens
    # PixArt-alpha/-Sigma: attn1 self-attention, attn2 cross-attention; adaLN-single (one modulation
    # Linear for the whole model, per-block scale_shift_table parameters).
    "pixart": Family(
        classes=("PixArtTransformer2DModel",), blocks=("transformer_blocks",),
        attention=ATTENTION_TARGETS,
        mlp=_FF,
        modulation=("adaln_single.linear",) + _TIME
        + ("resolution_embedder.linear_1", "resolution_embedder.linear_2",        # PixArt-alpha 1024's
           "aspect_ratio_embedder.linear_1", "aspect_ratio_embedder.linear_2"),  # micro-conditions
        other=("pos_embed.proj", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"),
        cross=("attn2",)),
    # Sana: attn1 linear self-attention, attn2 cross-attention; the MLP is GLUMBConv on the token grid:
    # a 1x1 conv to 2x hidden (the GLU's value and gate), a depthwise 3x3 conv, a 1x1 conv back.
    "sana": Family(
        classes=("SanaTransformer2DModel",), blocks=("transformer_blocks",),
        attention=ATTENTION_TARGETS,
        mlp=("ff.conv_inverted", "ff.conv_point"),
        modulation=("time_embed.linear",) + _TIME + _GUIDANCE,   # guidance: Sana-Sprint
        other=("patch_embed.proj", "caption_projection.linear_1", "caption_projection.linear_2", "proj_out"),
        cross=("attn2",),
        # The depthwise conv (groups = channels, 9 weights per channel): peft's conv LoRA on it stays
        # unfused (the fused layers take groups=1) and refuses masks, and a rank-r delta of a C x 9
        # weight saves nothing. Adapted only when named.
        no_preset=("ff.conv_depth",)),
}
# Anything else: today's rule (attention = to_q/to_k/to_v/to_out.0; "attention+mlp" and "all" every layer).
GENERIC = Family(classes=(), blocks=(), attention=ATTENTION_TARGETS, mlp=(), modulation=(), other=(),
                 cross=("attn2",), all_is_every_layer=True)
FAMILY_NAMES = tuple(FAMILIES) + ("generic",)
GROUPS = ("attention", "mlp", "modulation", "other", "no_preset")


def _entry_hit(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def _family(family: str, where: str = "family") -> Family:
    if family == "generic":
        return GENERIC
    if family not in FAMILIES:
        raise ValueError(f"{where}: expected one of {FAMILY_NAMES}, got {family!r}")
    return FAMILIES[family]


def _matcher(fam: Family, entries: Iterable[str]) -> Callable[[str], bool]:
    """name -> whether it matches one of ``entries``, inside one of ``fam.blocks`` when it has blocks."""
    entries = tuple(entries)
    if not entries:
        return lambda name: False
    if not fam.blocks:
        return lambda name: any(_entry_hit(name, e) for e in entries)
    rx = re.compile(r"(?:.*\.)?(?:%s)\.\d+\.(?:.*\.)?(?:%s)" % (
        "|".join(map(re.escape, fam.blocks)), "|".join(map(re.escape, entries))))
    return lambda name: rx.fullmatch(name) is not None


def _anywhere(entries: Iterable[str]) -> Callable[[str], bool]:
    entries = tuple(entries)
    return lambda name: any(_entry_hit(name, e) for e in entries)


def layer_group(family: str, name: str) -> Optional[str]:
    """The group of ``family``'s table that the layer ``name`` belongs to (one of :data:`GROUPS`), or
    None where the table does not list it. Modulation and ``no_preset`` first (they match anywhere),
    then attention, mlp (inside the blocks for transformer families), then other."""
    fam = _family(family)
    if _anywhere(fam.modulation)(name):
        return "modulation"
    if _anywhere(fam.no_preset)(name):
        return "no_preset"
    if _matcher(fam, fam.attention)(name):
        return "attention"
    if _matcher(fam, fam.mlp)(name):
        return "mlp"
    if _anywhere(fam.other)(name):
        return "other"
    return None


def preset_entries(family: str, preset: str) -> Tuple[str, ...]:
    """The name suffixes of a list-valued preset (``"attention"``, and ``"attention+mlp"`` except for
    ``"generic"``). In a transformer family :func:`target_predicate` matches them inside the blocks
    only; as a plain peft ``target_modules`` list, Flux's ``proj_out`` would also hit the model's final
    projection."""
    fam = _family(family)
    if preset == "attention":
        return fam.attention
    if preset == "attention+mlp" and family != "generic":
        return fam.attention + fam.mlp
    if preset in PRESETS:
        raise ValueError(f"preset: {preset!r} of family {family!r} is not a list of names (every Linear/Conv2d"
                         f"{'' if fam.all_is_every_layer else ' except the modulation layers'}); "
                         "use target_predicate")
    raise ValueError(f"preset: expected one of {PRESETS}, got {preset!r}")


def _preset_predicate(family: str, preset: str) -> Callable[[str, Optional[nn.Module]], bool]:
    fam = _family(family)
    if preset == "all" or (preset == "attention+mlp" and family == "generic"):
        if fam.all_is_every_layer:
            return lambda name, m: True
        out = _anywhere(fam.modulation + fam.no_preset)
        return lambda name, m: not out(name)
    hit = _matcher(fam, preset_entries(family, preset))
    return lambda name, m: hit(name)


def target_predicate(spec: Targets, default: str = "attention", where: str = "target_modules",
                     family: str = "unet") -> Callable[[str, Optional[nn.Module]], bool]:
    """``pred(qualified_name, module) -> bool`` for ``spec``:

    - ``None``: the preset ``default``;
    - presets ``"attention"`` (SPARE's choice on a UNet: ``to_q``/``to_k``/``to_v``/``to_out.0``),
      ``"attention+mlp"`` and ``"all"``, resolved for ``family`` (one of :data:`FAMILY_NAMES`, see
      :data:`FAMILIES`; :func:`family_of` gives a model's);
    - any other string: a regex that must ``re.fullmatch`` the whole qualified name;
    - a list/tuple/set of names: a qualified name equal to an entry or ending in ``"." + entry``;
    - a callable ``(name, module) -> bool``, used as it is.

    Bad specs raise with ``where`` (the argument's name, as the caller knows it) in the message."""
    _family(family)
    if spec is None:
        spec = default
    if isinstance(spec, str) and spec in PRESETS:
        return _preset_predicate(family, spec)
    if callable(spec):
        return spec
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{where}: invalid regex {spec!r}: {e}") from None
        return lambda name, m: rx.fullmatch(name) is not None
    if isinstance(spec, (list, tuple, set, frozenset)) and all(isinstance(t, str) for t in spec):
        entries = tuple(spec)
        return lambda name, m: any(_entry_hit(name, t) for t in entries)
    raise TypeError(f"{where}: expected None, a preset {PRESETS}, a regex string, a list of names or a "
                    f"callable(name, module), got {spec!r}")


def unmatched_entries(spec: Targets, names: Iterable[str]) -> List[str]:
    """The entries of a list spec that match none of ``names`` (empty for other specs)."""
    if not isinstance(spec, (list, tuple, set, frozenset)):
        return []
    names = list(names)
    return [e for e in spec if isinstance(e, str) and not any(_entry_hit(n, e) for n in names)]


def _unwrapped(model):
    """The denoiser inside torch.compile's and peft's wrappers (patch and inject_adapter_in_model keep
    the model's own class)."""
    for _ in range(8):
        mro = {c.__name__ for c in type(model).__mro__}
        if "OptimizedModule" in mro and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif "PeftModel" in mro and callable(getattr(model, "get_base_model", None)):
            model = model.get_base_model()
        elif "BaseTuner" in mro and isinstance(getattr(model, "model", None), nn.Module):
            model = model.model
        else:
            break
    return model


def family_of(model) -> str:
    """The family name (a key of :data:`FAMILIES`) of ``model`` by its class or a base class's name,
    seen through torch.compile and peft wrappers; ``"generic"`` for anything else."""
    mro = [c.__name__ for c in type(_unwrapped(model)).__mro__]
    for name, fam in FAMILIES.items():
        if any(c in fam.classes for c in mro):
            return name
    return "generic"


def cross_attention_params(model: nn.Module) -> List[str]:
    """Names (``model.named_parameters()`` order) of the parameters of the attention modules where
    image tokens attend to text, the ones ESD-x fine-tunes: ``attn2`` in UNets, PixArt and Sana; each
    joint block's ``attn`` in SD3 (not SD3.5's ``attn2``, image self-attention); every double and single
    block's ``attn`` in Flux."""
    family = family_of(model)
    fam = _family(family)
    hit = _matcher(fam, fam.cross)
    prefixes = tuple(n + "." for n, _ in model.named_modules() if n and hit(n))
    names = [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]
    if not names:
        raise ValueError(f"model: the {family} model ({type(model).__name__}) has no cross-attention parameters "
                         f"(modules named {fam.cross}{' inside ' + str(fam.blocks) if fam.blocks else ''})")
    return names


__all__ = ["ATTENTION_TARGETS", "FAMILIES", "FAMILY_NAMES", "GENERIC", "GROUPS", "PRESETS", "Family", "Targets",
           "cross_attention_params", "family_of", "layer_group", "preset_entries", "target_predicate",
           "unmatched_entries"]
