"""Second probe's findings in adapters, adapter files, masks and the atomic-write helpers (issue 28)."""
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import spare_kernels as sk
from spare_kernels.adapters import read_adapter
from spare_kernels.nn import iter_patched
from spare_kernels.utils import io
from spare_kernels.utils.io import atomic_path, file_path, write_json
from unets import run, tiny_inputs, tiny_unet


def patched(seed=0, dtype=torch.float32, name="default"):
    unet = tiny_unet(seed, dtype=dtype)
    sk.patch_unet(unet, init="random", target_modules=["to_q", "to_v"], rank=2, adapter_name=name)
    return unet


def test_set_active_adapters_refuses_a_repeated_name():
    unet = patched()
    inp = tiny_inputs()
    with torch.no_grad():
        once = run(unet, inp)
    for names in (["default", "default"], ("default", "default")):
        with pytest.raises(ValueError, match="adapter_names.*'default'.*more than once"):
            sk.set_active_adapters(unet, names)
    assert all(m.active_adapters == ["default"] for _, m in iter_patched(unet))   # nothing changed
    with torch.no_grad():
        torch.testing.assert_close(run(unet, inp), once, rtol=0, atol=0)


def test_element_mask_refuses_nonzero_padding_bits():
    shape = (3, 5)                                   # 5 columns: 3 padding bits per row
    with pytest.raises(ValueError, match="padding bits"):
        sk.Mask("element", shape, torch.full((3, 1), 255, dtype=torch.uint8))
    ok = sk.Mask("element", shape, torch.full((3, 1), 0b11111, dtype=torch.uint8))
    assert ok.density == 1.0 and ok.count == 15
    # no padding (a multiple of 8 columns): every byte value is valid
    assert sk.Mask("element", (2, 16), torch.full((2, 2), 255, dtype=torch.uint8)).density == 1.0
    # internal builders keep zero padding
    dense = torch.rand(7, 13) > 0.3
    m = sk.Mask.from_dense(dense)
    assert m.to("cpu") == m and m.count == int(dense.sum())


def test_load_adapter_refuses_nonzero_padding_bits(tmp_path):
    unet = tiny_unet()
    # conv_in: weight (32, 4, 3, 3) -> 36 columns -> 4 padding bits in each row's last byte
    masks = {"conv_in.weight": sk.Mask.from_dense(torch.ones_like(unet.conv_in.weight, dtype=torch.bool))}
    sk.patch_unet(unet, masks=masks, init="random", target_modules=["conv_in"], rank=2)
    good = sk.save_adapter(unet, tmp_path / "good.safetensors")
    with safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["conv_in.mask"] = torch.full_like(tensors["conv_in.mask"], 255)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta)
    fresh = tiny_unet()
    with pytest.raises(ValueError, match=r"bad\.safetensors.*conv_in.*mask.*padding bits"):
        sk.load_adapter(fresh, bad)
    assert not list(iter_patched(fresh))


