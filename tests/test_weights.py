"""weights/: the three layouts read into the reference model's exact tensors; every broken checkpoint is a
clear CheckpointError raised before any tensor is used."""

import json
import os
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.weights.layouts import (
    HUB,
    LAYOUTS,
    checkpoint_names,
    count_layers,
    expand,
    our_names,
    scan_checkpoint,
    write_layout,
)
from minaf3.weights.loader import checkpoint_files, read_checkpoint
from safetensors.torch import load_file, save_file

from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError


def ours(reference_name: str) -> str:
    """transformers 5's in-memory name -> ours: the same path without the wrapper's `model.`."""
    return reference_name.removeprefix("model.")


def reference_tensors(model) -> dict[str, torch.Tensor]:
    return {ours(name): t for name, t in model.state_dict().items()}


def shapes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Size]:
    return {name: t.shape for name, t in tensors.items()}


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name


@pytest.fixture(scope="module")
def sharded_reference(tiny_checkpoint_sharded):
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    return Reference.from_pretrained(tiny_checkpoint_sharded, dtype=torch.float32).eval()


@pytest.fixture
def broken(tmp_path, tiny_checkpoint):
    """A copy of the single-file checkpoint, and its tensors to rewrite (copies: load_file returns views of
    the mapped file, which rewriting that file in place would pull from under them)."""
    path = shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")
    return path, {name: t.clone() for name, t in load_file(path / "model.safetensors").items()}


@pytest.fixture
def broken_sharded(tmp_path, tiny_checkpoint_sharded):
    path = shutil.copytree(tiny_checkpoint_sharded, tmp_path / "ckpt")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    return path, index


def error_of(path, expected) -> str:
    with pytest.raises(CheckpointError) as e:
        read_checkpoint(path, expected)
    return str(e.value)


# ---- the reference's tensors, in every layout ------------------------------------------------------------
def test_hub_file_reads_the_reference_tensors(tiny_checkpoint, reference_model):
    want = reference_tensors(reference_model)
    assert scan_checkpoint(tiny_checkpoint)[0].name == "hub"
    assert_same(read_checkpoint(tiny_checkpoint, shapes(want)), want)


def test_hub_shards_read_the_reference_tensors(tiny_checkpoint_sharded, sharded_reference):
    want = reference_tensors(sharded_reference)
    assert len(list(tiny_checkpoint_sharded.glob("model-*.safetensors"))) > 2
    assert_same(read_checkpoint(tiny_checkpoint_sharded, shapes(want)), want)


@pytest.mark.parametrize("layout", ["transformers5", "nvidia", "hub"])
@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
@pytest.mark.parametrize(
    "source,reference",
    [("tiny_checkpoint", "reference_model"), ("tiny_checkpoint_sharded", "sharded_reference")],
)
def test_rewritten_layouts_read_identical_tensors(
    request, tmp_path, source, reference, layout, max_shard_bytes
):
    source = request.getfixturevalue(source)
    want = reference_tensors(request.getfixturevalue(reference))
    path = write_layout(source, tmp_path / layout, layout, max_shard_bytes=max_shard_bytes)
    assert scan_checkpoint(path)[0].name == layout
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    # The folder holding the decoder (the root, or llm/) is the one large enough to need shards.
    decoder_folder = path / LAYOUTS[layout].folders[0]
    assert (decoder_folder / "model.safetensors.index.json").is_file() == (max_shard_bytes is not None)
    assert_same(read_checkpoint(path, shapes(want)), want)


def stored_names(folder) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        names |= set(load_file(file))
    return names


def test_rewritten_names_are_the_published_ones(tmp_path, tiny_checkpoint, reference_model):
    """Layout 2 is transformers' in-memory state_dict; layout 3 what convert_audioflamingo3_to_hf.py reads."""
    hub = stored_names(tiny_checkpoint)
    assert stored_names(write_layout(tiny_checkpoint, tmp_path / "t5", "transformers5")) == set(
        reference_model.state_dict()
    )
    nvidia = write_layout(tiny_checkpoint, tmp_path / "nv", "nvidia")
    # The conversion script prefixes llm -> language_model, sound_tower -> audio_tower, renames the projector.
    assert {"language_model." + n for n in stored_names(nvidia / "llm")} == {
        n for n in hub if n.startswith("language_model.")
    }
    assert {"audio_tower." + n for n in stored_names(nvidia / "sound_tower")} == {
        n for n in hub if n.startswith("audio_tower.")
    }
    assert stored_names(nvidia / "sound_mm_projector") == {
        f"layers.{i}.{leaf}" for i in (0, 2) for leaf in ("weight", "bias")
    }


def mapped_from(tensor: torch.Tensor, file) -> bool:
    """Whether the tensor's memory lies in a mapping of `file` (Linux /proc/self/maps)."""
    address = tensor.untyped_storage().data_ptr()
    for line in open("/proc/self/maps"):
        span, *_, name = line.split()
        start, end = (int(x, 16) for x in span.split("-"))
        if name == str(file) and start <= address < end:
            return True
    return False


