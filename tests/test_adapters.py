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
        m.merge(adapter_names=["default"])
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
    m.merge(adapter_names=["a"])
    m.merge(adapter_names=["b"])
    merged = m.weight.detach().clone()
    got = m.unmerged_weight()
    assert torch.equal(got, w0) and got.dtype == w0.dtype
    assert torch.equal(m.weight, merged) and m.merged_adapters == ["a", "b"]
    assert got.data_ptr() != m.weight.data_ptr()


# ----------------------------------------------------------------------------------- load: validate all, then apply
@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    return sk.save_adapter(masked_patched(), tmp_path_factory.mktemp("good") / "good.safetensors")


_DROP = object()


def _edited(good, dst, edit):
    """A copy of ``good`` with ``edit(meta, modules, tensors)`` applied (``meta['modules']``, if the
    edit sets it, is written as given (``_DROP``: left out), else the edited ``modules`` are)."""
    import json
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(good, framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    modules = json.loads(meta.pop("modules"))
    edit(meta, modules, tensors)
    meta.setdefault("modules", json.dumps(modules))
    meta = {k: v for k, v in meta.items() if v is not _DROP}
    save_file(tensors, str(dst), metadata=meta)
    return str(dst)


def _last(modules, masked=False):
    """The module applied last (so a load that fails on it leaves the others patched)."""
    return [n for n, i in modules.items() if not masked or i["mask"]][-1]


def _set(field, value, masked=False):
    def edit(meta, modules, tensors):
        modules[_last(modules, masked)][field] = value
    return edit


def _drop(field):
    def edit(meta, modules, tensors):
        del modules[_last(modules)][field]
    return edit


def _tensor(suffix, fn, masked=False):
    def edit(meta, modules, tensors):
        key = f"{_last(modules, masked)}.{suffix}"
        out = fn(tensors[key])
        if out is None:
            del tensors[key]
        else:
            tensors[key] = out
    return edit


def _meta(key, value):
    def edit(meta, modules, tensors):
        meta[key] = value
    return edit


def _granularity(meta, modules, tensors):
    modules[_last(modules, masked=True)]["mask"]["granularity"] = "diagonal"


def _inner(meta, modules, tensors):   # names the base layer inside a patched to_q
    mod = [n for n in modules if n.endswith("to_q")][-1]
    modules[mod + ".base_layer"] = modules.pop(mod)
    for s in ("lora_A", "lora_B", "mask"):
        tensors[f"{mod}.base_layer.{s}"] = tensors.pop(f"{mod}.{s}")


BAD_FILES = {   # id: (edit, words the error names besides the file; "LAST"/"LASTM": the module edited)
    "lora_B missing": (_tensor("lora_B", lambda t: None), ["LAST", "lora_B"]),
    "lora_A shape": (_tensor("lora_A", lambda t: torch.cat([t, t[:1]])), ["LAST", "lora_A", "shape"]),
    "lora_B shape": (_tensor("lora_B", lambda t: t[:-1]), ["LAST", "lora_B", "shape"]),
    "lora_A int": (_tensor("lora_A", lambda t: t.to(torch.int32)), ["LAST", "lora_A", "int32"]),
    "lora_B dtype": (_tensor("lora_B", lambda t: t.double()), ["LAST", "lora_B", "float64"]),
    "mask shape": (_tensor("mask", lambda t: t[:-1], masked=True), ["LASTM", "mask", "shape"]),
    "mask missing": (_tensor("mask", lambda t: None, masked=True), ["LASTM", "mask"]),
    "mask granularity": (_granularity, ["LASTM", "mask", "granularity", "diagonal"]),
    "mask not a dict": (_set("mask", "element", masked=True), ["LASTM", "mask"]),
    "scale text": (_set("scale", "abc"), ["LAST", "scale", "str"]),
    "scale nan": (_set("scale", float("nan")), ["LAST", "scale", "finite", "nan"]),
    "scale inf": (_set("scale", float("inf")), ["LAST", "scale", "finite", "inf"]),
    "rank 0": (_set("rank", 0), ["LAST", "rank", "positive int"]),
    "rank -1": (_set("rank", -1), ["LAST", "rank", "positive int"]),
    "rank 2.5": (_set("rank", 2.5), ["LAST", "rank", "positive int"]),
    "rank true": (_set("rank", True), ["LAST", "rank", "positive int"]),
    "rank 4": (_set("rank", 4), ["LAST", "lora_A", "shape"]),          # positive, but A has 3 rows
    "active text": (_set("active", "yes"), ["LAST", "active"]),
    "kind": (_set("kind", "conv3d"), ["LAST", "kind"]),
    "weight_shape text": (_set("weight_shape", "32x32"), ["LAST", "weight_shape"]),
    "fingerprint number": (_set("fingerprint", 7), ["LAST", "fingerprint"]),
    "no weight_shape": (_drop("weight_shape"), ["LAST", "weight_shape", "missing"]),
    "no rank": (_drop("rank"), ["LAST", "rank", "missing"]),
    "no scale": (_drop("scale"), ["LAST", "scale", "missing"]),
    "no mask key": (_drop("mask"), ["LAST", "mask", "missing"]),
    "modules bad JSON": (_meta("modules", "{not json"), ["modules", "JSON"]),
    "modules a list": (_meta("modules", "[1, 2]"), ["modules", "JSON object"]),
    "modules empty": (_meta("modules", "{}"), ["modules"]),
    "modules missing": (_meta("modules", _DROP), ["modules", "missing"]),
    "no adapter_name": (_meta("adapter_name", _DROP), ["adapter_name", "missing"]),
    "adapter_name dotted": (_meta("adapter_name", "a.b"), ["adapter_name", "'a.b'"]),
    "inside a patched layer": (_inner, ["base_layer"]),
}


def _target(pre):
    unet = tiny_unet()
    if pre:   # some layers already patched (adapter added to them), the others wrapped on load
        sk.patch_unet(unet, init="random", adapter_name="other", target_modules=["to_q"])
    return unet


def _snapshot(unet):
    return (dict(unet.named_modules()), {k: v.clone() for k, v in unet.state_dict().items()},
            {n: p.requires_grad for n, p in unet.named_parameters()}, sk.adapter_names(unet),
            {n: (list(m.lora_A), list(m.active_adapters), dict(m.scaling)) for n, m in iter_patched(unet)})


def _assert_unchanged(unet, snap):
    modules, state, grads, names, layers = snap
    now = dict(unet.named_modules())
    assert now.keys() == modules.keys() and all(now[k] is modules[k] for k in now)
    sd = unet.state_dict()
    assert sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in sd)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads
    assert sk.adapter_names(unet) == names
    assert {n: (list(m.lora_A), list(m.active_adapters), dict(m.scaling)) for n, m in iter_patched(unet)} == layers


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_load_checks_everything_before_changing_anything(tmp_path, good_file, case):
    import json
    from safetensors import safe_open
    edit, words = BAD_FILES[case]
    bad = _edited(good_file, tmp_path / "bad.safetensors", edit)
    with safe_open(good_file, framework="pt") as f:
        modules = json.loads(f.metadata()["modules"])
    unet = _target(pre=True)   # the load would both wrap layers and add to patched ones
    snap = _snapshot(unet)
    with pytest.raises(ValueError) as e:
        sk.load_adapter(unet, bad)
    msg = str(e.value)
    for w in [bad] + words:
        w = {"LAST": _last(modules), "LASTM": _last(modules, masked=True)}.get(w, w)
        assert w in msg, (w, msg)
    _assert_unchanged(unet, snap)
    sk.load_adapter(unet, good_file)                                       # a corrected retry works
    assert "default" in sk.adapter_names(unet)


