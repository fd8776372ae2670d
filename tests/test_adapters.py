"""save / load / merge / unmerge of adapters."""
import os

import pytest
import torch
from torch import nn

import spare_kernels as sk
import spare_kernels.adapters as adapters_mod
from spare_kernels.nn import MaskedLoRALinear, iter_patched
from unets import run, tiny_inputs, tiny_unet


def masked_patched(seed=0, dtype=torch.float32, target="all"):
    unet = tiny_unet(seed, dtype=dtype)
    params = dict(unet.named_parameters())
    g = torch.Generator().manual_seed(3)
    masks = {k: sk.Mask.from_dense(torch.rand(v.shape, generator=g) > 0.5) for k, v in params.items()
             if k.endswith(("to_q.weight", "to_k.weight"))}
    masks["conv_in.weight"] = sk.Mask.from_dense(torch.ones_like(unet.conv_in.weight, dtype=torch.bool), "row")
    sk.patch_unet(unet, masks=masks, init="random", target_modules=target, rank=3, alpha=1.5)
    return unet


def test_save_load_round_trip(tmp_path, backend):
    unet = masked_patched()
    inp = tiny_inputs()
    with torch.no_grad():
        y = run(unet, inp)
    path = sk.save_adapter(unet, tmp_path / "a.safetensors")
    assert os.listdir(tmp_path) == ["a.safetensors"]                 # no temporary left behind
    fresh = tiny_unet()
    sk.load_adapter(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inp), y, rtol=1e-5, atol=1e-5)
    src, dst = dict(iter_patched(unet)), dict(iter_patched(fresh))
    assert src.keys() == dst.keys()
    for n in src:
        assert src[n].masks["default"] == dst[n].masks["default"]
        assert src[n].scaling == dst[n].scaling
        assert torch.equal(src[n].lora_B["default"].weight, dst[n].lora_B["default"].weight)
    # renamed on load, stacked next to the first
    sk.load_adapter(fresh, path, adapter_name="again")
    assert sk.adapter_names(fresh) == ["default", "again"]
    with pytest.raises(ValueError, match="already exists"):
        sk.load_adapter(fresh, path)


def test_load_refuses_another_base(tmp_path):
    path = sk.save_adapter(masked_patched(), tmp_path / "a.safetensors")
    other = tiny_unet(seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        sk.load_adapter(other, path)
    assert not list(iter_patched(other))                                  # nothing changed
    with pytest.warns(RuntimeWarning, match="fingerprint"):
        sk.load_adapter(other, path, strict=False)
    assert list(iter_patched(other))
    bigger = tiny_unet(block_out_channels=(32, 96), cross_attention_dim=32)
    with pytest.raises(ValueError, match="shape mismatches"):
        sk.load_adapter(bigger, path, strict=False)


def test_bad_paths_and_files(tmp_path):
    unet = masked_patched()
    with pytest.raises(ValueError, match="does not exist"):
        sk.save_adapter(unet, tmp_path / "nope" / "a.safetensors")
    with pytest.raises(ValueError, match="adapter_name"):
        sk.save_adapter(unet, tmp_path / "a.safetensors", adapter_name="zzz")
    with pytest.raises(FileNotFoundError, match="path"):
        sk.load_adapter(unet, tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable"):
        sk.load_adapter(unet, junk)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not a spare_kernels adapter"):
        sk.load_adapter(unet, tmp_path / "foreign.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    unet = masked_patched()
    path = tmp_path / "a.safetensors"
    sk.save_adapter(unet, path)
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(adapters_mod, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        sk.save_adapter(unet, path)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["a.safetensors"]


def test_written_files_get_umask_permissions(tmp_path):
    from spare_kernels.utils.io import write_json
    umask = os.umask(0o022)
    try:
        p = write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(umask)
    assert os.stat(p).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_bit_exact(dtype):
    unet = masked_patched(dtype=dtype)
    sk.patch_unet(unet, init="random", adapter_name="second", target_modules=["to_v"])
    base = {n: m.weight.detach().clone() for n, m in iter_patched(unet)}
    sk.merge_adapter(unet, "default")
    sk.merge_adapter(unet, "second")
    changed = sum(not torch.equal(m.weight, base[n]) for n, m in iter_patched(unet))
    assert changed > 0
    with pytest.raises(RuntimeError, match="merged"):
        with sk.disable_adapters(unet):
            pass
    sk.unmerge_adapter(unet)
    for n, m in iter_patched(unet):
        assert torch.equal(m.weight, base[n]) and m.weight.dtype == dtype, n
        assert not m.merged_adapters


def test_merged_forward_equals_live_adapter_and_unpatch_unmerges():
    lin = nn.Linear(40, 24)
    w0 = lin.weight.detach().clone()
    m = MaskedLoRALinear(lin)
    m.add_adapter("default", 4, 0.5, init="random", mask=torch.rand(24, 40) > 0.3)
    x = torch.randn(6, 40)
    with torch.no_grad():
        live = m(x)
        m.merge("default")
        merged = m(x)                      # a merged adapter is not applied twice
    torch.testing.assert_close(live, merged, rtol=1e-5, atol=1e-5)
    holder = nn.Sequential(nn.Conv2d(1, 1, 1), m)
    sk.unpatch_unet(holder)
    assert holder[1] is lin and torch.equal(lin.weight, w0)


def test_atomic_write_syncs_file_then_folder(tmp_path, monkeypatch):
    """The data reaches the disk before the rename and the rename before returning: a crash right
    after never leaves an empty file at the path."""
    from spare_kernels.utils import io
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.fspath(b))), real_replace(a, b))[1])
    with io.atomic_path(tmp_path / "x.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"data")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"], events
    assert events[0][1] == os.path.realpath(tmp)                       # the temporary file, before the rename
    assert events[2][1] == os.path.realpath(tmp_path)                  # the folder, after it
    assert (tmp_path / "x.bin").read_bytes() == b"data"


