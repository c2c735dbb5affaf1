"""weights/hub.py: model ids resolve from the Hugging Face cache, laid out here in a temporary folder.

No network: HF_HUB_OFFLINE=1 throughout, so huggingface_hub reads only the cache. The layout is the hub
cache's own (models--owner--name/{refs,snapshots,blobs}), written as huggingface_hub writes it.
"""

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from minaf3.weights.hub import is_model_id, model_folder

import minaf3
from minaf3 import AudioFlamingo3ForConditionalGeneration, AutoProcessor, CheckpointError

REPO = "tiny-org/tiny-af3"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache, offline."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def cache_snapshot(cache: Path, checkpoint: Path, skip: tuple[str, ...] = (), repo_id: str = REPO) -> Path:
    """Put `checkpoint`'s files into the cache as the hub client does: blobs, a snapshot of symlinks to
    them, and refs/main naming the commit. Files in `skip` are left out, as by a download that stopped."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for source in checkpoint.rglob("*"):
        if source.is_dir() or source.name in skip:
            continue
        blob = repo / "blobs" / f"{abs(hash(source.read_bytes())):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(checkpoint)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def test_ids_and_paths_are_told_apart(tmp_path):
    assert is_model_id("nvidia/audio-flamingo-3-hf") and is_model_id("a.b/c_d-1")
    for path in ("audio-flamingo-3-hf", "./a/b", "/abs/path", "a/b/c", "../up", "a/..", "a/b."):
        assert not is_model_id(path), path
    folder = tmp_path / "owner" / "name"
    folder.mkdir(parents=True)
    assert model_folder(folder) == folder  # an existing folder is a folder, whatever its shape


def test_a_cached_id_loads_offline_through_every_entry_point(hub_cache, demo_checkpoint):
    clip = minaf3.load_audio(demo_checkpoint / "clip.wav")
    snapshot = cache_snapshot(hub_cache, demo_checkpoint)
    assert model_folder(REPO) == snapshot
    assert model_folder(REPO, revision=COMMIT) == snapshot
    pipe = minaf3.load(REPO)
    expected = minaf3.load(demo_checkpoint)
    kwargs = dict(max_new_tokens=4, do_sample=False)
    assert pipe.chat("What is it?", audio=clip, **kwargs) == expected.chat(
        "What is it?", audio=clip, **kwargs
    )
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(REPO)
    assert torch.equal(model.lm_head.weight, expected.model.lm_head.weight)
    assert AutoProcessor.from_pretrained(REPO).audio_token_id == expected.processor.audio_token_id


def test_an_id_missing_from_the_cache_offline_is_a_clear_error(hub_cache):
    with pytest.raises(CheckpointError, match=rf"{REPO}: not in the Hugging Face cache .*HF_HUB_OFFLINE=1"):
        minaf3.load(REPO)
    with pytest.raises(CheckpointError, match=rf"{REPO}: not in the Hugging Face cache"):
        AudioFlamingo3ForConditionalGeneration.from_pretrained(REPO)


def test_an_unknown_revision_offline_is_a_clear_error(hub_cache, demo_checkpoint):
    cache_snapshot(hub_cache, demo_checkpoint)
    with pytest.raises(CheckpointError, match=rf"{REPO}: not in the Hugging Face cache"):
        model_folder(REPO, revision="v9")


def test_a_download_that_stopped_half_way_is_refused_before_loading(hub_cache, demo_checkpoint):
    """The hub client moves a file into the snapshot only when it is whole: a stopped download leaves it
    out (its partial blob is `.incomplete`), and the folder is refused as incomplete, naming the file."""
    snapshot = cache_snapshot(hub_cache, demo_checkpoint, skip=("model.safetensors",))
    (snapshot.parents[1] / "blobs" / "f00d.incomplete").write_bytes(b"\0" * 100)
    with pytest.raises(CheckpointError, match=r"incomplete model folder, missing model\.safetensors"):
        minaf3.load(REPO)


def test_a_revision_with_a_folder_is_refused(demo_checkpoint):
    with pytest.raises(CheckpointError, match="revision='main' applies to hub model ids"):
        model_folder("no-such-folder-here", revision="main")
