"""Bad checkpoints: clear errors naming the file, keys and shapes; never silently re-initialised weights."""

import json
from pathlib import Path

import pytest
import torch
from helpers import randomize_decoder, seeded_classifier, tiny_config
from safetensors.torch import load_file, save_file

from evl_hf import EVLCheckpointError, EVLForVideoClassification, EVLModel


@pytest.fixture()
def saved(tmp_path):
    torch.manual_seed(0)
    model = EVLForVideoClassification(tiny_config())
    randomize_decoder(model)
    model.save_pretrained(tmp_path)
    return tmp_path, model


def test_every_tensor_loads_exactly_nothing_zeroed(saved):
    directory, model = saved
    loaded = EVLForVideoClassification.from_pretrained(directory)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # Biases and zero-initialised-by-default tensors really came from the file.
    assert loaded.evl.decoder.layers[0].cross_attention.k_proj.bias.abs().sum() > 0
    assert loaded.evl.decoder.layers[1].cross_frame_attention.next_frame_table.abs().sum() > 0


def test_truncated_weights_file(saved):
    directory, _ = saved
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt") as error:
        EVLForVideoClassification.from_pretrained(directory)
    assert str(directory) in str(error.value)


def test_corrupt_weights_header(saved):
    directory, _ = saved
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"\xff" * 32
    weights.write_bytes(bytes(data))
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt"):
        EVLForVideoClassification.from_pretrained(directory)


def test_missing_decoder_tensors_are_refused_not_reinitialised(saved):
    directory, _ = saved
    tensors = load_file(directory / "model.safetensors")
    del tensors["evl.decoder.layers.1.mlp.fc2.bias"], tensors["evl.decoder.query"]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EVLCheckpointError, match=r"missing: \['evl.decoder.layers.1.mlp.fc2.bias', 'evl.decoder.query'\]"):
        EVLForVideoClassification.from_pretrained(directory)


@pytest.mark.parametrize(
    "removed",
    [
        ["classifier.weight"],
        ["classifier.weight", "classifier.bias"],  # as a headless (num_labels=0) checkpoint, but config.json has labels
        ["classifier.weight", "classifier.bias", "fc_norm.weight", "fc_norm.bias"],
    ],
)
@pytest.mark.parametrize("architectures", ["saved", "missing"])
def test_a_classifier_checkpoint_missing_head_tensors_is_refused(saved, removed, architectures):
    # Only a checkpoint saved without a head (an EVLModel's) gets a new one: a classifier's that lost part or all of
    # it used to load with those tensors re-initialised. Its tensors' names say so, whatever config.json says.
    directory, _ = saved
    if architectures == "missing":
        config = json.loads((directory / "config.json").read_text())
        del config["architectures"]
        (directory / "config.json").write_text(json.dumps(config))
    tensors = load_file(directory / "model.safetensors")
    for key in removed:
        del tensors[key]
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(EVLCheckpointError, match=rf"missing: \[.*'{removed[0]}'"):
        EVLForVideoClassification.from_pretrained(directory)


def test_shapes_that_do_not_fit_the_config_are_refused(saved):
    directory, _ = saved
    config = json.loads((directory / "config.json").read_text())
    config["num_frames"] = 6  # the saved temporal position embeddings have 4 rows
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(EVLCheckpointError, match=r"temporal_position_embedding.embedding: checkpoint \(4, 32\) vs model \(6, 32\)"):
        EVLForVideoClassification.from_pretrained(directory)


def test_new_head_on_a_base_model_checkpoint_is_allowed(tmp_path):
    torch.manual_seed(0)
    base = EVLModel(tiny_config())
    base.save_pretrained(tmp_path)
    model = EVLForVideoClassification.from_pretrained(tmp_path)
    for key, value in base.state_dict().items():
        assert torch.equal(model.evl.state_dict()[key], value), key


