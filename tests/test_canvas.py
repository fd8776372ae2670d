"""MiniCanvas (spare_kernels.canvas): data, text encoder, shipped weights, sampling, metrics, scripts."""
import os

import pytest
import torch

from spare_kernels import canvas
from spare_kernels.canvas import metrics
from spare_kernels.canvas.model import load_text_encoder


@pytest.fixture(scope="module")
def unet():
    return canvas.load_model()


def test_dataset_deterministic_and_splits_disjoint():
    a = canvas.dataset(16, seed=3)
    b = canvas.dataset(16, seed=3)
    assert torch.equal(a.images, b.images) and a.prompts == b.prompts
    assert a.images.shape == (16, 3, 32, 32) and a.images.dtype == torch.float32
    assert 0.0 <= a.images.min() and a.images.max() <= 1.0
    assert not torch.equal(a.images, canvas.dataset(16, seed=4).images)
    test = canvas.dataset(36, seed=0, split="test").images.flatten(1)
    train = torch.cat([canvas.dataset(36, seed=s, split="train").images for s in range(4)]).flatten(1)
    # no held-out image is (even nearly) a training image
    assert torch.cdist(test, train).min() > 1.0


def test_every_pair_renders_and_labels_match():
    b = canvas.dataset(72, seed=0, split="test")
    pairs = set(zip(b.styles.tolist(), b.objects.tolist()))
    assert len(pairs) == 36                                   # balanced: every (style, object) pair
    for s, o, p in zip(b.styles.tolist(), b.objects.tolist(), b.prompts):
        assert p == f"a {canvas.OBJECTS[o]} in {canvas.STYLES[s]} style"
    f = canvas.dataset(6, seed=1, style="dots", object="heart")
    assert (f.styles == canvas.STYLES.index("dots")).all() and (f.objects == canvas.OBJECTS.index("heart")).all()
    assert canvas.make_images(3, seed=1, object="star").shape == (3, 3, 32, 32)
    assert len(canvas.prompts()) == 36 and len(canvas.prompts(style="dots")) == 6
    assert canvas.prompts(style="dots", object="heart") == ["a heart in dots style"]
    with pytest.raises(ValueError, match="style.*stripes"):
        canvas.dataset(4, style="plaid")
    with pytest.raises(ValueError, match="split"):
        canvas.dataset(4, split="val")
    with pytest.raises(ValueError, match="n:"):
        canvas.dataset(0)


def test_classifier_held_out_accuracy():
    clf = canvas.load_classifier()
    b = canvas.dataset(216, seed=0, split="test")
    ps, po = clf.predict(b.images)
    assert (ps == b.styles).float().mean() >= 0.98
    assert (po == b.objects).float().mean() >= 0.98


def test_classifier_predict_averages_the_eight_symmetric_views():
    clf = canvas.load_classifier()
    x = canvas.dataset(12, seed=3, split="test").images
    with torch.no_grad():
        ls, lo = clf(x)
    ps1, po1 = clf.predict(x, tta=False)
    assert torch.equal(ps1, ls.argmax(1)) and torch.equal(po1, lo.argmax(1))
    # Averaging over the dihedral group makes the prediction invariant to it, batch split or not.
    ps, po = clf.predict(x)
    for view in (torch.rot90(x, 1, (2, 3)), x.flip(2), torch.rot90(x, 3, (2, 3)).flip(3)):
        ps2, po2 = clf.predict(view, batch_size=5)
        assert torch.equal(ps2, ps) and torch.equal(po2, po)
    views = [torch.rot90(x, k, (2, 3)) for k in range(4)]
    views += [v.flip(3) for v in views]
    with torch.no_grad():
        probs = torch.stack([clf(v)[1].softmax(1) for v in views]).mean(0)
    assert torch.equal(po, probs.argmax(1))


def test_encode():
    e = canvas.encode(["a circle in dots style", ""])
    assert e.shape == (2, canvas.MAX_LEN, canvas.UNET_CONFIG["cross_attention_dim"])
    assert torch.equal(e, canvas.encode(["A circle  in dots style", ""]))
    assert not torch.equal(e[0], canvas.encode(["a square in dots style"])[0])
    with pytest.raises(ValueError, match="unknown word 'dog'"):
        canvas.encode(["a dog in dots style"])
    with pytest.raises(ValueError, match="prompts"):
        canvas.encode("a circle in dots style")


