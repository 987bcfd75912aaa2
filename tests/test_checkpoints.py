import json
import os
import pickle
import warnings

import pytest
import torch

from mambakit import load_pretrained
from mambakit.checkpoints import CheckpointError, read_state_dict
from mambakit.tokenizer import ByteTokenizer
from tests.fixtures import tiny_model

transformers = pytest.importorskip("transformers")  # a test dependency ([test] extra), installed by `make test`


def hf_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "mamba":
        config = transformers.MambaConfig(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2,
                                          expand=2, conv_kernel=4, time_step_rank=4)
        model = transformers.MambaForCausalLM(config)
    else:
        groups = int(kind[-1])
        config = transformers.Mamba2Config(vocab_size=300, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                                           num_heads=8, head_dim=8, n_groups=groups, chunk_size=8, conv_kernel=4)
        model = transformers.Mamba2ForCausalLM(config)
    with torch.no_grad():  # move every weight off its initial value so that no term hides
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt" not in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(autouse=True)
def quiet_transformers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.logging.set_verbosity_error()
        yield


@pytest.mark.parametrize("kind", ["mamba", "mamba2-g1", "mamba2-g2"])
def test_transformers_checkpoint_gives_the_same_logits_and_greedy_text(kind, tmp_path):
    reference = hf_model(kind)
    reference.save_pretrained(tmp_path)
    model = load_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)[..., :300]
    assert (got - expected).abs().max().item() < 1e-4
    prompt = ids[:1, :6]
    hf_out = reference.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert torch.equal(model.generate(prompt, max_new_tokens=32, temperature=0), hf_out)


@pytest.mark.parametrize("kind", ["mamba1", "mamba2-g2"])
def test_what_we_write_in_hf_format_loads_in_transformers(kind, tmp_path):
    model = tiny_model(kind, dtype=torch.float32, pad_vocab_size_multiple=1)
    model.save_pretrained(tmp_path, format="hf")
    cls = transformers.MambaForCausalLM if kind == "mamba1" else transformers.Mamba2ForCausalLM
    theirs = cls.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 61, (2, 13))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "kind,hybrid,fmt",
    [("mamba1", False, "hf"), ("mamba2", False, "hf"), ("mamba1", True, "mamba_ssm"), ("mamba2-g2", True, "mamba_ssm"),
     ("mamba3", False, "mamba_ssm"), ("mamba3-mimo", True, "mamba_ssm")],
)
def test_round_trip_is_bit_exact(kind, hybrid, fmt, tmp_path):
    overrides = {"pad_vocab_size_multiple": 1} if fmt == "hf" else {}
    model = tiny_model(kind, hybrid, dtype=torch.float32, **overrides)
    model.save_pretrained(tmp_path, format=fmt)
    loaded = load_pretrained(tmp_path)
    if fmt == "mamba_ssm":
        assert loaded.config == model.config
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    for (name, a), (name_b, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == name_b and torch.equal(a, b), name
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_hf_format_refuses_what_it_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="format"):
        tiny_model("mamba3", dtype=torch.float32, pad_vocab_size_multiple=1).save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="unpadded vocabulary"):
        tiny_model("mamba1", dtype=torch.float32).save_pretrained(tmp_path, format="hf")
    with pytest.raises(ValueError, match="format: expected"):
        tiny_model("mamba1", dtype=torch.float32).save_pretrained(tmp_path, format="gguf")