def test_save_adapter_name_none_means_the_only_adapter(tmp_path):
    unet = patched(name="mine")
    path = sk.save_adapter(unet, tmp_path / "a.safetensors", adapter_name=None)
    assert read_adapter(path)[0]["adapter_name"] == "mine"
    sk.patch_unet(unet, init="random", target_modules=["to_k"], rank=2, adapter_name="other")
    with pytest.raises(ValueError, match=r"adapter_name: .*None.*\['mine', 'other'\]"):
        sk.save_adapter(unet, tmp_path / "b.safetensors", adapter_name=None)
    with pytest.raises(ValueError, match="adapter_name"):
        sk.save_adapter(unet, tmp_path / "b.safetensors", adapter_name=3)
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_save_to_a_240_byte_file_name(tmp_path):
    unet = patched()
    name = "a" * 228 + ".safetensors"
    assert len(name) == 240
    path = sk.save_adapter(unet, tmp_path / name)
    assert os.listdir(tmp_path) == [name]
    sk.load_adapter(tiny_unet(), path)
    # the longest name the file system takes, and the temporaries of several such names stay apart
    longest = "b" * 255
    write_json(tmp_path / longest, {"a": 1})
    with atomic_path(tmp_path / ("c" * 254 + "1")) as t1, atomic_path(tmp_path / ("c" * 254 + "2")) as t2:
        assert os.path.basename(t1) != os.path.basename(t2)
        assert all(len(os.path.basename(t)) <= 255 for t in (t1, t2))
        for t in (t1, t2):
            open(t, "w").close()
    assert sorted(os.listdir(tmp_path)) == sorted([name, longest, "c" * 254 + "1", "c" * 254 + "2"])
    with pytest.raises(ValueError, match="path: file name .* 256 bytes"):
        write_json(tmp_path / ("d" * 256), {})
    # a dead writer's temporary of a long name (its shortened form) is still found and removed
    import subprocess
    import sys
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with atomic_path(tmp_path / longest) as t:
        name = os.path.basename(t)
    # a writer's pid of any length (up to pid_max's 7 digits) leaves a name that fits and is found
    orphans = [tmp_path / name.replace(f".{os.getpid()}.", f".{pid}.") for pid in (dead.pid, 4194303)]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    write_json(tmp_path / longest, {"a": 2})
    assert not any(o.exists() for o in orphans)


def test_paths_with_a_trailing_slash_or_bytes(tmp_path):
    unet = patched()
    inp = tiny_inputs()
    with torch.no_grad():
        y = run(unet, inp)
    path = os.path.join(str(tmp_path), "adapter.safetensors")
    # bytes: a valid path as os.fsencode gives it
    out = sk.save_adapter(unet, os.fsencode(path))
    assert out == path and os.path.isfile(path)
    fresh = tiny_unet()
    sk.load_adapter(fresh, os.fsencode(path))
    with torch.no_grad():
        torch.testing.assert_close(run(fresh, inp), y)
    assert read_adapter(os.fsencode(path))[0]["adapter_name"] == "default"
    assert write_json(os.fsencode(str(tmp_path / "x.json")), {"a": 1}) == str(tmp_path / "x.json")
    # a trailing slash names a folder
    with pytest.raises(ValueError, match="path: .*ends with '/'.*folder"):
        sk.save_adapter(unet, path + "/")
    with pytest.raises(ValueError, match="path: .*ends with '/'.*folder"):
        sk.load_adapter(tiny_unet(), path + "/")
    with pytest.raises(ValueError, match="path: .*is a folder"):
        sk.save_adapter(unet, str(tmp_path))
    with pytest.raises(ValueError, match="path: .*is a folder"):
        sk.load_adapter(tiny_unet(), str(tmp_path))
    with pytest.raises(TypeError, match=r"path: expected a str or os.PathLike \(or bytes\)"):
        sk.save_adapter(unet, 3)
    with pytest.raises(TypeError, match=r"path: expected a str or os.PathLike \(or bytes\)"):
        sk.load_adapter(tiny_unet(), 3)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "x.json"]


@pytest.mark.parametrize("saved, loaded", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                           (torch.bfloat16, torch.float32), (torch.float64, torch.float32)])
def test_load_adapter_from_the_same_model_in_another_dtype(tmp_path, saved, loaded):
    path = sk.save_adapter(patched(dtype=saved), tmp_path / "a.safetensors")
    target = tiny_unet(dtype=loaded)
    sk.load_adapter(target, path)                                  # strict: the same base
    assert sk.adapter_names(target) == ["default"]
    with torch.no_grad():
        assert torch.isfinite(run(target, tiny_inputs(dtype=loaded))).all()
    other = tiny_unet(seed=1, dtype=loaded)
    with pytest.raises(ValueError, match=f"fingerprint.*saved from {saved} weights, the unet's are {loaded}"):
        sk.load_adapter(other, path)
    assert not list(iter_patched(other))


