"""`evl_hf.training`: what EVLTrainer scores in an evaluation."""

import logging

import numpy as np
import pytest
import torch
from helpers import pixel_values, seeded_classifier, tiny_config
from transformers import EvalPrediction, TrainingArguments
from transformers.modeling_outputs import ImageClassifierOutput

from evl_hf import EVLForVideoClassification
from evl_hf.training import EVLTrainer, make_compute_metrics


def trainer(tmp_path, compute_metrics=None, **config) -> EVLTrainer:
    model = EVLForVideoClassification(tiny_config(**config))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    return EVLTrainer(model=model, args=args, compute_metrics=compute_metrics)


def test_clips_without_labels_and_unusable_clips_are_left_out_of_the_scores(tmp_path, caplog):
    scores = trainer(tmp_path, make_compute_metrics(top_k=2), num_labels=3)
    logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, -1, 2, -100, 1])
    with caplog.at_level(logging.WARNING, logger="evl_hf.training"):
        mixed = scores._metrics_of_usable_clips(EvalPrediction(predictions=logits, label_ids=labels))
    assert "1 of the 4 usable clips have no label (-1)" in caplog.text
    kept = [0, 2, 4]
    assert mixed == scores._metrics_of_usable_clips(EvalPrediction(predictions=logits[kept], label_ids=labels[kept]))
    expected = torch.nn.functional.cross_entropy(torch.from_numpy(logits[kept]), torch.from_numpy(labels[kept]))
    assert mixed["loss"] == pytest.approx(float(expected))
    # A split without labels is predicted, not scored.
    unlabeled = np.array([-1, -1, -100, -1, -1])
    assert scores._metrics_of_usable_clips(EvalPrediction(predictions=logits, label_ids=unlabeled)) == {}
    with pytest.raises(ValueError, match="None of the 2 evaluation clips could be decoded"):
        scores._metrics_of_usable_clips(EvalPrediction(predictions=logits[:2], label_ids=np.array([-100, -100])))


@pytest.mark.parametrize("problem_type", ["regression", None])
@pytest.mark.parametrize("dtype", [np.float32, np.int64])
def test_a_regression_target_of_minus_one_is_a_target(tmp_path, problem_type, dtype):
    # One output and no problem type is regression to transformers' losses, whatever the targets' dtype.
    scores = trainer(tmp_path, num_labels=1, problem_type=problem_type)
    predictions = np.array([[0.5], [2.0]], dtype=np.float32)
    targets = np.array([-1, 1], dtype=dtype)
    metrics = scores._metrics_of_usable_clips(EvalPrediction(predictions=predictions, label_ids=targets))
    assert metrics["loss"] == pytest.approx(((0.5 + 1.0) ** 2 + (2.0 - 1.0) ** 2) / 2)


def test_evaluation_reads_every_clip_in_order_whatever_the_loader_settings_for_training(tmp_path):
    # `dataloader_drop_last` and `dataloader_in_order=False` are for training: evaluation used to drop the last
    # clips (and so depend on the process count), and with workers to name each clip's row after another clip.
    torch.manual_seed(0)
    model = EVLForVideoClassification(tiny_config(num_labels=3)).eval()
    clips = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": index % 3} for index in range(9)]
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
        dataloader_drop_last=True, dataloader_in_order=False, eval_do_concat_batches=False,
        train_sampling_strategy="group_by_length",
    )  # fmt: skip
    scores = EVLTrainer(model=model, args=args, compute_metrics=make_compute_metrics(top_k=2))
    for loader in (scores.get_eval_dataloader(clips), scores.get_test_dataloader(clips)):
        assert loader.in_order and not loader.drop_last
        assert [int(label) for batch in loader for label in batch["labels"]] == [index % 3 for index in range(9)]
    output = scores.predict(clips)
    with torch.no_grad():
        expected = model(torch.stack([clip["pixel_values"] for clip in clips])).logits
    np.testing.assert_allclose(np.concatenate(output.predictions), expected.numpy(), atol=1e-5)
    assert output.metrics["test_loss"] == pytest.approx(
        float(torch.nn.functional.cross_entropy(expected, torch.tensor([index % 3 for index in range(9)]))), rel=1e-5
    )
    # Training keeps the settings asked for.
    assert scores.args.dataloader_drop_last and not scores.args.dataloader_in_order
    assert scores.args.train_sampling_strategy == "group_by_length"


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_grouping_strategies_shuffle_clips_of_one_shape_also_from_the_feature_cache(tmp_path, caplog, strategy):
    # Clips decoded in training are shuffled by `EpochShuffleSampler` whatever the strategy; cached ones (rows of
    # backbone features, no `pixel_values`) made Trainer's samplers look for lengths and fail, after the whole cache.
    from datasets import Dataset

    cached = Dataset.from_dict({"frame_features": np.zeros((6, 2, 4, 17, 32), np.float32), "labels": list(range(6))})
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2,
                             train_sampling_strategy=strategy)  # fmt: skip
    model = EVLForVideoClassification(tiny_config(num_labels=6, use_temporal_cross_attention=False))
    scores = EVLTrainer(model=model, args=args, train_dataset=cached.with_format("torch"))
    with caplog.at_level(logging.WARNING, logger="evl_hf.training"):
        labels = [int(label) for batch in scores.get_train_dataloader() for label in batch["labels"]]
    assert sorted(labels) == list(range(6))
    assert f"train_sampling_strategy={strategy!r} is ignored: every clip has the same length" in caplog.text


