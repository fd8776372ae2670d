"""The MiniCanvas UNet (a standard diffusers ``UNet2DConditionModel`` in pixel space), its schedulers,
and loading/saving of the shipped weights (``weights/unet.safetensors`` + ``weights/unet.json``)."""
from __future__ import annotations

import json
import os

import torch

from ..utils.io import atomic_path, write_json
from .text import DIM, TextEncoder, make_tables

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

# Cross-attention only at 8x8 (the mid block and the 8x8 down/up blocks): at 16x16/32x32 the
# transformer blocks would dominate the CPU time. Note: diffusers' ``attention_head_dim`` is, for
# this class, the number of heads (2 heads of 32 channels at 64 channels). The prompt also reaches
# every ResNet block through diffusers' text-time embedding (attention-pooled prompt added to the
# timestep embedding, as in SDXL/Kandinsky): with cross-attention at 8x8 alone, a model this small
# drew the right texture on a blob of the wrong shape. It costs nothing measurable per step.
UNET_CONFIG = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    block_out_channels=(16, 32, 64),
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=DIM,
    attention_head_dim=2,
    norm_num_groups=8,
    addition_embed_type="text",
    addition_embed_type_num_heads=4,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
    clip_sample_range=1.0,
)


def build_unet(config: dict | None = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**dict(config or UNET_CONFIG))


def noise_scheduler():
    """The ``DDPMScheduler`` used in training (add_noise / the training targets)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def ddim_scheduler():
    """The ``DDIMScheduler`` used for sampling (same betas as training, eta = 0)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG, set_alpha_to_one=False)


def _weights_dir(path):
    path = WEIGHTS_DIR if path is None else os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"path: {path!r} is not a directory")
    return path


def load_model(path=None, device="cpu"):
    """The trained UNet from ``path`` (a folder with unet.safetensors + unet.json; default: the shipped
    weights). A fresh module each call, in eval mode, fp32, on ``device``."""
    from safetensors.torch import load_file

    path = _weights_dir(path)
    with open(os.path.join(path, "unet.json")) as f:
        meta = json.load(f)
    unet = build_unet(meta["unet_config"])
    unet.load_state_dict(load_file(os.path.join(path, "unet.safetensors")))
    return unet.to(device).eval()


def load_meta(path=None) -> dict:
    with open(os.path.join(_weights_dir(path), "unet.json")) as f:
        return json.load(f)


def load_text_encoder(path=None) -> TextEncoder:
    from safetensors.torch import load_file

    f = os.path.join(_weights_dir(path), "text.safetensors")
    return TextEncoder(load_file(f) if os.path.exists(f) else make_tables())