def test_half_dtypes_cannot_be_compared_and_say_so(tmp_path):
    """fp16 and bf16 keep different bits of the same fp32 value: a copy in one cannot be matched to a
    file saved from the other; the error says why (and strict=False still loads)."""
    path = sk.save_adapter(patched(dtype=torch.float16), tmp_path / "a.safetensors")
    target = tiny_unet(dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="torch.float16 weights, the unet's are torch.bfloat16: neither dtype"):
        sk.load_adapter(target, path)
    with pytest.warns(RuntimeWarning, match="fingerprint"):
        sk.load_adapter(target, path, strict=False)



def test_a_bf16_file_is_not_compared_with_an_fp16_model_by_rounding(tmp_path):
    """Rounding the model to the file's dtype compares only where the file's is the lower precision: a
    different fp16 model rounds onto a bf16 file's values (here every weight moved by 2^-10 relative:
    within fp16's precision, under half a bf16 step), so fp16 <-> bf16 stays refused."""
    path = sk.save_adapter(patched(dtype=torch.bfloat16), tmp_path / "a.safetensors")
    other = tiny_unet(dtype=torch.bfloat16).float()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1 + 2 ** -10)
    other = other.half()
    same = tiny_unet(dtype=torch.bfloat16).half()
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert not torch.equal(other.get_submodule(q).weight, same.get_submodule(q).weight)
    with pytest.raises(ValueError, match="torch.bfloat16 weights, the unet's are torch.float16: neither dtype"):
        sk.load_adapter(other, path)
    assert not list(iter_patched(other))


@pytest.mark.parametrize("dtype", ["torch.__dict__", "torch.int8", "float32", ["torch.float32"], 3])
def test_a_crafted_dtype_field_is_a_value_error(tmp_path, dtype):
    good = sk.save_adapter(patched(), tmp_path / "good.safetensors")
    with safe_open(good, framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    modules = json.loads(meta["modules"])
    mod = sorted(modules)[0]
    modules[mod]["dtype"] = dtype
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata={**meta, "modules": json.dumps(modules)})
    msg = rf"bad\.safetensors': module '{re.escape(mod)}': dtype: expected one of \['torch.bfloat16'"
    with pytest.raises(ValueError, match="^read_adapter: '.*" + msg):
        read_adapter(bad)
    fresh = tiny_unet()
    with pytest.raises(ValueError, match="^load_adapter: '.*" + msg):
        sk.load_adapter(fresh, bad)
    assert not list(iter_patched(fresh))


def test_one_folder_check_for_adapter_files_and_atomic_writes(tmp_path, monkeypatch):
    """utils.io.file_path is the one check (same message but for what is expected), load_adapter reads
    its path once, and a missing file names the operation."""
    folder = str(tmp_path) + os.sep
    msgs = []
    for call in (lambda: file_path(folder), lambda: atomic_path(folder).__enter__(),
                 lambda: sk.save_adapter(patched(), folder), lambda: read_adapter(folder),
                 lambda: sk.load_adapter(tiny_unet(), folder)):
        with pytest.raises(ValueError, match="names a folder") as e:
            call()
        msgs.append(str(e.value))
    assert len({m.replace("an adapter file", "a file path").split("path: ", 1)[1] for m in msgs}) == 1, msgs
    assert msgs[4].startswith("load_adapter: path: ") and msgs[3].startswith("read_adapter: path: ")
    path = sk.save_adapter(patched(), tmp_path / "a.safetensors")
    calls = []
    real = io.as_path
    monkeypatch.setattr(io, "as_path", lambda *a: calls.append(a) or real(*a))
    sk.load_adapter(tiny_unet(), path)
    assert len(calls) == 1
    with pytest.raises(FileNotFoundError, match="load_adapter: path: no adapter file at"):
        sk.load_adapter(tiny_unet(), tmp_path / "missing.safetensors")
