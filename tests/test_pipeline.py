"""A diffusers StableDiffusionPipeline, fully offline (tiny configs, random weights, a CLIP BPE tokenizer
from files written here), with patched / disabled / saved / reloaded adapters: exact images.

The pipeline builder is the one of python/toggle_adapter_pipeline.py (one builder, one place)."""
import importlib.util
import pathlib

import pytest
import torch

import spare_kernels as sk
from spare_kernels.nn import iter_patched

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "python" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


ex = load_example("toggle_adapter_pipeline")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return ex.build_pipeline(tmp_path_factory.mktemp("tokenizer"))


def test_offline_clip_tokenizer_and_pipeline(pipe):
    tok = pipe.tokenizer
    ids = tok("a photo of a cat").input_ids
    assert tok.convert_ids_to_tokens(ids) == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>",
                                              "<|endoftext|>"]
    assert tok("A  Painting of the DOG").input_ids == tok("a painting of the dog").input_ids   # CLIP's normaliser
    assert tok.decode(ids, skip_special_tokens=True) == "a photo of a cat"
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    img = ex.generate(pipe)
    assert img.shape == (2, 3, 32, 32) and torch.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
    assert torch.equal(ex.generate(pipe), img)                                   # fixed generator: deterministic
    assert not torch.equal(ex.generate(pipe, seed=1), img)


def test_patch_disable_toggle_save_unpatch_load_exact(pipe, tmp_path):
    unet = pipe.unet
    base = ex.generate(pipe)
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(3)
    masks = {k: sk.Mask.from_dense(torch.rand(v.shape, generator=g) > 0.5) for k, v in params.items()
             if k.endswith(("to_q.weight", "to_out.0.weight"))}                # element masks here, dense elsewhere
    sk.patch_unet(unet, masks=masks, init="random")
    try:
        patched = ex.generate(pipe)
        assert torch.isfinite(patched).all()
        assert (patched - base).abs().max() > 1e-2                               # the adapter changes the images
        with sk.disable_adapters(unet):
            assert torch.equal(ex.generate(pipe), base)                          # exactly the unpatched pipeline
        sk.enable_adapter(unet, "default", False)
        assert torch.equal(ex.generate(pipe), base)
        sk.enable_adapter(unet, "default", True)
        assert torch.equal(ex.generate(pipe), patched)
        path = sk.save_adapter(unet, tmp_path / "adapter.safetensors")
        sk.unpatch_unet(unet)
        assert not list(iter_patched(unet))
        assert torch.equal(ex.generate(pipe), base)
        sk.load_adapter(unet, path)
        assert {n: m.masks["default"] is not None for n, m in iter_patched(unet)} == \
            {n: f"{n}.weight" in masks for n, _ in iter_patched(unet)}
        assert torch.equal(ex.generate(pipe), patched)                           # reproduced from the file
    finally:
        sk.unpatch_unet(unet)