def test_views_and_copies_outlive_a_replaced_file(broken, reference_model):
    path, tensors = broken
    file = path / "model.safetensors"
    want = reference_tensors(reference_model)
    views = read_checkpoint(path, shapes(want))  # fp32 stored, fp32 wanted on CPU: views of the mapped file
    copies = read_checkpoint(path, shapes(want), dtype=torch.bfloat16, device=torch.device("cpu"))
    assert mapped_from(views["lm_head.weight"], file) and not mapped_from(copies["lm_head.weight"], file)
    assert all(
        copies[n].dtype == torch.bfloat16 and torch.equal(copies[n], t.bfloat16()) for n, t in want.items()
    )
    # A save that writes a new file and renames it over the old one (as save_pretrained does) leaves both be.
    save_file({name: torch.zeros_like(t) for name, t in tensors.items()}, path / "new.safetensors")
    os.replace(path / "new.safetensors", file)
    assert_same(views, want)
    # Copies own their memory: even an in-place overwrite leaves them be.
    file.write_bytes(b"\0" * file.stat().st_size)
    assert all(torch.equal(copies[n], t.bfloat16()) for n, t in want.items())


# ---- name tables -------------------------------------------------------------------------------------------
def test_tables_cover_the_same_modules():
    assert all(list(layout.table) == list(HUB.table) for layout in LAYOUTS.values())
    table = expand(HUB.table, encoder_layers=2, decoder_layers=3)
    assert len(table) == 4 + 2 * 8 + 4 + 3 * 9 + 1  # top-level modules + 8 per encoder, 9 per decoder layer
    assert table["language_model.layers.2.mlp.up_proj"] == "language_model.model.layers.2.mlp.up_proj"
    assert count_layers(["audio_tower.layers.4.fc1.weight"], HUB.table, "e") == 5  # a gap stays a gap


@settings(max_examples=25, deadline=None)
@given(
    encoder_layers=st.integers(0, 40),
    decoder_layers=st.integers(0, 40),
    layout=st.sampled_from(list(LAYOUTS)),
)
def test_names_round_trip(encoder_layers, decoder_layers, layout):
    names = [
        f"{module}.{leaf}"
        for module in expand(HUB.table, encoder_layers, decoder_layers)
        for leaf in ("weight", "bias")
    ]
    stored = checkpoint_names(LAYOUTS[layout], names)
    assert len(set(stored.values())) == len(names)
    assert our_names(LAYOUTS[layout], stored.values()) == {theirs: name for name, theirs in stored.items()}


# ---- broken checkpoints: one clear error, before any tensor is used ---------------------------------------
def test_missing_unexpected_wrong_shape_and_dtype_in_one_error(broken, reference_model):
    path, tensors = broken
    expected = shapes(reference_tensors(reference_model))
    del tensors["audio_tower.conv1.bias"], tensors["language_model.model.layers.1.mlp.up_proj.weight"]
    tensors["audio_tower.extra.weight"] = torch.zeros(3)
    tensors["language_model.model.norm.weight"] = torch.zeros(7)
    tensors["multi_modal_projector.linear_1.bias"] = tensors["multi_modal_projector.linear_1.bias"].long()
    save_file(tensors, path / "model.safetensors")
    message = error_of(path, expected)
    assert "(hub layout) does not match the model" in message
    assert "missing tensors (2):" in message and "audio_tower.conv1.bias" in message
    assert "language_model.layers.1.mlp.up_proj.weight (stored as language_model.model.layers.1." in message
    assert (
        "unexpected tensors, not in the model (1)" in message
        and "audio_tower.extra.weight in model.safetensors" in message
    )
    assert (
        "language_model.norm.weight (stored as language_model.model.norm.weight): the model expects (64,), "
        "model.safetensors holds (7,)" in message
    )
    assert "multi_modal_projector.linear_1.bias: model.safetensors holds I64; expected F16, BF16" in message


@pytest.mark.parametrize("kind", ["missing", "unexpected", "shape", "dtype"])
def test_each_mismatch_alone(broken, reference_model, kind):
    path, tensors = broken
    expected = shapes(reference_tensors(reference_model))
    name = "audio_tower.layers.0.fc1.weight"
    if kind == "missing":
        del tensors[name]
    elif kind == "unexpected":
        tensors["audio_tower.layers.0.fc3.weight"] = tensors[name].clone()
    elif kind == "shape":
        tensors[name] = tensors[name][:, :-1].contiguous()
    else:
        tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, path / "model.safetensors")
    message = error_of(path, expected)
    assert message.count(" (1):\n") == 1  # one section, one tensor
    named = "audio_tower.layers.0.fc3.weight in model.safetensors" if kind == "unexpected" else name
    assert named in message


def test_long_lists_show_twenty_and_a_count(broken, reference_model):
    path, tensors = broken
    expected = shapes(reference_tensors(reference_model))
    for name in sorted(tensors)[:25]:
        del tensors[name]
    save_file(tensors, path / "model.safetensors")
    message = error_of(path, expected)
    assert "missing tensors (25):" in message and "... and 5 more" in message
    assert message.count("\n    ") == 21