@pytest.mark.parametrize("ignore_mismatched_sizes", [False, True])
def test_new_head_on_a_headless_classifier_checkpoint_is_allowed(tmp_path, ignore_mismatched_sizes):
    # A num_labels=0 classifier (logits are the video embeddings) saves its LayerNorm but no classifier tensors: like
    # an EVLModel checkpoint, it gets a new head for labels, with or without the flag.
    headless = seeded_classifier(tiny_config(num_labels=0))
    headless.save_pretrained(tmp_path)
    model = EVLForVideoClassification.from_pretrained(
        tmp_path, num_labels=3, ignore_mismatched_sizes=ignore_mismatched_sizes
    )
    assert model.classifier.weight.shape == (3, 32)
    for key, value in headless.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_new_label_count_with_ignore_mismatched_sizes(saved):
    directory, model = saved
    # A new head is the one mismatch the error suggests the flag for.
    with pytest.raises(EVLCheckpointError, match=r"classifier.weight: checkpoint \(5, 32\) vs model \(3, 32\)") as error:
        EVLForVideoClassification.from_pretrained(directory, num_labels=3)
    assert "ignore_mismatched_sizes=True" in str(error.value)
    resized = EVLForVideoClassification.from_pretrained(directory, num_labels=3, ignore_mismatched_sizes=True)
    assert resized.classifier.weight.shape == (3, 32)
    assert torch.equal(resized.evl.decoder.query, model.evl.decoder.query)


@pytest.mark.parametrize(
    "overrides, key, shapes",
    [
        (dict(num_frames=8), "evl.decoder.layers.0.temporal_position_embedding.embedding", r"\(4, 32\) vs model \(8, 32\)"),
        (dict(decoder_qkv_dim=64), "evl.decoder.layers.0.cross_attention.q_proj.weight", r"\(32, 32\) vs model \(64, 32\)"),
    ],
)
def test_ignore_mismatched_sizes_never_reinitialises_the_decoder(saved, overrides, key, shapes):
    # The flag allows a new classification head, never fresh decoder weights; the error does not suggest it.
    directory, _ = saved
    for ignore in (False, True):
        with pytest.raises(EVLCheckpointError, match=rf"{key}: checkpoint {shapes}") as error:
            EVLForVideoClassification.from_pretrained(directory, ignore_mismatched_sizes=ignore, **overrides)
        assert str(directory) in str(error.value) and "ignore_mismatched_sizes=True to" not in str(error.value)


def test_another_num_frames_is_refused_with_the_interpolation_pointed_out(saved):
    directory, model = saved
    with pytest.raises(EVLCheckpointError, match=r"num_frames=8 need not be changed.*interpolated") as error:
        EVLForVideoClassification.from_pretrained(directory, num_frames=8)
    assert "with its own num_frames (4)" in str(error.value)
    # As the message says: the checkpoint as saved runs 8-frame clips.
    clip = torch.randn(1, 8, 3, 32, 32)
    with torch.no_grad():
        assert EVLForVideoClassification.from_pretrained(directory)(clip).logits.shape == (1, 5)


def test_ignore_mismatched_sizes_refuses_decoder_mismatches_found_by_the_loader_too(saved):
    # A pickled checkpoint has no header to read before loading: the loader's own report is checked.
    directory, model = saved
    (directory / "model.safetensors").unlink()
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
    with pytest.raises(EVLCheckpointError, match=r"temporal_position_embedding.embedding"):
        EVLForVideoClassification.from_pretrained(directory, num_frames=8, ignore_mismatched_sizes=True)
    resized = EVLForVideoClassification.from_pretrained(directory, num_labels=3, ignore_mismatched_sizes=True)
    assert resized.classifier.weight.shape == (3, 32)


