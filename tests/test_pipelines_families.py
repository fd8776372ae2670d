"""``spare-kernels unlearn`` on a local pipeline folder of every family (issue 27): what it recognises
and says before loading, the task it builds (latents in the space the denoiser is trained in, the
pipeline's own text encodings), and ``task.predict`` equal to the denoiser called the way the
pipeline calls it. Tiny offline folders from tests/pipelines.py, built once per session."""
import json
import os
import shutil

import pytest
import torch

from pipelines import CLIP_LEN, SIZE, build
from spare_kernels.unlearn.diffusers_task import check_model_dir, diffusers_task, load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILY = {"sd": "unet", "sd2v": "unet", "sdxl": "sdxl", "sd3": "sd3", "sd3_no_t5": "sd3", "flux": "flux",
          "pixart_alpha": "pixart", "pixart_sigma": "pixart", "sana": "sana"}
PIPELINE = {"sd": "StableDiffusionPipeline", "sd2v": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
            "sd3": "StableDiffusion3Pipeline", "sd3_no_t5": "StableDiffusion3Pipeline", "flux": "FluxPipeline",
            "pixart_alpha": "PixArtAlphaPipeline", "pixart_sigma": "PixArtSigmaPipeline", "sana": "SanaPipeline"}
OBJECTIVE = {"sd": "epsilon", "sd2v": "v_prediction", "sdxl": "epsilon", "pixart_alpha": "epsilon",
             "pixart_sigma": "epsilon"}   # the others: flow
FORGET, SURROGATE, RETAIN = ["a photo of a cat"], "a photo of a dog", ["a painting of a tree", "a red house"]


def size_of(kind):
    return 2 * SIZE if kind == "sana" else SIZE   # Sana's pipeline takes multiples of 32 px only


@pytest.fixture(scope="session")
def folder(tmp_path_factory):
    made = {}

    def get(kind):
        if kind not in made:
            made[kind] = build(kind, str(tmp_path_factory.mktemp(kind) / kind))
        return made[kind]
    return get


# ------------------------------------------------------------------ the pipelines' own calls, written out
@torch.no_grad()
def reference_parts(pipe, kind, prompts):
    """What the pipeline's __call__ encodes for ``prompts`` (no guidance), by its own methods."""
    if FAMILY[kind] == "unet":
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=CLIP_LEN, truncation=True,
                             return_tensors="pt").input_ids
        return {"seq": pipe.text_encoder(ids)[0]}
    if kind == "sdxl":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
        size = size_of(kind)
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pe.dtype).expand(len(prompts), 6)
        return {"seq": pe, "pooled": pooled, "time_ids": ids}
    if FAMILY[kind] == "sd3":
        pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        return {"seq": pe, "pooled": pooled}
    if kind == "flux":
        pe, pooled, text_ids = pipe.encode_prompt(prompts, None)
        return {"seq": pe, "pooled": pooled, "text_ids": text_ids}
    kw = {}
    if kind == "sana":
        import inspect
        kw["complex_human_instruction"] = inspect.signature(type(pipe).__call__).parameters[
            "complex_human_instruction"].default
    pe, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False, **kw)
    return {"seq": pe, "mask": mask}


