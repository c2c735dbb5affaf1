"""weights/buffers.py: memory for streamed weights, and the pages of a mapped checkpoint given back."""

import json

import pytest
import torch
from conftest import write_reference_checkpoint
from minaf3.weights import buffers
from minaf3.weights.buffers import HUGE_PAGE, read_ahead, release_file_pages, streamed_empty
from safetensors import safe_open
from safetensors.torch import save_file

from minaf3 import AudioFlamingo3ForConditionalGeneration


def mapping_of(address: int) -> tuple[int, int, str]:
    """(start, end, VmFlags) of this process's mapping holding `address` (/proc/self/smaps)."""
    found = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:
                start, end = (int(bound, 16) for bound in fields[0].split("-"))
                found = (start, end) if start <= address < end else None
            elif found and line.startswith("VmFlags:"):
                return (*found, line)
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("megabytes", [2, 12, 37])
def test_streamed_weights_get_fresh_memory_marked_for_huge_pages(megabytes):
    """Even after the C allocator has reused freed blocks (as quantizing a checkpoint does), a streamed weight
    is memory of its own, 2 MiB-aligned, whose mapping carries the huge-page hint ("hg") from the start."""
    for _ in range(8):  # raise the allocator's mapping threshold and leave touched memory to reuse
        torch.empty(30 * 2**20, dtype=torch.uint8).fill_(1)
    weight = streamed_empty((megabytes * 2**18,), torch.float32)  # megabytes MiB
    assert weight.data_ptr() % HUGE_PAGE == 0 and weight.shape == (megabytes * 2**18,)
    start, end, flags = mapping_of(weight.data_ptr())
    assert " hg" in flags and start <= weight.data_ptr() and weight.data_ptr() + weight.nbytes <= end
    assert torch.equal(weight.fill_(2.0).unique(), torch.tensor([2.0]))


def test_a_streamed_weight_gives_its_mapping_back_when_freed():
    weight = streamed_empty((3, 2**20), torch.bfloat16)
    address = weight.data_ptr()
    assert " hg" in mapping_of(address)[2]
    del weight
    with pytest.raises(AssertionError, match="no mapping holds"):
        mapping_of(address)


def test_small_or_non_cpu_weights_are_torch_empty():
    small = streamed_empty((1000, 100), torch.int8)  # under one huge page: no mapping of its own
    assert small.untyped_storage().resizable()  # torch.empty's storage (a mapping's is not)
    assert not streamed_empty((2**20, 2), torch.int8).untyped_storage().resizable()
    assert streamed_empty((4, 2**20), torch.float32, device="meta").is_meta


def test_streamed_weights_are_ordinary_tensors_on_this_system():
    """The tensor behaves like torch.empty's: shape, dtype, arithmetic, a view of another dtype."""
    weight = streamed_empty((2048, 3000), torch.float32).fill_(2.0)
    assert weight.shape == (2048, 3000) and weight.sum() == 2.0 * weight.numel()
    assert weight.is_contiguous() and weight.view(torch.int32).shape == (2048, 3000)


def resident_kib(path) -> int:
    """Resident KiB of this process's mappings of the file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if len(fields) >= 5 and "-" in fields[0] and ":" not in fields[0]:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(fields[1])
    return total


def test_released_file_pages_leave_the_process_and_keep_the_data(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(1024, 1024), "b": torch.randn(7)}, path)
    with safe_open(path, framework="pt") as handle:
        a = handle.get_tensor("a")
        expected = a.clone()
        assert resident_kib(path) >= 4096 - 8  # read: its 4 MiB are resident
        assert release_file_pages(a)
        assert resident_kib(path) < 64
        assert torch.equal(a, expected)  # read again from the file when touched


def test_read_ahead_asks_only_for_file_pages_and_keeps_the_data(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(256, 1024)}, path)
    asked = []
    real = buffers._madvise()
    monkeypatch.setattr(buffers, "_madvise", lambda: lambda start, length, advice: asked.append(
        (start, length, advice)) or real(start, length, advice))  # fmt: skip
    with safe_open(path, framework="pt") as handle:
        a = handle.get_tensor("a")
        expected = a.clone()
        release_file_pages(a)
        asked.clear()
        assert read_ahead(a)
        ((start, length, advice),) = asked
        assert (
            advice == buffers.MADV_WILLNEED
            and start <= a.data_ptr() < a.data_ptr() + a.nbytes <= start + length
        )
        assert torch.equal(a, expected)
    x = torch.randn(256, 1024)
    assert not read_ahead(x) and len(asked) == 1  # anonymous memory: nothing asked


def test_anonymous_memory_is_never_released():
    x = torch.randn(1024, 1024)
    expected = x.clone()
    assert not release_file_pages(x) and torch.equal(x, expected)


@pytest.fixture(scope="module")
def wide_bf16_checkpoint(tmp_path_factory):
    """A bf16 checkpoint whose decoder matrices span many pages (512 wide: 0.5-1 MiB each)."""
    from safetensors.torch import load_file

    path = write_reference_checkpoint(tmp_path_factory.mktemp("wide"), seed=1, text_hidden=512)
    weights = path / "model.safetensors"
    save_file({k: t.bfloat16() for k, t in load_file(weights).items()}, weights, metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"dtype": "bfloat16"}))
    return path


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_loading_keeps_no_page_of_the_tensors_it_fused_or_quantized(wide_bf16_checkpoint, quantize):
    """A bf16 load reads q/k/v and gate/up as views of the file and fuses them (int8: quantizes them
    all): afterwards the file's resident pages are at most those of the tensors still used as views."""
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(
        wide_bf16_checkpoint, dtype="bfloat16", quantize=quantize
    )
    model.generate(torch.ones(1, 4, dtype=torch.long), max_new_tokens=2)  # touches every weight it uses
    path = wide_bf16_checkpoint / "model.safetensors"
    fused = ("qkv_proj", "gate_up_proj") if quantize is None else ("language_model.", "lm_head")
    viewed = [t for n, t in model.named_parameters() if not any(part in n for part in fused)]
    allowance = sum(t.nbytes for t in viewed) + 2 * 4096 * len(model.state_dict())  # + partial pages
    decoder = sum(t.nbytes for n, t in model.state_dict().items() if "language_model.layers" in n)
    assert resident_kib(path) * 1024 <= allowance < decoder  # without the release: the decoder's pages too
