"""LoRA adapters against `peft` wrapping transformers' AF3: logits merged and unmerged, unmerge, and every
broken adapter folder a clear CheckpointError raised before the model changes."""

import json
import math
import shutil

import peft
import pytest
import torch
from conftest import SR, speech_like
from hypothesis import given, settings
from hypothesis import strategies as st
from minaf3.weights.adapter import map_names
from safetensors.torch import load_file, save_file

from minaf3 import AudioFlamingo3ForConditionalGeneration, CheckpointError, ConfigError
from minaf3.linear import Linear
from minaf3.lora import LoRALinear, LoRAUpdate, load_adapter, lora_updates, merge, unmerge

LM_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Adapters whose settings differ in every way that changes the result: rank, alpha, rsLoRA, per-module rank,
# targets as a list with an exclusion or as a regex reaching the encoder and the projector, a saved module,
# trained biases. Their non_lora_trainables use the original NVIDIA names behind the two prefixes seen in the
# wild; "lm_rank_pattern" replaces a LoRA target's own base weight, which must come before the LoRA is added.
ADAPTERS = {
    "lm_rank_pattern": dict(
        config=dict(
            r=4,
            lora_alpha=8,
            target_modules=LM_LINEARS,
            exclude_modules=r".*audio_tower.*",
            rank_pattern={"down_proj": 2},
            alpha_pattern={"o_proj": 3},
        ),
        non_lora={
            "base_model.model.sound_mm_projector.layers.0.weight": "model.multi_modal_projector.linear_1",
            "base_model.model.llm.model.layers.1.input_layernorm.weight": (
                "model.language_model.layers.1.input_layernorm"
            ),
            "base_model.model.llm.model.layers.0.self_attn.q_proj.weight": (
                "model.language_model.layers.0.self_attn.q_proj"
            ),
        },
        # LoRA layers, and (rank, scaling) of some: down_proj's rank and o_proj's alpha come from the patterns
        expect=(
            14,  # 7 per decoder layer, none in the excluded encoder
            {
                "language_model.layers.0.mlp.down_proj": (2, 8 / 2),
                "language_model.layers.1.self_attn.o_proj": (4, 3 / 4),
                "language_model.layers.1.self_attn.q_proj": (4, 8 / 4),
            },
        ),
    ),
    "rslora_regex": dict(
        config=dict(
            r=6,
            lora_alpha=5,
            use_rslora=True,
            target_modules=r".*\.(q_proj|v_proj|fc1|up_proj|linear_1)",
            modules_to_save=["lm_head"],
        ),
        non_lora={
            "model.sound_tower.sound_tower.layer_norm.weight": "model.audio_tower.layer_norm",
            "model.llm.model.norm.weight": "model.language_model.norm",
        },
        expect=(
            13,  # q, v, fc1 in 2 encoder layers; q, v, up in 2 decoder layers; the projector's linear_1
            {
                "audio_tower.layers.1.fc1": (6, 5 / math.sqrt(6)),
                "multi_modal_projector.linear_1": (6, 5 / math.sqrt(6)),
            },
        ),
    ),
    # Trained biases (saved as `<module>.base_layer.bias`) in a pickled adapter_model.bin, no replacements.
    "bias_bin": dict(
        config=dict(
            r=3, lora_alpha=7, target_modules=["out_proj", "linear_2", "q_proj", "o_proj"], bias="lora_only"
        ),
        non_lora={},
        safe_serialization=False,
        expect=(
            9,
            {
                "multi_modal_projector.linear_2": (3, 7 / 3),
                "audio_tower.layers.0.self_attn.out_proj": (3, 7 / 3),
            },
        ),
    ),
}


def reference_inputs(processor) -> dict:
    """Two conversations of different lengths, so the batch holds padding."""
    convs = [
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": question},
                    {"type": "audio", "audio": speech_like(n, SR, seed)},
                ],
            }
        ]
        for seed, (question, n) in enumerate(
            [("Transcribe the input speech.", 40_000), ("Describe it.", 20_000)]
        )
    ]
    return dict(
        processor.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    )