def _shard(state: dict, directory, suffix: str) -> None:
    """Write ``state`` as two shards plus an index, as transformers does for large models."""
    names = sorted(state)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves):
        file = f"model-0000{i + 1}-of-00002.{suffix}"
        shard = {k: state[k].contiguous() for k in part}
        if suffix == "safetensors":
            from safetensors.torch import save_file

            save_file(shard, str(directory / file))
        else:
            torch.save(shard, directory / file)
        weight_map.update({k: file for k in part})
    index = "model.safetensors.index.json" if suffix == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_sharded_checkpoints(suffix, tmp_path):
    reference = hf_model("mamba2-g1")
    reference.save_pretrained(tmp_path)
    state = read_state_dict(tmp_path)
    for f in ("model.safetensors", "pytorch_model.bin"):
        if (tmp_path / f).exists():
            (tmp_path / f).unlink()
    _shard(state, tmp_path, suffix)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (load_pretrained(tmp_path)(ids)[..., :300] - reference(ids).logits).abs().max().item() < 1e-4


def test_safetensors_preferred_over_bin(tmp_path):
    model = tiny_model("mamba1", dtype=torch.float32, pad_vocab_size_multiple=1)
    model.save_pretrained(tmp_path, format="hf")
    poisoned = {k: torch.zeros_like(v) for k, v in read_state_dict(tmp_path).items()}
    torch.save(poisoned, tmp_path / "pytorch_model.bin")
    loaded = load_pretrained(tmp_path)
    assert torch.equal(loaded.backbone.layers[0].mixer.in_proj.weight, model.backbone.layers[0].mixer.in_proj.weight)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned_marker",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model("mamba1", dtype=torch.float32)
    model.save_pretrained(tmp_path / "ckpt", format="mamba_ssm")
    state = dict(model.state_dict())
    with open(tmp_path / "ckpt" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"backbone.embedding.weight": _Exploit(), **{k: v for k, v in state.items() if "embedding" not in k}}, f)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_pretrained(tmp_path / "ckpt")
    assert not (tmp_path / "pwned_marker").exists()


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    model = tiny_model("mamba1", dtype=torch.float32)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    state = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
    state["backbone.layers.0.mixer.D"] = torch.ones(5)
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"backbone\.layers\.0\.mixer\.D: checkpoint shape \(5,\) does not match the model's \(64,\)"):
        load_pretrained(tmp_path)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json is missing"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 10, "colour": "red"}))
    with pytest.raises(ValueError, match="unknown fields"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 32, "n_layer": 1, "vocab_size": 10}))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model_type 'llama'"):
        load_pretrained(tmp_path)


def test_interrupted_save_leaves_no_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_model("mamba1", dtype=torch.float32, pad_vocab_size_multiple=1).save_pretrained(tmp_path, format="hf")
    assert sorted(os.listdir(tmp_path)) == []


def test_tokenizer_choice(tmp_path):
    model = tiny_model("mamba1", dtype=torch.float32)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    assert isinstance(load_pretrained(tmp_path).tokenizer, ByteTokenizer)
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {c: i for i, c in enumerate("abcdefghij")}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_pretrained(tmp_path).tokenizer
    assert loaded.encode("cab") == [2, 0, 1]


# The official mamba_ssm 2.x MambaConfig dataclass's fields (read from its source); its
# from_pretrained calls MambaConfig(**config.json), so any other key is a TypeError there.
OFFICIAL_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg",
                   "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings"}


@pytest.mark.parametrize("kind,hybrid", [("mamba1", False), ("mamba2", True), ("mamba3", False)])
def test_official_format_config_has_only_official_fields(tmp_path, kind, hybrid):
    model = tiny_model(kind, hybrid, dtype=torch.float32)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) <= OFFICIAL_FIELDS
    assert config["d_model"] == model.config.d_model and config["ssm_cfg"] == model.config.ssm_cfg


def test_official_format_keeps_extensions_a_model_uses(tmp_path):
    model = tiny_model("mamba1", dtype=torch.float32, norm_epsilon=1e-6, binary_projections=True)
    model.save_pretrained(tmp_path, format="mamba_ssm")
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["norm_epsilon"] == 1e-6 and config["binary_projections"] is True
    loaded = load_pretrained(tmp_path)
    assert loaded.config.norm_epsilon == 1e-6 and loaded.config.binary_projections