def test_input_tokens_seen_count_the_pixels_of_cached_clips_as_of_decoded_ones(tmp_path, caplog):
    # Batches of cached features have no `pixel_values` (the model's main input): transformers counted nothing and
    # warned at every step. They count the pixels the clips would have had, as training on decoded clips does.
    from datasets import Dataset

    config = tiny_config(num_labels=3, use_temporal_cross_attention=False)
    tokens = config.vision_config.image_size // config.vision_config.patch_size
    features = np.zeros((4, 2, config.num_frames, 1 + tokens * tokens, 32), np.float32)
    cached = Dataset.from_dict({"frame_features": features, "labels": [0, 1, 2, 0]}).with_format("torch")
    decoded = [{"pixel_values": torch.zeros(config.num_frames, 3, 32, 32), "labels": 0}] * 4
    seen = []
    for data in (cached, decoded):
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, max_steps=2,
                                 per_device_train_batch_size=2, include_num_input_tokens_seen=True,
                                 save_strategy="no")  # fmt: skip
        scores = EVLTrainer(model=EVLForVideoClassification(config), args=args, train_dataset=data)
        with caplog.at_level(logging.WARNING):
            scores.train()
        seen.append(scores.state.num_input_tokens_seen)
    assert seen[0] == seen[1] == 4 * config.num_frames * 3 * 32 * 32
    assert "Tried to track the number of tokens seen" not in caplog.text


def test_the_sequential_strategy_reads_decoded_training_clips_in_order(tmp_path):
    # Decoded clips are keyed `epoch * len + index` by their own sampler, which shuffled whatever the strategy.
    from datasets import Dataset

    from evl_hf.data.video_dataset import TrainingClips

    clips = TrainingClips(Dataset.from_dict({"video": [f"{index}.mp4" for index in range(5)], "label": [0] * 5}), None)
    model = EVLForVideoClassification(tiny_config(num_labels=2))
    for strategy, in_order in (("sequential", True), ("random", False)):
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                                 train_sampling_strategy=strategy)  # fmt: skip
        sampler = EVLTrainer(model=model, args=args, train_dataset=clips)._get_train_sampler()
        sampler.set_epoch(2)
        keys = list(sampler)
        assert sorted(keys) == list(range(10, 15)) and (keys == sorted(keys)) == in_order


@pytest.mark.parametrize("decay_norms_and_biases", [False, True])
def test_weight_decay_reaches_norms_and_biases_only_when_asked(tmp_path, decay_norms_and_biases):
    # The authors' AdamW decays every tensor; transformers' Trainer leaves biases and LayerNorm weights undecayed.
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, weight_decay=0.05)
    model = EVLForVideoClassification(tiny_config())
    scores = EVLTrainer(model=model, args=args, decay_norms_and_biases=decay_norms_and_biases)
    optimizer = scores.create_optimizer()
    decayed = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 0.05 for p in group["params"]}
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    undecayed = sorted(name for name, p in trainable.items() if id(p) not in decayed)
    if decay_norms_and_biases:
        assert undecayed == []
    else:
        assert "classifier.bias" in undecayed and "fc_norm.weight" in undecayed and "classifier.weight" not in undecayed
    assert not any(id(p) in decayed for p in model.evl.vision_model.parameters())  # frozen: not in the optimizer