def test_corrupt_truncated_padded_and_random_files(broken, reference_model):
    path, _ = broken
    expected = shapes(reference_tensors(reference_model))
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:8] + b"#" * 40 + data[48:])
    assert "model.safetensors: corrupt safetensors header, not valid JSON" in error_of(path, expected)
    file.write_bytes(data[:-100])
    assert "model.safetensors: truncated: the header describes" in error_of(path, expected)
    file.write_bytes(data + b"\0" * 16)
    assert "model.safetensors: corrupt: 16 bytes follow the last tensor" in error_of(path, expected)
    file.write_bytes(os.urandom(4096))
    assert "model.safetensors: not a safetensors file or a corrupt one" in error_of(path, expected)
    file.write_bytes(b"\x01\x02")
    assert "model.safetensors: 2 bytes, too short" in error_of(path, expected)


def test_damaged_shards_are_listed_together(broken_sharded, sharded_reference):
    path, index = broken_sharded
    expected = shapes(reference_tensors(sharded_reference))
    shards = sorted(path.glob("model-*.safetensors"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-1])
    message = error_of(path, expected)
    assert "damaged or incomplete checkpoint" in message and "problems (2)" in message
    assert f"{shards[0].name}: missing; model.safetensors.index.json lists it for" in message
    assert f"{shards[1].name}: truncated" in message


def test_index_that_disagrees_with_its_shards(broken_sharded, sharded_reference):
    path, index = broken_sharded
    expected = shapes(reference_tensors(sharded_reference))
    dropped, moved = sorted(index["weight_map"])[:2]
    shard = index["weight_map"].pop(dropped)
    other = next(s for s in set(index["weight_map"].values()) if s != index["weight_map"][moved])
    index["weight_map"][moved] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    message = error_of(path, expected)
    assert f"{shard}: holds {dropped}, which model.safetensors.index.json does not list" in message
    assert f"model.safetensors.index.json: lists {moved} in {other}, but " in message
    index["weight_map"][moved] = "../elsewhere.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "'../elsewhere.safetensors' is not a safetensors file name" in error_of(path, expected)
    (path / "model.safetensors.index.json").write_text("{not json")
    assert "model.safetensors.index.json: not a valid safetensors index" in error_of(path, expected)


def test_folders_without_a_checkpoint(tmp_path, tiny_checkpoint, reference_model):
    expected = shapes(reference_tensors(reference_model))
    assert "checkpoint folder not found" in error_of(tmp_path / "nowhere", expected)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    message = error_of(tmp_path / "empty", expected)
    assert "no checkpoint weights" in message and "config.json" in message
    (tmp_path / "other").mkdir()
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other" / "model.safetensors")
    assert "match no known layout" in error_of(tmp_path / "other", expected)
    for name in ("a", "b"):
        save_file({"x": torch.zeros(2)}, tmp_path / "other" / f"{name}.safetensors")
    (tmp_path / "other" / "model.safetensors").unlink()
    assert "no model.safetensors.index.json" in error_of(tmp_path / "other", expected)
    nvidia = write_layout(tiny_checkpoint, tmp_path / "nv", "nvidia")
    shutil.rmtree(nvidia / "sound_mm_projector")
    assert "sound_mm_projector/: missing" in error_of(nvidia, expected)
    with pytest.raises(ConfigError, match="layout 'llava'"):
        write_layout(tiny_checkpoint, tmp_path / "x", "llava")


def test_checkpoint_files(broken):
    path, _ = broken
    found = checkpoint_files(path, required=("config", "tokenizer", "chat template"))
    assert found["chat template"] == path / "chat_template.jinja"
    assert found["processor config"] == path / "processor_config.json"
    (path / "config.json").unlink()
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError) as e:
        checkpoint_files(path, required=("config", "tokenizer", "generation config"))
    assert "missing files (2):" in str(e.value) and "config (config.json)" in str(e.value)
    assert "tokenizer (tokenizer.json)" in str(e.value) and "model.safetensors" in str(e.value)


# ---- the model, end to end ---------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["transformers5", "nvidia"])
def test_model_loads_every_layout_with_identical_logits(tmp_path, tiny_checkpoint_sharded, layout):
    hub = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_checkpoint_sharded)
    # 400 real mel frames give 100 audio tokens, so the encoder and projector weights count too.
    sound = hub.config.audio_token_id
    inputs = dict(
        input_ids=torch.tensor([[5, 17] + [sound] * 100 + [42, 9]]),
        input_features=torch.randn(1, 128, 3000, generator=torch.Generator().manual_seed(0)),
        input_features_mask=(torch.arange(3000) < 400).int()[None],
    )
    with torch.no_grad():
        want = hub(**inputs).logits
    for max_shard_bytes in (None, 60_000):
        path = write_layout(tiny_checkpoint_sharded, tmp_path / str(max_shard_bytes), layout, max_shard_bytes)
        model = AudioFlamingo3ForConditionalGeneration.from_pretrained(path)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, want)