def test_sample_deterministic_and_batch_independent(unet):
    ps = ["a circle in dots style", "a star in grain style", "a circle in dots style"]
    a = canvas.sample(unet, ps, seed=5, steps=3)
    assert a.shape == (3, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, canvas.sample(unet, ps, seed=5, steps=3))
    b = canvas.sample(unet, ps, seed=5, steps=3, batch_size=1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    c = canvas.sample(unet, ps[:1], seed=5, steps=3)               # same prompt, same k -> same image
    torch.testing.assert_close(a[:1], c, atol=1e-4, rtol=0)
    assert (a[0] - a[2]).abs().max() > 0.05                        # repeated prompt: new noise
    assert (a[0] - canvas.sample(unet, ps[:1], seed=6, steps=3)[0]).abs().max() > 0.05
    with pytest.raises(ValueError, match="steps"):
        canvas.sample(unet, ps, steps=0)
    with pytest.raises(ValueError, match="unet"):
        canvas.sample("unet", ps)


def test_evaluate_keys_and_ranges(unet):
    r = canvas.evaluate(unet, target="style:dots", surrogate="pastel", n_per_prompt=1, steps=2, progress=False)
    for k in ("ua", "ira", "cra", "fidelity_psnr", "surrogate_rate", "style_acc", "object_acc"):
        assert isinstance(r[k], float), k
    for k in ("ua", "ira", "cra", "surrogate_rate", "style_acc", "object_acc"):
        assert 0.0 <= r[k] <= 1.0, k
    assert r["fidelity_psnr"] == pytest.approx(100.0)              # the shipped model against itself
    assert set(r["per_class"]["style"]) == set(canvas.STYLES)
    assert set(r["per_class"]["object"]) == set(canvas.OBJECTS)
    assert r["n_images"] == 36
    r2 = canvas.evaluate(unet, target="object:star", n_per_prompt=1, steps=2, progress=False)
    assert r2["surrogate_rate"] is None and 0 <= r2["ua"] <= 1
    r0 = canvas.evaluate(unet, target=None, n_per_prompt=1, steps=2, progress=False)
    assert r0["ua"] is None and 0 <= r0["style_acc"] <= 1


def test_evaluate_invalid_target_and_surrogate(unet):
    for bad in ("style:plaid", "dots", "colour:dots", 3):
        with pytest.raises(ValueError, match=r"target.*style:stripes.*object:heart"):
            canvas.evaluate(unet, target=bad)
    with pytest.raises(ValueError, match=r"surrogate.*style:pastel"):
        canvas.evaluate(unet, target="style:dots", surrogate="dots")
    with pytest.raises(ValueError, match=r"surrogate.*style:pastel"):
        canvas.evaluate(unet, target="style:dots", surrogate="object:star")
    with pytest.raises(ValueError, match="surrogate"):
        canvas.evaluate(unet, target=None, surrogate="pastel")
    with pytest.raises(ValueError, match="n_per_prompt"):
        canvas.evaluate(unet, target="style:dots", n_per_prompt=0)


def test_psnr_and_grid(tmp_path):
    x = torch.rand(2, 3, 32, 32)
    assert metrics.psnr(x, x) == pytest.approx(100.0)
    assert metrics.psnr(x, (x + 0.1).clamp(0, 1)) < 30
    p = canvas.save_grid(x, tmp_path / "g.png", nrow=2)
    from PIL import Image
    assert Image.open(p).size[0] > 64
    assert os.listdir(tmp_path) == ["g.png"]


def test_training_scripts_never_default_to_the_shipped_weights(capsys):
    from spare_kernels.canvas import train, train_classifier
    for script in (train, train_classifier):
        with pytest.raises(SystemExit):
            script.parse_args(["--steps", "1"])
        assert "--out" in capsys.readouterr().err


def test_training_scripts_write_loadable_weights(tmp_path, capsys):
    from spare_kernels.canvas import train, train_classifier

    out = str(tmp_path / "w")
    assert train.main(["--steps", "2", "--batch-size", "4", "--out", out, "--no-progress"]) == 0
    assert not os.path.exists(os.path.join(out, "train_state.pt"))
    u = canvas.load_model(out)
    assert sum(p.numel() for p in u.parameters()) == sum(p.numel() for p in canvas.load_model().parameters())
    assert torch.equal(load_text_encoder(out).token_embedding, load_text_encoder().token_embedding)
    assert canvas.sample(u, ["a circle in dots style"], steps=1).shape == (1, 3, 32, 32)
    assert train_classifier.main(["--steps", "2", "--batch-size", "8", "--test-n", "36", "--out", out,
                                  "--no-progress"]) == 0
    clf = canvas.load_classifier(out)
    assert clf.predict(canvas.make_images(4))[0].shape == (4,)
    assert sorted(f for f in os.listdir(out)) == ["classifier.json", "classifier.safetensors", "text.safetensors",
                                                  "unet.json", "unet.safetensors"]


def test_train_init_from_a_model_without_text_time_embedding(tmp_path):
    """--init from a model built before the text-time embedding: training starts from exactly its function
    (the new embedding's output gain is zeroed); weights of another architecture are refused."""
    from spare_kernels.canvas import train
    from spare_kernels.canvas.model import load_meta, save_model

    assert train.main(["--no-text-time", "--steps", "1", "--batch-size", "2", "--out", str(tmp_path / "old"),
                       "--no-progress"]) == 0
    old = canvas.load_model(tmp_path / "old")
    assert load_meta(tmp_path / "old")["unet_config"]["addition_embed_type"] is None
    out = str(tmp_path / "new")
    assert train.main(["--init", str(tmp_path / "old"), "--steps", "1", "--lr", "1e-12", "--warmup", "1",
                       "--batch-size", "2", "--out", out, "--no-progress"]) == 0
    new = canvas.load_model(out)
    assert new.config.addition_embed_type == "text"
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    c = canvas.encode(["a circle in dots style", "a star in grain style"])
    with torch.no_grad():
        torch.testing.assert_close(new(x, t, c).sample, old(x, t, c).sample, atol=1e-4, rtol=0)
    bad = canvas.build_unet({**canvas.UNET_CONFIG, "block_out_channels": (8, 16, 32)})
    save_model(bad, tmp_path / "bad")
    with pytest.raises(SystemExit, match="--init .*do not fit"):
        train.main(["--init", str(tmp_path / "bad"), "--steps", "1", "--out", str(tmp_path / "x"), "--no-progress"])