def test_starting_to_read_a_dataloader_leaves_the_global_random_state_alone(tmp_path):
    # torch's DataLoader draws its workers' base seed each time an iterator is made; from torch's global generator, a
    # run with persistent workers (one iterator for the whole run) and its resumed run (one more) would draw the
    # model's dropout masks from different states.
    clips = [{"pixel_values": torch.randn(4, 3, 32, 32), "labels": index % 3} for index in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2)
    scores = EVLTrainer(model=EVLForVideoClassification(tiny_config(num_labels=3)), args=args, train_dataset=clips)
    for loader in (scores.get_train_dataloader(), scores.get_eval_dataloader(clips), scores.get_test_dataloader(clips)):
        state = torch.random.get_rng_state()
        next(iter(loader))
        assert torch.equal(torch.random.get_rng_state(), state)


def test_views_are_combined_as_the_labels_say_before_any_training(tmp_path):
    # No problem type yet and float (multi-label) labels: a forward with the labels combines the views' sigmoids. The
    # evaluation holds the labels back from the forward, so it must infer the problem type from them first; a clip
    # that could not be decoded (-100) is no reason to fail.
    views = torch.randn(4, 3, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    targets = torch.tensor([[1.0, 0, 1], [-100, -100, -100], [1, 1, 0], [0, 0, 1]])
    clips = [{"pixel_values": clip, "labels": labels} for clip, labels in zip(views, targets)]
    usable = [0, 2, 3]
    with torch.no_grad():
        expected = seeded_classifier(tiny_config(num_labels=3))(views[usable], labels=targets[usable])
    model = seeded_classifier(tiny_config(num_labels=3))
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2)
    output = EVLTrainer(model=model, args=args).predict(clips)
    np.testing.assert_allclose(output.predictions[usable], expected.logits.numpy(), atol=1e-5)
    assert output.metrics["test_loss"] == pytest.approx(float(expected.loss), rel=1e-5)
    assert model.config.problem_type == "multi_label_classification"  # as the first forward with labels sets it


def focal_loss(outputs, labels, num_items_in_batch=None):
    losses = torch.nn.functional.cross_entropy(outputs.logits, labels, reduction="none")
    return ((1 - torch.exp(-losses)) ** 2 * losses).sum() / num_items_in_batch


@pytest.mark.parametrize("loss", ["label_smoothing", "compute_loss_func"])
def test_the_evaluation_loss_is_the_one_trained_with(tmp_path, loss):
    from transformers.trainer_pt_utils import LabelSmoother

    model = EVLForVideoClassification(tiny_config(num_labels=3))
    if loss == "label_smoothing":
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, label_smoothing_factor=0.1)
        scores, expected_loss = EVLTrainer(model=model, args=args), LabelSmoother(0.1)
    else:
        args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
        scores, expected_loss = EVLTrainer(model=model, args=args, compute_loss_func=focal_loss), focal_loss
    logits = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    labels = np.array([0, -1, 2, -100, 1])
    metrics = scores._metrics_of_usable_clips(EvalPrediction(predictions=logits, label_ids=labels))
    kept = [0, 2, 4]
    outputs = ImageClassifierOutput(logits=torch.from_numpy(logits[kept]))
    expected = expected_loss(outputs, torch.from_numpy(labels[kept]), num_items_in_batch=torch.tensor(3))
    assert metrics["loss"] == pytest.approx(float(expected))


def test_inputs_and_losses_for_metrics_are_those_of_the_scored_clips(tmp_path):
    model = seeded_classifier(tiny_config(num_labels=3))
    inputs = torch.randn(5, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, -1, 2, -100, 1])
    clips = [{"pixel_values": clip, "labels": label} for clip, label in zip(inputs, labels)]
    received = {}

    def compute_metrics(prediction):
        received.update(inputs=prediction.inputs, losses=prediction.losses)
        return {}

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
        include_for_metrics=["inputs", "loss"],
    )  # fmt: skip
    metrics = EVLTrainer(model=model, args=args, compute_metrics=compute_metrics).evaluate(clips)
    kept = [0, 2, 4]
    np.testing.assert_array_equal(received["inputs"], inputs[kept].numpy())
    with torch.no_grad():
        logits = model(inputs[kept]).logits
    # Each clip's own loss (Trainer gives each clip its batch's): their mean is the evaluation loss.
    expected = torch.nn.functional.cross_entropy(logits, labels[kept], reduction="none")
    np.testing.assert_allclose(received["losses"], expected.numpy(), rtol=1e-5)
    assert metrics["eval_loss"] == pytest.approx(float(expected.mean()), rel=1e-5)