def test_atomic_write_removes_dead_writers_temporaries_only(tmp_path):
    import subprocess
    import sys
    from spare_kernels.utils.io import atomic_path, write_json
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orphan = tmp_path / f".x.json.{done.pid}.ab_12cd3.tmp"
        keep = [tmp_path / f".x.json.{live.pid}.zz9xk2aq.tmp",           # a live writer's
                tmp_path / f".y.json.{done.pid}.ab_12cd3.tmp",           # another path's
                tmp_path / f".x.json.1.{done.pid}.ab_12cd3.tmp",         # ...of the path 'x.json.1'
                tmp_path / ".x.json.ab_12cd3.tmp"]                       # no pid: cannot tell
        for p in [orphan, *keep]:
            p.write_bytes(b"half")
        with atomic_path(tmp_path / "x.json") as tmp:
            assert os.path.basename(tmp).startswith(f".x.json.{os.getpid()}.")   # names its writer
        write_json(tmp_path / "x.json", {"a": 1})
        assert not orphan.exists()
        assert all(p.exists() for p in keep)
        assert sorted(os.listdir(tmp_path)) == sorted(["x.json"] + [p.name for p in keep])
    finally:
        live.kill()
        live.wait()


def test_fingerprint_is_of_the_unmerged_base(tmp_path):
    """Saved while merged (this adapter, another, or both): the fingerprints are those of the base
    weight, so a strict load still tells another base from the same one."""
    unet = masked_patched()
    sk.patch_unet(unet, init="random", adapter_name="second", target_modules=["to_q", "to_v"])
    plain = sk.save_adapter(unet, tmp_path / "plain.safetensors")

    def fingerprints(p):
        return {k: v["fingerprint"] for k, v in adapters_mod.read_adapter(p)[0]["modules"].items()}

    assert all(fingerprints(plain).values())
    for merged in (["default"], ["second"], ["second", "default"]):
        for n in merged:
            sk.merge_adapter(unet, n)
        weights = {n: m.weight.clone() for n, m in iter_patched(unet)}
        path = sk.save_adapter(unet, tmp_path / f"{'_'.join(merged)}.safetensors")
        assert fingerprints(path) == fingerprints(plain), merged
        assert all(torch.equal(m.weight, weights[n]) for n, m in iter_patched(unet))   # save changed nothing
        sk.unmerge_adapter(unet)
    with pytest.raises(ValueError, match="fingerprint"):
        sk.load_adapter(tiny_unet(seed=1), path)
    sk.load_adapter(tiny_unet(), path)
    # the target's own merges do not count either
    target = tiny_unet()
    sk.patch_unet(target, init="random", adapter_name="other", target_modules=["to_q"])
    sk.merge_adapter(target, "other")
    sk.load_adapter(target, path)
    assert sorted(sk.adapter_names(target)) == ["default", "other"]


def test_unmerged_weight_undoes_every_merge_without_changing_the_layer():
    m = MaskedLoRALinear(nn.Linear(40, 24).to(torch.bfloat16))
    w0 = m.weight.detach().clone()
    m.add_adapter("a", 4, 0.5, init="random", mask=torch.rand(24, 40) > 0.3)
    m.add_adapter("b", 2, 2.0, init="random")
    assert torch.equal(m.unmerged_weight(), w0)
    m.merge("a")
    m.merge("b")
    merged = m.weight.detach().clone()
    got = m.unmerged_weight()
    assert torch.equal(got, w0) and got.dtype == w0.dtype
    assert torch.equal(m.weight, merged) and m.merged_adapters == ["a", "b"]
    assert got.data_ptr() != m.weight.data_ptr()