@torch.no_grad()
def pipeline_call(pipe, kind, x, t, p):
    """The denoiser's prediction for latents ``x`` at timestep indices ``t``, conditions ``p``, called as
    the pipeline's denoising loop calls it."""
    model = pipe.unet if FAMILY[kind] in ("unet", "sdxl") else pipe.transformer
    if OBJECTIVE.get(kind) is None:   # flow: the scheduler's sigma of the index, as timestep sigma*1000
        from spare_kernels.unlearn.objective import objective_for
        sigma = objective_for(pipe.scheduler, image_seq_len=(x.shape[2] // 2) * (x.shape[3] // 2)).sigma(t)
    if FAMILY[kind] == "unet":
        return model(x, t, encoder_hidden_states=p["seq"]).sample
    if kind == "sdxl":
        return model(x, t, encoder_hidden_states=p["seq"],
                     added_cond_kwargs={"text_embeds": p["pooled"], "time_ids": p["time_ids"]}).sample
    if FAMILY[kind] == "sd3":
        return model(hidden_states=x, timestep=sigma * 1000, encoder_hidden_states=p["seq"],
                     pooled_projections=p["pooled"]).sample
    if kind == "flux":
        n, c, h, w = x.shape
        tokens = pipe._pack_latents(x, n, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(n, h // 2, w // 2, x.device, x.dtype)
        out = model(hidden_states=tokens, timestep=sigma, guidance=torch.full((n,), 3.5), pooled_projections=p["pooled"],
                    encoder_hidden_states=p["seq"], txt_ids=p["text_ids"], img_ids=img_ids).sample
        return pipe._unpack_latents(out, size_of(kind), size_of(kind), pipe.vae_scale_factor)
    if FAMILY[kind] == "pixart":
        out = model(x, encoder_hidden_states=p["seq"], encoder_attention_mask=p["mask"], timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        return out.chunk(2, dim=1)[0]   # learned sigma
    return model(x, encoder_hidden_states=p["seq"], encoder_attention_mask=p["mask"],
                 timestep=sigma * 1000 * model.config.timestep_scale).sample


def pipeline_latents(pipe, kind, prompts, seed):
    kw = {"use_resolution_binning": False, "clean_caption": False} if FAMILY[kind] in ("pixart", "sana") else {}
    s = size_of(kind)
    lat = pipe(prompts, num_inference_steps=2, height=s, width=s, generator=torch.Generator().manual_seed(seed),
               output_type="latent", **kw).images
    return pipe._unpack_latents(lat, s, s, pipe.vae_scale_factor) if kind == "flux" else lat


# -------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind", list(FAMILY))
def test_each_family_recognised_loaded_and_its_task_matches_the_pipeline(kind, folder, capsys):
    path = folder(kind)
    layout = check_model_dir(path)
    assert (layout.pipeline, layout.family) == (PIPELINE[kind], FAMILY[kind])
    assert layout.absent == (("text_encoder_3", "tokenizer_3") if kind == "sd3_no_t5" else ())
    pipe = load_pipeline(path, progress=True)
    said = capsys.readouterr().out
    assert said.startswith(layout.describe()), said      # one block, before the loading bars
    assert f"is a {PIPELINE[kind]}" in said and "uses:" in said
    if kind == "sd3_no_t5":
        assert "absent:  text_encoder_3, tokenizer_3 (optional: the T5 embeddings are zeros" in said
    assert type(pipe).__name__ == PIPELINE[kind]
    s = size_of(kind)
    model, task = diffusers_task(path, FORGET, SURROGATE, RETAIN, n_generate=1, steps=2, resolution=s, pipe=pipe,
                                 progress=False)
    assert model is (pipe.unet if FAMILY[kind] in ("unet", "sdxl") else pipe.transformer)
    assert task.denoiser.family == FAMILY[kind] and task.objective.kind == OBJECTIVE.get(kind, "flow")
    lat = s // pipe.vae_scale_factor
    assert task.x_forget.shape == (1, 4, lat, lat) and task.x_retain.shape == (2, 4, lat, lat)
    # data-free forget and retain samples: the pipeline's own latent generations (Flux's unpacked)
    assert torch.equal(task.x_forget, pipeline_latents(pipe, kind, FORGET, 0))
    assert torch.equal(task.x_retain, pipeline_latents(pipe, kind, RETAIN, 1))
    # conditions: the pipeline's own encodings, one packed tensor per sample
    ref = reference_parts(pipe, kind, RETAIN)
    got = task.denoiser.unpack(task.c_retain)
    for name in [n for n, _ in task.denoiser.fields] or ["seq"]:
        torch.testing.assert_close(got[name], ref[name].to(got[name].dtype), rtol=0, atol=0, msg=name)
    assert task.c_forget.shape[0] == task.c_surrogate.shape[0] == 1 and task.c_retain.shape[0] == 2
    assert task.c_null.shape == (1,) + task.c_retain.shape[1:]
    if kind == "sd3_no_t5":     # no T5: zeros after the CLIP tokens, as the pipeline
        assert got["seq"][:, CLIP_LEN:].abs().max() == 0 and got["seq"][:, :CLIP_LEN].abs().max() > 0
    if kind == "sdxl":          # force_zeros_for_empty_prompt: SDXL guides with zeros, not the empty prompt
        null = task.denoiser.unpack(task.c_null)
        assert null["seq"].abs().max() == 0 and null["pooled"].abs().max() == 0
    if kind == "flux":
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        assert task.denoiser.guidance == 3.5
        assert task.objective.mu == pytest.approx(calculate_shift((lat // 2) ** 2, 256, 4096, 0.5, 1.15))
    # the prediction: the denoiser called as the pipeline calls it
    t = torch.tensor([999, 300])
    torch.testing.assert_close(task.predict(model, task.x_retain, t, task.c_retain),
                               pipeline_call(pipe, kind, task.x_retain, t, ref), rtol=1e-5, atol=1e-5)


def _write_images(folder, n, size, seed=0):
    from PIL import Image
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    px = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8)
    for i in range(n):
        Image.fromarray(px[i].numpy()).save(os.path.join(folder, f"{i}.png"))
    return px.permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("kind", ["sd3", "sdxl", "sana"])
def test_forget_images_are_encoded_into_the_denoisers_latent_space(kind, folder, tmp_path):
    """SD3/Flux: ``(z - shift_factor) * scaling_factor``; SDXL with latents_mean/std in its VAE config:
    ``(z - mean) * scaling_factor / std``; Sana's AutoencoderDC: its deterministic latent, scaled."""
    pipe = load_pipeline(folder(kind), progress=False)
    s = size_of(kind)
    px = _write_images(str(tmp_path / "imgs"), 2, s)
    vae = pipe.vae
    if kind == "sdxl":
        vae.register_to_config(latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[2.0, 1.0, 0.5, 1.5])
    _, task = diffusers_task(folder(kind), FORGET, SURROGATE, RETAIN[:1], images_dir=str(tmp_path / "imgs"),
                             n_generate=1, steps=2, resolution=s, pipe=pipe, progress=False)
    with torch.no_grad():
        enc = vae.encode(px)
        z = enc.latent_dist.sample(torch.Generator().manual_seed(0)) if kind != "sana" else enc.latent
    if kind == "sd3":
        want = (z - 0.0609) * 1.5305
    elif kind == "sdxl":
        mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1)
        want = (z - mean) * vae.config.scaling_factor / torch.tensor([2.0, 1.0, 0.5, 1.5]).view(1, 4, 1, 1)
    else:
        want = z * 0.41407
    torch.testing.assert_close(task.x_forget, want, rtol=1e-5, atol=1e-5)
    assert task.c_forget.shape[0] == 2 and not task.info["data_free"]


def _edit_index(path, **entries):
    p = os.path.join(path, "model_index.json")
    with open(p) as f:
        index = json.load(f)
    for k, v in entries.items():
        if v is None:
            index.pop(k, None)
        else:
            index[k] = v
    with open(p, "w") as f:
        json.dump(index, f)


def test_unknown_pipelines_and_missing_components_are_refused_by_name(folder, tmp_path, capsys):
    from spare_kernels.cli import main
    out = tmp_path / "out"

    def refused(model, *flags):
        argv = ["unlearn", str(model), "--forget-prompt", "a cat", "--surrogate-prompt", "a dog", "--retain-prompt",
                "a tree", "--data-free", "--out", str(out), "--quiet", *flags]
        assert main(argv) == 2
        assert not out.exists()
        return capsys.readouterr().err

    def copy(kind, name):
        dst = tmp_path / name
        shutil.copytree(folder(kind), dst)
        return dst

    unknown = copy("sd", "kandinsky")
    _edit_index(unknown, _class_name="KandinskyV22Pipeline")
    err = refused(unknown)
    assert "names the pipeline class 'KandinskyV22Pipeline', not one this command reads; supported: " \
           "StableDiffusionPipeline (Stable Diffusion 1.x/2.x), StableDiffusionXLPipeline (SDXL)" in err
    assert all(c in err for c in ("FluxPipeline", "StableDiffusion3Pipeline", "PixArtSigmaPipeline", "SanaPipeline"))
    no_t5_dir = copy("flux", "flux_without_t5")
    shutil.rmtree(no_t5_dir / "text_encoder_2")
    assert "has no text_encoder_2/ (the FluxPipeline's T5EncoderModel: an incomplete download?)" in refused(no_t5_dir)
    no_vae = copy("pixart_alpha", "pixart_no_vae_entry")
    _edit_index(no_vae, vae=None)
    assert "model_index.json lists no vae (a PixArtAlphaPipeline needs one)" in refused(no_vae)
    half_t5 = copy("sd3", "sd3_half_t5")
    shutil.rmtree(half_t5 / "tokenizer_3")
    assert "has text_encoder_3 but no tokenizer_3/ (give both or neither)" in refused(half_t5)
    wrong = copy("sd", "sd_with_a_transformer")
    _edit_index(wrong, unet=["diffusers", "SD3Transformer2DModel"])
    assert "gives the StableDiffusionPipeline a 'SD3Transformer2DModel' unet, expected UNet2DConditionModel" \
        in refused(wrong)
    assert "--resolution: the SanaPipeline needs a multiple of 32" in refused(folder("sana"), "--resolution", "48")
    # SD3 without its T5 folders at all (the index still naming them): loaded as the pipeline runs without T5
    no_t5 = copy("sd3", "sd3_t5_deleted")
    shutil.rmtree(no_t5 / "text_encoder_3")
    shutil.rmtree(no_t5 / "tokenizer_3")
    assert check_model_dir(str(no_t5)).absent == ("text_encoder_3", "tokenizer_3")
    assert load_pipeline(str(no_t5), progress=False).text_encoder_3 is None


def test_components_the_recipe_does_not_use_are_named_and_not_loaded(folder, tmp_path, capsys):
    from transformers import CLIPImageProcessor
    path = tmp_path / "sd_with_extras"
    shutil.copytree(folder("sd"), path)
    CLIPImageProcessor().save_pretrained(str(path / "feature_extractor"))
    _edit_index(path, feature_extractor=["transformers", "CLIPImageProcessor"],
                safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"])   # no folder: never loaded
    layout = check_model_dir(str(path))
    assert set(layout.ignored) == {"feature_extractor", "safety_checker"}
    pipe = load_pipeline(str(path), progress=True)
    assert "  ignored: " in capsys.readouterr().out
    assert pipe.safety_checker is None and pipe.feature_extractor is None


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_cli_unlearn_end_to_end_on_a_transformer(kind, folder, tmp_path, capsys):
    from safetensors.torch import load_file

    from spare_kernels.cli import main
    out = tmp_path / "out"
    argv = ["unlearn", folder(kind), "--forget-prompt", FORGET[0], "--surrogate-prompt", SURROGATE,
            "--retain-prompt", RETAIN[0], "--data-free", "--n-generate", "1", "--steps", "2",
            "--resolution", str(SIZE), "--out", str(out), "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert f"is a {PIPELINE[kind]}" in said and "generating 1 forget images" in said
    adapter = load_file(str(out / "adapter.safetensors"))
    assert any("lora_A" in k for k in adapter) and all(torch.isfinite(v).all() for v in adapter.values())
    run = json.loads((out / "run.json").read_text())
    assert run["steps"] == 2 and run["model"] == os.path.abspath(folder(kind))