def test_batch_eval_metrics_score_the_clips_a_whole_set_evaluation_scores(tmp_path):
    # Batches of 2: the second holds an unusable clip, the last no scored clip at all.
    model = seeded_classifier(tiny_config(num_labels=3))
    inputs = torch.randn(8, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, -1, 2, -100, 1, 0, -1, -100])
    clips = [{"pixel_values": clip, "labels": label} for clip, label in zip(inputs, labels)]
    batches = []

    def batch_metrics(prediction, compute_result):
        batches.append(prediction)
        if not compute_result:
            return {}
        logits, targets = torch.cat([p.predictions for p in batches]), torch.cat([p.label_ids for p in batches])
        return {"accuracy": float((logits.argmax(-1) == targets).float().mean())}

    def whole_set_metrics(prediction):
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    def evaluate(compute_metrics, **arguments):
        args = TrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
            include_for_metrics=["inputs", "loss"], **arguments,
        )  # fmt: skip
        metrics = EVLTrainer(model=model, args=args, compute_metrics=compute_metrics).evaluate(clips)
        return {key: metrics[key] for key in ("eval_loss", "eval_accuracy")}

    whole_set = evaluate(whole_set_metrics)
    assert evaluate(batch_metrics, batch_eval_metrics=True) == pytest.approx(whole_set, rel=1e-6)
    kept = [0, 2, 4, 5]
    assert [len(p.label_ids) for p in batches] == [1, 1, 2, 0]  # the last one empty, to ask for the result
    assert torch.equal(torch.cat([p.label_ids for p in batches]), labels[kept])
    torch.testing.assert_close(torch.cat([p.inputs["pixel_values"] for p in batches]), inputs[kept])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(inputs[kept]).logits, labels[kept], reduction="none")
    torch.testing.assert_close(torch.cat([p.losses for p in batches]), expected)


def test_a_nan_logit_ranks_last_in_the_predictions_file_as_in_the_metrics(tmp_path):
    # `argmax` put a NaN first and the metric's ranking last: the file and the confusion matrix disagreed on a clip.
    from evl_hf.training import write_per_class_report, write_predictions

    logits, labels, names = np.array([[np.nan, 0.2, 0.1], [0.3, np.nan, 0.5]]), np.array([1, 2]), {0: "a", 1: "b", 2: "c"}
    rows = write_predictions(["x", "y"], labels, {"predicted": logits}, names, str(tmp_path), "eval").read_text()
    assert rows.splitlines()[1:] == ["x,b,b", "y,c,c"]
    assert write_per_class_report(logits, labels, names, str(tmp_path), "eval") == {"a": None, "b": 1.0, "c": 1.0}


def test_an_interrupted_batched_evaluation_leaves_nothing_behind(tmp_path):
    # `batch_eval_metrics`: batches of an evaluation stopped part way (Ctrl-C) were scored with the next one's.
    model = seeded_classifier(tiny_config(num_labels=3))
    clips = [{"pixel_values": clip, "labels": index % 3} for index, clip in enumerate(pixel_values(batch=6, seed=1))]

    class StoppedAtTheThirdBatch(torch.utils.data.Dataset):
        stop = True

        def __len__(self):
            return len(clips)

        def __getitem__(self, index):
            if self.stop and index == 4:
                raise KeyboardInterrupt
            return clips[index]

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
                             batch_eval_metrics=True)  # fmt: skip
    expected = EVLTrainer(model=model, args=args, compute_metrics=make_compute_metrics(top_k=2)).evaluate(clips)
    scores = EVLTrainer(model=model, args=args, compute_metrics=make_compute_metrics(top_k=2))
    stopped = StoppedAtTheThirdBatch()
    with pytest.raises(KeyboardInterrupt):
        scores.evaluate(stopped)
    stopped.stop = False
    result = scores.evaluate(stopped)
    for key in ("eval_loss", "eval_top1_accuracy", "eval_top2_accuracy"):
        assert result[key] == pytest.approx(expected[key]), key