def write_adapter(folder, checkpoint, spec: dict, seed: int):
    """Save a peft adapter with random non-zero trained tensors plus non_lora_trainables.bin.

    Returns the peft model (on a fresh transformers model) with the replacement tensors applied to it.
    """
    from transformers import AudioFlamingo3ForConditionalGeneration as Reference

    reference = Reference.from_pretrained(checkpoint, dtype=torch.float32).eval()
    model = peft.get_peft_model(reference, peft.LoraConfig(**spec["config"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # what peft trains is what it saves: A, B, saved modules, biases
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(folder, safe_serialization=spec.get("safe_serialization", True))
    non_lora = {}
    with torch.no_grad():
        for stored, module in spec["non_lora"].items():
            layer = reference.get_submodule(module)
            layer = getattr(layer, "base_layer", layer)  # a LoRA target's own weight sits in its base layer
            non_lora[stored] = 0.5 * torch.randn(layer.weight.shape, generator=generator)
            layer.weight.copy_(non_lora[stored])
    if non_lora:
        torch.save(non_lora, folder / "non_lora_trainables.bin")
    return model.eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_checkpoint, reference_model, reference_processor):
    """name -> (name, folder, inputs, peft logits with the adapter, logits without it), built once."""
    built = {}

    def get(name: str):
        if name not in built:
            folder = tmp_path_factory.mktemp(f"lora_{name}") / "think"
            model = write_adapter(folder, tiny_checkpoint, ADAPTERS[name], seed=len(name))
            inputs = reference_inputs(reference_processor)
            with torch.no_grad():
                on = model(**inputs).logits
                off = reference_model(**inputs).logits
            built[name] = (name, folder, inputs, on, off)
        return built[name]

    return get


@pytest.fixture(params=list(ADAPTERS))
def adapter(request, adapters):
    return adapters(request.param)


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def fresh(checkpoint) -> AudioFlamingo3ForConditionalGeneration:
    return AudioFlamingo3ForConditionalGeneration.from_pretrained(checkpoint)


@pytest.mark.parametrize("merged", [True, False])
def test_logits_match_peft(adapter, tiny_checkpoint, merged):
    _, folder, inputs, on, off = adapter
    assert (on - off).abs().max() > 1e-2  # the adapter changes the logits: the comparison is not vacuous
    model = fresh(tiny_checkpoint)
    load_adapter(model, folder, merge=merged)
    assert (logits(model, inputs) - on).abs().max() < 1e-4
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.merged == merged for m in layers)


def test_merge_then_unmerge(adapter, tiny_checkpoint):
    _, folder, inputs, on, _ = adapter
    model = fresh(tiny_checkpoint)
    load_adapter(model, folder, merge=False)
    assert merge(model) > 0
    assert all(m.merged for m in model.modules() if isinstance(m, LoRALinear))
    assert (logits(model, inputs) - on).abs().max() < 1e-4


@pytest.mark.parametrize("merged", [True, False])
def test_unmerge_restores_the_base_model(adapter, tiny_checkpoint, merged):
    """LoRA updates subtracted, plain layers back, replaced tensors restored: the base model's logits."""
    _, folder, inputs, _, off = adapter
    base = fresh(tiny_checkpoint).state_dict()
    model = fresh(tiny_checkpoint)
    load_adapter(model, folder, merge=merged)
    assert unmerge(model) > 0
    assert (logits(model, inputs) - off).abs().max() < 1e-4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    state = model.state_dict()
    assert list(state) == list(base)
    assert all(torch.allclose(state[k], base[k], atol=1e-6) for k in base)
    load_adapter(model, folder)  # and the adapter can be loaded again
    assert (logits(model, inputs) - adapter[3]).abs().max() < 1e-4


def test_settings_come_from_the_config(adapter, tiny_checkpoint):
    name, folder, *_ = adapter
    config = ADAPTERS[name]["config"]
    model = fresh(tiny_checkpoint)
    settings = load_adapter(model, folder, merge=False)
    assert (settings.r, settings.alpha, settings.use_rslora) == (
        config["r"],
        config["lora_alpha"],
        config.get("use_rslora", False),
    )
    updates = lora_updates(model)
    count, spots = ADAPTERS[name]["expect"]
    assert len(updates) == count
    for module, (r, scaling) in spots.items():
        assert updates[module].lora_A.shape[0] == r and math.isclose(updates[module].scaling, scaling), module


def test_names_map_through_the_checkpoint_tables():
    """Each wrapper prefix and layout spelling of a name reaches the same parameter of ours."""
    spellings = {
        "language_model.layers.1.mlp.up_proj.weight": [
            "base_model.model.model.language_model.layers.1.mlp.up_proj.weight",  # peft on transformers 5
            "base_model.model.language_model.model.layers.1.mlp.up_proj.weight",  # hub names
            "model.llm.model.layers.1.mlp.up_proj.base_layer.weight",  # nvidia, AF3 prefix, peft's base_layer
        ],
        "audio_tower.conv1.bias": [
            "base_model.model.model.audio_tower.conv1.bias",
            "base_model.model.sound_tower.sound_tower.conv1.bias",  # VILA's wrapper holds the encoder twice
            "base_model.model.sound_tower.conv1.bias",
        ],
        "multi_modal_projector.linear_2.weight": [
            "multi_modal_projector.linear_2.weight",
            "base_model.model.sound_mm_projector.layers.2.weight",
        ],
        "lm_head.weight": ["base_model.model.lm_head.weight", "llm.lm_head.weight"],
    }
    for ours, names in spellings.items():
        for name in names:
            mapped, *_ = map_names([name])
            assert mapped == {name: ours}, name
    assert map_names(["base_model.model.model.language_model.layers.0.mlp.fc9.weight"])[0] == {}


@settings(max_examples=25, deadline=None)
@given(
    st.integers(1, 8),
    st.integers(2, 8),
    st.integers(1, 4),
    st.booleans(),
    st.floats(0.1, 4.0),
    st.integers(0, 99),
    st.integers(1, 7),
)
def test_lora_linear_math(n_in, n_out, r, bias, scaling, seed, split):
    """Unmerged: x W^T + b + s (x A^T) B^T on each update's rows (a fused layer's parts: rows [0, k) and
    [k, n_out)); merged: the same through W + s B A; unmerge restores W."""
    g = torch.Generator().manual_seed(seed)
    base = Linear(n_in, n_out, bias=bias, dtype=torch.float64)
    weight = base.weight.detach().clone()
    k = min(split, n_out - 1)
    A1, A2 = (torch.randn(r, n_in, generator=g, dtype=torch.float64) for _ in range(2))
    B1, B2 = (
        torch.randn(k, r, generator=g, dtype=torch.float64),
        torch.randn(n_out - k, r, generator=g).double(),
    )
    x = torch.randn(3, n_in, generator=g, dtype=torch.float64)
    updates = [
        LoRAUpdate("first", slice(0, k), A1, B1, scaling, base.weight),
        LoRAUpdate("second", slice(k, n_out), A2, B2, 2 * scaling, base.weight),
    ]
    layer = LoRALinear(base, updates)
    delta = torch.cat([scaling * B1 @ A1, 2 * scaling * B2 @ A2])
    expected = torch.nn.functional.linear(x, weight + delta, base.bias)
    assert torch.allclose(layer(x), expected)
    layer.merge()
    assert torch.allclose(layer(x), expected)
    layer.unmerge()
    assert torch.allclose(layer.weight, weight) and torch.allclose(layer(x), expected)


# ---- broken adapters --------------------------------------------------------------------------------------
@pytest.fixture
def broken(tmp_path, adapters):
    """A copy of the first adapter's folder, to damage."""
    _, folder, *_ = adapters("lm_rank_pattern")
    return shutil.copytree(folder, tmp_path / "think")


def assert_refused(checkpoint, folder, *fragments, error=CheckpointError):
    model = fresh(checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as info:
        load_adapter(model, folder)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # checked before anything changed
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def edit_config(folder, **changes):
    config = json.loads((folder / "adapter_config.json").read_text())
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_missing_config(broken, tiny_checkpoint):
    (broken / "adapter_config.json").unlink()
    assert_refused(tiny_checkpoint, broken, "adapter_config.json", "adapter_model.safetensors")


def test_checkpoint_folder_points_to_think(broken, tiny_checkpoint):
    assert_refused(tiny_checkpoint, broken.parent, "think/")


def test_target_that_does_not_exist(broken, tiny_checkpoint):
    edit_config(broken, target_modules=LM_LINEARS + ["qkv_proj"])
    assert_refused(tiny_checkpoint, broken, "'qkv_proj' names no module")


def test_target_without_tensors_and_tensors_without_target(broken, tiny_checkpoint):
    edit_config(broken, target_modules=["q_proj", "fc2"], exclude_modules=None)
    assert_refused(
        tiny_checkpoint,
        broken,
        "model.audio_tower.layers.0.fc2 (our audio_tower.layers.0.fc2): lora_A and lora_B",
        "self_attn.k_proj.lora_A.weight: LoRA on language_model.layers.0.self_attn.k_proj, not a target",
    )


def test_wrong_rank_in_config(broken, tiny_checkpoint):
    edit_config(broken, r=8)
    assert_refused(
        tiny_checkpoint, broken, "self_attn.q_proj.lora_A.weight: expected (8, 64)", "found (4, 64)"
    )


def test_wrong_shaped_tensors(broken, tiny_checkpoint):
    tensors = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.model.language_model.layers.1.mlp.up_proj.lora_B.weight"
    tensors[key] = tensors[key][:-1]
    save_file(tensors, broken / "adapter_model.safetensors")
    non_lora = torch.load(broken / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.sound_mm_projector.layers.0.weight"] = torch.zeros(3, 3)
    torch.save(non_lora, broken / "non_lora_trainables.bin")
    assert_refused(
        tiny_checkpoint,
        broken,
        "up_proj.lora_B.weight: expected (128, 4)",
        "found (127, 4)",
        "sound_mm_projector.layers.0.weight (our multi_modal_projector.linear_1.weight): expected (64, 32)",
    )


def test_unknown_tensor_names(broken, tiny_checkpoint):
    tensors = load_file(broken / "adapter_model.safetensors")
    tensors["base_model.model.model.language_model.layers.0.self_attn.qkv.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.model.language_model.layers.0.mlp.up_proj.lora_magnitude_vector"] = torch.zeros(
        4
    )
    save_file(tensors, broken / "adapter_model.safetensors")
    non_lora = torch.load(broken / "non_lora_trainables.bin", weights_only=True)
    non_lora["base_model.model.sound_mm_projector.layers.5.weight"] = torch.zeros(3)
    torch.save(non_lora, broken / "non_lora_trainables.bin")
    assert_refused(
        tiny_checkpoint,
        broken,
        "layers.0.self_attn.qkv.lora_A.weight",
        "tensors of unsupported LoRA variants",
        "up_proj.lora_magnitude_vector",
        "sound_mm_projector.layers.5.weight",
    )


def test_unsupported_settings_and_damaged_files(broken, tiny_checkpoint):
    edit_config(broken, use_dora=True)
    assert_refused(tiny_checkpoint, broken, "use_dora")
    edit_config(broken, use_dora=False, target_modules="(q_proj")
    assert_refused(tiny_checkpoint, broken, "'(q_proj' is not a valid regular expression")
    edit_config(broken, target_modules=LM_LINEARS, rank_pattern={"down_proj": 0})
    assert_refused(tiny_checkpoint, broken, "rank_pattern={'down_proj': 0}")
    edit_config(broken, rank_pattern={"down_proj": 2})
    (broken / "non_lora_trainables.bin").write_bytes(b"not a pickle")
    assert_refused(tiny_checkpoint, broken, "non_lora_trainables.bin: could not be read")
    (broken / "adapter_config.json").write_text("{")
    assert_refused(tiny_checkpoint, broken, "adapter_config.json: not valid JSON")


def test_second_adapter_is_refused(adapter, tiny_checkpoint):
    _, folder, *_ = adapter
    model = fresh(tiny_checkpoint)
    load_adapter(model, folder)
    with pytest.raises(ConfigError, match="already holds an adapter"):
        load_adapter(model, folder)