def hub_cache_snapshot(cache_dir: Path, repo_id: str, files_from: Path) -> Path:
    """A Hugging Face Hub cache entry for `repo_id` holding the files of the directory `files_from`, laid out as
    `huggingface_hub` downloads them (`models--org--name/snapshots/<commit>/`, `refs/main`), so that
    `from_pretrained(repo_id, cache_dir=...)` resolves it offline as it would a downloaded model."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files_from.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_hub_id_from_the_cache_gets_the_same_checks(saved, tmp_path_factory):
    # A Hub id resolves to a snapshot in the cache: its weights file is read before loading as a local directory's is.
    directory, model = saved
    cache = tmp_path_factory.mktemp("hub-cache")
    snapshot = hub_cache_snapshot(cache, "evl-tests/tiny", directory)
    loaded = EVLForVideoClassification.from_pretrained("evl-tests/tiny", cache_dir=cache)
    assert torch.equal(loaded.evl.decoder.query, model.evl.decoder.query)
    weights = snapshot / "model.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt") as error:
        EVLForVideoClassification.from_pretrained("evl-tests/tiny", cache_dir=cache)
    assert str(weights) in str(error.value)
    weights.write_bytes(intact)
    config = json.loads((snapshot / "config.json").read_text())
    config["num_frames"] = 6
    (snapshot / "config.json").write_text(json.dumps(config))
    with pytest.raises(EVLCheckpointError, match=r"temporal_position_embedding.embedding: checkpoint \(4, 32\) vs model \(6, 32\)"):
        EVLForVideoClassification.from_pretrained("evl-tests/tiny", cache_dir=cache)


def test_variant_weights_file_is_the_one_checked(tmp_path):
    # `variant="fp16"` loads model.fp16.safetensors: that file is the one read, not a model.safetensors beside it.
    torch.manual_seed(0)
    model = EVLForVideoClassification(tiny_config())
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path, variant="fp16")
    weights = tmp_path / "model.fp16.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert EVLForVideoClassification.from_pretrained(tmp_path) is not None  # the plain file is intact
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt") as error:
        EVLForVideoClassification.from_pretrained(tmp_path, variant="fp16")
    assert str(weights) in str(error.value)


def test_weights_file_given_itself_loads_and_is_checked(saved):
    # The loader takes a weights file's path as well as a directory (with `config=`).
    directory, model = saved
    weights = directory / "model.safetensors"
    loaded = EVLForVideoClassification.from_pretrained(weights, config=model.config)
    assert torch.equal(loaded.evl.decoder.query, model.evl.decoder.query)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt"):
        EVLForVideoClassification.from_pretrained(weights, config=model.config)


def test_the_file_checked_is_the_one_loaded_beside_a_stale_shard(saved):
    # With model.safetensors present the loader never reads a sharded checkpoint's index: a damaged shard beside it
    # must not stop the load.
    directory, model = saved
    (directory / "model-00001-of-00001.safetensors").write_bytes(b"\x00" * 16)
    index = {"metadata": {}, "weight_map": {"evl.decoder.query": "model-00001-of-00001.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = EVLForVideoClassification.from_pretrained(directory)
    assert torch.equal(loaded.evl.decoder.query, model.evl.decoder.query)


def test_shapes_are_judged_against_the_config_given(saved, tmp_path_factory):
    # `config=` naming another directory's configuration is the one the loader builds: the check uses it too.
    directory, model = saved
    other = tmp_path_factory.mktemp("config")
    model.config.save_pretrained(other)
    config = json.loads((directory / "config.json").read_text())
    config["num_frames"] = 6  # the checkpoint's own config no longer fits its weights; the one given does
    (directory / "config.json").write_text(json.dumps(config))
    loaded = EVLForVideoClassification.from_pretrained(directory, config=str(other))
    assert loaded.config.num_frames == model.config.num_frames


def test_the_weights_file_the_config_names_is_the_one_checked(saved):
    # A configuration's `transformers_weights` names the file the loader reads, whatever lies beside it.
    directory, model = saved
    weights = directory / "model.safetensors"
    named = directory / "evl-weights.safetensors"
    named.write_bytes(weights.read_bytes())
    weights.write_bytes(b"\x00" * 16)  # not read by the loader
    config = json.loads((directory / "config.json").read_text())
    config["transformers_weights"] = named.name
    (directory / "config.json").write_text(json.dumps(config))
    loaded = EVLForVideoClassification.from_pretrained(directory)
    assert torch.equal(loaded.evl.decoder.query, model.evl.decoder.query)
    named.write_bytes(named.read_bytes()[: named.stat().st_size // 2])
    with pytest.raises(EVLCheckpointError, match="truncated or corrupt") as error:
        EVLForVideoClassification.from_pretrained(directory)
    assert str(named) in str(error.value)