def test_the_scripts_metrics_take_batches_too(tmp_path):
    # `--batch_eval_metrics`: Trainer passes each batch's tensors and asks for the result with the last one.
    model = seeded_classifier(tiny_config(num_labels=3))
    clips = [{"pixel_values": clip, "labels": index % 3} for index, clip in enumerate(pixel_values(batch=5, seed=1))]
    metrics = {}
    for batch_eval_metrics in (False, True):
        args = TrainingArguments(
            output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
            batch_eval_metrics=batch_eval_metrics,
        )  # fmt: skip
        scores = EVLTrainer(model=model, args=args, compute_metrics=make_compute_metrics(top_k=2))
        result = scores.evaluate(clips)
        metrics[batch_eval_metrics] = {key: result[key] for key in ("eval_loss", "eval_top1_accuracy", "eval_top2_accuracy")}
    assert metrics[True] == pytest.approx(metrics[False])


def test_a_model_with_offloaded_trainable_modules_is_refused(tmp_path):
    # Offloaded weights live in accelerate's hooks and come back from disk at every forward: an optimizer would update
    # nothing of them, and the run would train the rest alone.
    pytest.importorskip("accelerate")
    seeded_classifier().save_pretrained(tmp_path / "checkpoint")
    model = EVLForVideoClassification.from_pretrained(
        tmp_path / "checkpoint", offload_folder=tmp_path / "offload",
        device_map={"evl.vision_model": "cpu", "evl.decoder": "disk", "fc_norm": "cpu", "dropout": "cpu", "classifier": "cpu"},
    )  # fmt: skip
    clips = [{"pixel_values": pixel_values()[0], "labels": index % 2} for index in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none", use_cpu=True, max_steps=1)
    with pytest.raises(ValueError, match=r"trainable tensors are offloaded.*evl\.decoder\."):
        EVLTrainer(model=model, args=args, train_dataset=clips).train()


class _RandomlyJitteredClips(torch.utils.data.Dataset):
    """A user's own data set whose clips are augmented in the dataloader's workers with torch's random numbers."""

    def __init__(self):
        self.clips = torch.randn(4, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        return {"pixel_values": self.clips[index] + 0.1 * torch.rand(self.clips[index].shape), "labels": index % 3}


def test_a_run_resumed_between_epochs_gives_the_workers_the_uninterrupted_runs_seeds(tmp_path):
    # Workers made anew every epoch draw their seeds from the loader's generator: seeded by epoch, the resumed run's
    # second epoch draws what the uninterrupted run's did (seeded once, it would draw that run's first epoch's).
    def train(output, resume=None):
        args = TrainingArguments(
            output_dir=str(output), report_to="none", use_cpu=True, per_device_train_batch_size=2, num_train_epochs=2,
            save_strategy="epoch", dataloader_num_workers=2, learning_rate=0.1, seed=7,
        )  # fmt: skip
        model = seeded_classifier(tiny_config(num_labels=3, decoder_mlp_dropout=0.5))
        EVLTrainer(model=model, args=args, train_dataset=_RandomlyJitteredClips()).train(resume_from_checkpoint=resume)
        return model.state_dict()

    expected = train(tmp_path / "full")
    actual = train(tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoint-2"))
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=0, rtol=0, msg=key)


@pytest.mark.parametrize("batch_eval_metrics", [False, True], ids=["whole set", "batch by batch"])
def test_preprocessed_logits_reach_the_metrics_and_the_loss_is_the_models(tmp_path, batch_eval_metrics):
    # `preprocess_logits_for_metrics` (often an argmax, to save memory) changes what `compute_metrics` and `predict`
    # get; the loss, computed by the trainer over all scored clips, still needs the model's logits.
    model = seeded_classifier(tiny_config(num_labels=3))
    inputs = torch.randn(5, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, -1, 2, -100, 1])
    clips = [{"pixel_values": clip, "labels": label} for clip, label in zip(inputs, labels)]
    received = []

    def compute_metrics(prediction, compute_result=None):
        received.append(np.asarray(prediction.predictions))
        return {"calls": len(received)} if compute_result in (None, True) else None

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
        batch_eval_metrics=batch_eval_metrics,
    )  # fmt: skip
    scores = EVLTrainer(
        model=model, args=args, compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=lambda logits, labels: logits.argmax(-1),
    )  # fmt: skip
    metrics = scores.evaluate(clips)
    kept = [0, 2, 4]
    with torch.no_grad():
        logits = model(inputs).logits
    assert metrics["eval_loss"] == pytest.approx(float(model.loss_function(labels[kept], logits[kept], model.config)))
    np.testing.assert_array_equal(np.concatenate(received), logits[kept].argmax(-1).numpy())
    np.testing.assert_array_equal(scores.predict(clips).predictions, logits.argmax(-1).numpy())
    # Only the logits are kept beside the preprocessed outputs, not the hidden states or attentions given with them.
    scores._user_preprocess_logits = lambda outputs, labels: outputs[0].argmax(-1)
    kept_logits, _ = scores.preprocess_logits_for_metrics((logits, (logits, logits)), labels)
    assert kept_logits is logits