@pytest.mark.parametrize("pre", [False, True], ids=["plain", "prepatched"])
def test_load_rolls_back_if_applying_fails(good_file, monkeypatch, pre):
    from spare_kernels.nn.lora import _Fused as _MaskedLoRALayer
    unet = _target(pre)
    snap = _snapshot(unet)
    real, calls = _MaskedLoRALayer.add_adapter, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("CUDA out of memory")
        return real(self, *a, **k)

    monkeypatch.setattr(_MaskedLoRALayer, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="out of memory"):
        sk.load_adapter(unet, good_file)
    _assert_unchanged(unet, snap)
    monkeypatch.setattr(_MaskedLoRALayer, "add_adapter", real)
    sk.load_adapter(unet, good_file)
    assert "default" in sk.adapter_names(unet)


def test_load_refuses_a_bad_adapter_name_argument(good_file):
    unet = tiny_unet()
    snap = _snapshot(unet)
    for name in ("a.b", "", 3):
        with pytest.raises(ValueError, match="adapter_name: expected a non-empty string"):
            sk.load_adapter(unet, good_file, adapter_name=name)
        _assert_unchanged(unet, snap)


def test_load_warns_of_tensors_it_does_not_use(tmp_path, good_file):
    import warnings

    def extra(meta, modules, tensors):
        tensors["foo.lora_A"] = torch.zeros(2)
        tensors["conv_out.mask"] = torch.zeros(3, dtype=torch.uint8)     # conv_out's adapter is dense
    path = _edited(good_file, tmp_path / "extra.safetensors", extra)
    unet = tiny_unet()
    with pytest.warns(UserWarning, match="conv_out.mask") as w:
        sk.load_adapter(unet, path)
    assert "foo.lora_A" in str(w[0].message) and path in str(w[0].message)
    assert "default" in sk.adapter_names(unet)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sk.load_adapter(tiny_unet(), good_file)                            # a clean file: no warning