def save_model(unet, path, text_encoder: TextEncoder | None = None, extra: dict | None = None):
    """Write unet.safetensors, unet.json and text.safetensors into folder ``path`` (atomically)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().float().contiguous().cpu() for k, v in unet.state_dict().items()}
    with atomic_path(os.path.join(path, "unet.safetensors")) as tmp:
        save_file(sd, tmp)
    te = text_encoder or TextEncoder()
    with atomic_path(os.path.join(path, "text.safetensors")) as tmp:
        save_file({k: v.contiguous() for k, v in te.state_dict().items()}, tmp)
    cfg = {k: unet.config[k] for k in UNET_CONFIG}     # the model's own architecture (json writes tuples as lists)
    write_json(os.path.join(path, "unet.json"),
               {"unet_config": cfg, "scheduler_config": SCHEDULER_CONFIG, **(extra or {})})


# ----------------------------------------------------------------------------------------------
# text encoding and sampling

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 2.0
_TEXT = {}


def _text_encoder() -> TextEncoder:
    if "shipped" not in _TEXT:
        _TEXT["shipped"] = load_text_encoder()
    return _TEXT["shipped"]


def encode(prompts) -> torch.Tensor:
    """Prompts -> encoder_hidden_states (B, MAX_LEN=8, DIM=32) float32 from the shipped frozen encoder.
    ``""`` is the null prompt (classifier-free guidance)."""
    return _text_encoder().encode(prompts)


def _check_int(value, arg, lo):
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{arg}: expected an int >= {lo}, got {value!r}")
    return value


def _check_unet(unet):
    if not isinstance(unet, torch.nn.Module) or not hasattr(unet, "config"):
        raise ValueError(f"unet: expected a diffusers UNet2DConditionModel or MiniCanvas-DiT's "
                         f"SD3Transformer2DModel, got {type(unet).__name__}")
    p = next(unet.parameters(), None)
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def noise_for(prompts, seed: int) -> torch.Tensor:
    """Initial noise (B, 3, 32, 32): image i's noise depends only on (seed, prompts[i], k) where k
    counts earlier occurrences of the same prompt in the list -- not on batch grouping."""
    import hashlib

    seen = {}
    out = torch.empty(len(prompts), 3, 32, 32)
    for i, p in enumerate(prompts):
        k = seen.get(p, 0)
        seen[p] = k + 1
        h = hashlib.blake2b(f"{seed}|{p}|{k}".encode(), digest_size=8).digest()
        g = torch.Generator().manual_seed(int.from_bytes(h, "little") & 0x7FFFFFFFFFFFFFFF)
        out[i] = torch.randn(3, 32, 32, generator=g)
    return out


@torch.no_grad()
def sample(unet, prompts, seed: int = 0, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
           batch_size: int = 64, progress: bool = False, noise: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (eta = 0) samples for ``prompts`` with classifier-free guidance ``guidance`` (1 = off); for
    MiniCanvas-DiT (an ``SD3Transformer2DModel``) Euler steps on its flow.
    -> images float32 in [0, 1], (B, 3, 32, 32), on the CPU. Seeded per image (see ``noise_for``)."""
    from tqdm import tqdm

    device, dtype = _check_unet(unet)
    if isinstance(prompts, str):
        raise ValueError("prompts: expected a list of strings, got a single str (wrap it in a list)")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty list")
    _check_int(seed, "seed", 0)
    _check_int(steps, "steps", 1)
    _check_int(batch_size, "batch_size", 1)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or guidance < 0:
        raise ValueError(f"guidance: expected a float >= 0, got {guidance!r}")
    cond_all = encode(prompts)
    null = encode([""])
    x_all = noise_for(prompts, seed) if noise is None else noise.float().cpu()
    from .dit import is_dit, sample_flow
    if is_dit(unet):   # MiniCanvas-DiT: Euler on its rectified flow, the same noise, prompts and guidance
        n_batches = (len(prompts) + batch_size - 1) // batch_size
        with tqdm(total=n_batches * steps, disable=not progress, desc="canvas sample", dynamic_ncols=True) as bar:
            return sample_flow(unet, cond_all, null, x_all, steps, guidance, batch_size, bar)
    sched = ddim_scheduler()
    sched.set_timesteps(steps)
    cfg = float(guidance) != 1.0
    out = []
    n_batches = (len(prompts) + batch_size - 1) // batch_size
    bar = tqdm(total=n_batches * steps, disable=not progress, desc="canvas sample", dynamic_ncols=True)
    for i in range(0, len(prompts), batch_size):
        cond = cond_all[i:i + batch_size].to(device, dtype)
        x = x_all[i:i + batch_size].to(device, dtype)
        b = x.shape[0]
        ctx = torch.cat([null.to(device, dtype).expand(b, -1, -1), cond]) if cfg else cond
        for t in sched.timesteps:
            xin = torch.cat([x, x]) if cfg else x
            eps = unet(xin, t.to(device), ctx).sample
            if cfg:
                eu, ec = eps.chunk(2)
                eps = eu + guidance * (ec - eu)
            x = sched.step(eps, t, x).prev_sample
            bar.update(1)
        out.append(((x.float().cpu() + 1) / 2).clamp(0, 1))
    bar.close()
    return torch.cat(out)