def test_metrics_get_per_batch_lists_without_concatenated_batches(tmp_path):
    # `eval_do_concat_batches=False`: `Trainer` gives `compute_metrics` one array per batch; so does EVLTrainer, each
    # batch holding its scored clips.
    model = seeded_classifier(tiny_config(num_labels=3))
    inputs = torch.randn(5, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, -1, 2, -100, 1])
    clips = [{"pixel_values": clip, "labels": label} for clip, label in zip(inputs, labels)]
    received = {}

    def compute_metrics(prediction):
        received.update(vars(prediction))
        return {}

    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_eval_batch_size=2,
        include_for_metrics=["inputs", "loss"], eval_do_concat_batches=False,
    )  # fmt: skip
    EVLTrainer(model=model, args=args, compute_metrics=compute_metrics).evaluate(clips)
    with torch.no_grad():
        logits = model(inputs).logits.numpy()
    # Batches [0, 1], [2, 3], [4]: clip 1 has no label, clip 3 could not be decoded.
    for name, expected in (("predictions", logits), ("label_ids", labels.numpy()), ("inputs", inputs.numpy())):
        batches = received[name]
        assert isinstance(batches, list) and [len(batch) for batch in batches] == [1, 1, 1], name
        np.testing.assert_allclose(np.concatenate(batches), expected[[0, 2, 4]], rtol=1e-5, err_msg=name)
    assert [len(batch) for batch in received["losses"]] == [1, 1, 1]
    # The script's top-k metric takes them too.
    scores = trainer(tmp_path, make_compute_metrics(top_k=2), num_labels=3)
    batches = EvalPrediction(predictions=[logits[:2], logits[2:]], label_ids=[np.array([0, 1]), np.array([2, 2, 1])])
    assert scores._metrics_of_usable_clips(batches) == scores._metrics_of_usable_clips(
        EvalPrediction(predictions=logits, label_ids=np.array([0, 1, 2, 2, 1]))
    )


def test_the_model_card_says_how_the_model_was_made(tmp_path):
    """Started from a local directory (no Hub id to link): from an image backbone, frozen or fine-tuned with the
    decoder, or from an EVL checkpoint, which Trainer's card would call "trained from scratch"."""
    from helpers import save_tiny_backbone

    backbone = save_tiny_backbone(tmp_path / "clip")
    starting = tmp_path / "evl-kinetics"
    EVLForVideoClassification(tiny_config()).save_pretrained(starting)

    def first_sentence(origin, **config) -> str:
        output = tmp_path / f"out-{origin.name}-{config}"
        model = EVLForVideoClassification(tiny_config(**config))
        args = TrainingArguments(output_dir=str(output), report_to="none", use_cpu=True)
        EVLTrainer(model=model, args=args).create_model_card(finetuned_from=str(origin), dataset="motion")
        return next(line for line in (output / "README.md").read_text().splitlines() if line.startswith("This model"))

    assert first_sentence(backbone) == (
        "This model is an EVL video classifier (frozen image backbone) trained on the motion dataset."
    )
    assert first_sentence(backbone, freeze_backbone=False) == (
        "This model is an EVL video classifier (image backbone fine-tuned end to end) trained on the motion dataset."
    )
    assert first_sentence(starting) == (
        "This model is a fine-tuned version of the local EVL checkpoint evl-kinetics (frozen image backbone) on the "
        "motion dataset."
    )


