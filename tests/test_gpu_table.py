"""The registry's per-shape choice on CUDA (the table benchmarks/gpu.py --write-table writes): a listed
shape takes its measured backend, an unlisted one the priority order, a forced backend wins, and a bad
table is an error naming its variable. Runs without a GPU: lookup on the "cuda" device type only
consults the registry's data (the reference serves every device)."""
import json

import pytest
import torch

from spare_kernels.backends import registry


@pytest.fixture(autouse=True)
def _restore():
    yield
    registry.set_gpu_table(None)


def test_a_listed_shape_takes_its_measured_backend():
    key = registry.shape_key(1, 320, 320, 4, registry.tokens_bucket(4000))
    assert key == "1:320:320:4:4096"
    registry.set_gpu_table({"masked_lora_linear": {key: "reference"}})
    assert registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, torch.float32, key).backend == "reference"
    # the default for an unlisted shape: the priority order (whatever serves CUDA here)
    other = registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, torch.float32, "1:1:1:1:1")
    assert other is registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, torch.float32)
    # a forced backend wins over the table
    with registry.use_backend("reference"):
        assert registry.lookup("masked_lora_linear", "cuda", torch.bfloat16, None, key).backend == "reference"
    # the table only speaks for CUDA
    assert registry.lookup("masked_lora_linear", "cpu", torch.float32, None, key) is \
        registry.lookup("masked_lora_linear", "cpu", torch.float32)


def test_a_table_naming_a_backend_that_cannot_serve_falls_back():
    key = "1:8:8:4:16"
    registry.set_gpu_table({"masked_lora_linear": {key: "cpu"}})     # cpu never serves CUDA tensors
    e = registry.lookup("masked_lora_linear", "cuda", torch.float32, None, key)
    assert e.backend != "cpu"


def test_bad_tables_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="table"):
        registry.set_gpu_table({"not_an_op": {}})
    with pytest.raises(ValueError, match="expected one of"):
        registry.set_gpu_table({"masked_lora_linear": {"k": "fastest"}})
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"choices": {"masked_lora_linear": {"k": "nope"}}}))
    monkeypatch.setenv("SPARE_KERNELS_GPU_TABLE", str(bad))
    registry.set_gpu_table(None)
    with pytest.raises(RuntimeError, match="SPARE_KERNELS_GPU_TABLE"):
        registry.gpu_table()
    monkeypatch.setenv("SPARE_KERNELS_GPU_TABLE", str(tmp_path / "missing.json"))
    registry.set_gpu_table(None)
    with pytest.raises(RuntimeError, match="no such file"):
        registry.gpu_table()


def test_the_benchmark_writes_a_table_the_registry_reads(tmp_path, monkeypatch):
    from benchmarks import gpu
    doc = {"device": "X", "torch": "t", "dtype": "torch.bfloat16",
           "layers": [{"kind": "linear", "choice": {"ours_element": "cuda"}, "keys": {"ours_element": "1:8:8:4:16"}}],
           "saliency": [{"kind": "conv2d", "choice": {"sample_abs": "triton"}, "keys": {"sample_abs": "s:k"}}]}
    path = tmp_path / "table.json"
    gpu.write_table(doc, str(path), "cmd")
    written = json.loads(path.read_text())
    assert written["command"] == "cmd"
    assert written["choices"] == {"masked_lora_linear": {"1:8:8:4:16": "cuda"},
                                  "masked_lora_linear_backward": {"1:8:8:4:16": "cuda"},
                                  "saliency_conv2d": {"s:k": "triton"}}
    monkeypatch.setenv("SPARE_KERNELS_GPU_TABLE", str(path))
    registry.set_gpu_table(None)
    assert registry.gpu_table()["saliency_conv2d"] == {"s:k": "triton"}