def test_the_model_card_of_a_model_from_a_hub_id_says_whether_the_backbone_was_frozen(tmp_path):
    """Trainer's own sentence links the Hub id, and says nothing about the backbone."""
    hub_id = "openai/clip-vit-base-patch16"
    for freeze, backbone in ((True, "frozen image backbone"), (False, "image backbone fine-tuned end to end")):
        output = tmp_path / f"out-{freeze}"
        model = EVLForVideoClassification(tiny_config(freeze_backbone=freeze))
        args = TrainingArguments(output_dir=str(output), report_to="none", use_cpu=True)
        EVLTrainer(model=model, args=args).create_model_card(finetuned_from=hub_id, dataset="motion")
        text = (output / "README.md").read_text()
        assert (f"This model is a fine-tuned version of [{hub_id}](https://huggingface.co/{hub_id}) ({backbone}) on "
                "the motion dataset.") in text  # fmt: skip


def evaluated_trainer(output, **config) -> EVLTrainer:
    """A trainer whose log history holds an evaluation, which the model card's `model-index` reports."""
    model = EVLForVideoClassification(tiny_config(**config))
    args = TrainingArguments(output_dir=str(output), report_to="none", use_cpu=True)
    evaluated = EVLTrainer(model=model, args=args)
    evaluated.state.log_history = [{"eval_top1_accuracy": 0.5, "eval_top5_accuracy": 1.0, "epoch": 1.0, "step": 1}]
    return evaluated


def test_the_model_card_gives_each_data_set_its_own_result(tmp_path):
    # Lists of tags and names (Trainer takes `str | list[str]`) used to make one result whose `type` was the str() of
    # the tags list and whose `name` was the list of names: the Hub could read neither. Tags without names raised
    # KeyError: 'dataset'.
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    def results(output, **kwargs) -> set:
        evaluated_trainer(output).create_model_card(**kwargs)
        card = ModelCard.load(output / "README.md")
        _, eval_results = model_index_to_eval_results(card.data.to_dict()["model-index"])
        return {(result.dataset_type, result.dataset_name, result.metric_name) for result in eval_results}

    expected = {
        (tag, name, metric)
        for tag, name in (("kinetics400", "Kinetics 400"), ("ssv2", "SSv2"))
        for metric in ("Top-1 accuracy", "Top-5 accuracy")
    }  # fmt: skip
    assert results(tmp_path / "hub", dataset_tags=["kinetics400", "ssv2"], dataset=["Kinetics 400", "SSv2"]) == expected
    # Without names, as in Trainer, the tags name the data sets; a local one is named by its folder.
    local = tmp_path / "motion" / "train"
    local.mkdir(parents=True)
    assert results(tmp_path / "tags", dataset_tags=["kinetics400", "ssv2"]) == {
        (tag, tag, metric) for tag in ("kinetics400", "ssv2") for metric in ("Top-1 accuracy", "Top-5 accuracy")
    }
    assert results(tmp_path / "local", dataset=[str(local), "ssv2"]) == {
        (tag, name, metric)
        for tag, name in (("videofolder", "motion"), ("ssv2", "ssv2"))
        for metric in ("Top-1 accuracy", "Top-5 accuracy")
    }  # fmt: skip


def test_the_model_card_keeps_the_model_name_it_is_given(tmp_path):
    # model-index's name used to be the output folder's (or hub_model_id's) whatever `model_name` said, while the
    # card's heading, from Trainer, said `model_name`; push_to_hub passes its `model_name` here too.
    from huggingface_hub import ModelCard

    def names(output, **kwargs) -> tuple[str, str]:
        evaluated_trainer(output).create_model_card(dataset="kinetics400", **kwargs)
        card = ModelCard.load(output / "README.md")
        heading = next(line for line in card.text.splitlines() if line.startswith("# "))
        return heading, card.data.to_dict()["model-index"][0]["name"]

    assert names(tmp_path / "named", model_name="my-evl") == ("# my-evl", "my-evl")
    assert names(tmp_path / "unnamed") == ("# unnamed", "unnamed")
