"""run_clip.py end to end through main(argv) on tiny models: the three ways in, learning, reloading."""

import json
import math
import os

import pytest
import torch

import run_clip
from tests.helpers import (
    assert_finite_metrics,
    build_tiny_dinov2,
    build_tiny_roberta,
    build_tiny_vit,
    copy_with_dropout,
    count_activation_checkpoints,
    max_weight_difference,
    minilm_path,
    read_json,
)
from utils.demo import build_demo_clip, write_demo_dataset

RETRIEVAL_KEYS = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["i2t_mean_rank", "t2i_mean_rank", "loss"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_assets")
    data = write_demo_dataset(str(root / "data"), num_train=64, num_validation=24, num_test=16, image_size=48, seed=1)
    build_demo_clip(str(root / "tiny_clip"))
    build_tiny_vit(str(root / "tiny_vit"))
    return {"data": data, "clip": str(root / "tiny_clip"), "vit": str(root / "tiny_vit"), "root": root}


def common_args(assets, output_dir, *extra):
    return [
        "--train_file", assets["data"]["train"],
        "--validation_file", assets["data"]["validation"],
        "--test_file", assets["data"]["test"],
        "--output_dir", str(output_dir),
        "--do_train", "--do_eval", "--do_predict",
        "--max_steps", "3",
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "8",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
        "--save_strategy", "no",
        *extra,
    ]


def check_outputs(metrics, output_dir):
    assert_finite_metrics(metrics, [f"eval_{k}" for k in RETRIEVAL_KEYS] + [f"predict_{k}" for k in RETRIEVAL_KEYS] + ["train_loss"])
    for key, value in metrics.items():
        if key.endswith(("_r1", "_r5", "_r10")):
            assert 0.0 <= value <= 1.0, (key, value)
    saved = read_json(os.path.join(output_dir, "all_results.json"))
    assert saved["eval_i2t_r1"] == metrics["eval_i2t_r1"]
    assert read_json(os.path.join(output_dir, "predict_results.json"))["predict_t2i_r5"] == metrics["predict_t2i_r5"]


def test_clip_checkpoint(assets, tmp_path):
    metrics = run_clip.main(common_args(assets, tmp_path, "--model_name_or_path", assets["clip"]))
    check_outputs(metrics, tmp_path)
    assert os.path.exists(tmp_path / "README.md")  # the model card


def test_dual_encoder_from_pretrained_vit_and_minilm(assets, tmp_path):
    metrics = run_clip.main(
        common_args(assets, tmp_path, "--vision_model_name_or_path", assets["vit"], "--text_model_name_or_path", minilm_path())
    )
    check_outputs(metrics, tmp_path)
    from transformers import AutoModel, AutoProcessor

    model = AutoModel.from_pretrained(tmp_path)
    assert type(model).__name__ == "VisionTextDualEncoderModel"
    assert type(model.text_model).__name__ == "BertModel"
    processor = AutoProcessor.from_pretrained(tmp_path)
    assert processor.tokenizer.model_max_length == 512


def test_dual_encoder_from_dinov2_and_roberta(assets, tmp_path, caplog):
    """Other tower families than ViT + BERT: DINOv2 (its own image processor) and RoBERTa (its tokenizer, positions
    numbered from the padding), both run with their last layer at the pooled token."""
    with open(assets["data"]["train"]) as rows:
        words = sorted({word for row in rows for caption in json.loads(row)["captions"] for word in caption.split()})
    roberta = build_tiny_roberta(str(tmp_path / "roberta"), words)
    dinov2 = build_tiny_dinov2(str(tmp_path / "dinov2"))
    output_dir = tmp_path / "out"
    with caplog.at_level("INFO", logger="run_clip"):
        metrics = run_clip.main(common_args(assets, output_dir, "--vision_model_name_or_path", dinov2, "--text_model_name_or_path", roberta))
    check_outputs(metrics, output_dir)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(output_dir)
    assert (type(model.vision_model).__name__, type(model.text_model).__name__) == ("Dinov2Model", "RobertaModel")
    assert "Last layer computed at the pooled token only in: vision_model, text_model" in caplog.text


def test_a_tower_that_cannot_checkpoint_is_named(assets, tmp_path):
    """--activation_checkpointing on a dual encoder whose text tower (MPNet) cannot checkpoint: stop before training,
    naming the flag and the tower."""
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    config = MPNetConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                         max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    MPNetModel(config).save_pretrained(tmp_path / "mpnet")
    tokenizer.save_pretrained(tmp_path / "mpnet")
    args = common_args(assets, tmp_path / "out", "--vision_model_name_or_path", assets["vit"], "--text_model_name_or_path",
                       str(tmp_path / "mpnet"), "--activation_checkpointing")
    with pytest.raises(ValueError, match=r"--activation_checkpointing: the text tower \(MPNetModel\) cannot checkpoint"):
        run_clip.main(args)
    assert not os.path.exists(tmp_path / "out" / "train_results.json")


def test_new_projections_are_drawn_from_the_seed(assets, tmp_path):
    """A dual encoder's projections start at random: the same --seed gives the same model, whatever the process
    drew from the global generator before, and another seed another model."""
    from safetensors.torch import load_file

    def projections(name, seed):
        torch.manual_seed(len(name))  # the global generator in a different state before each run
        run_clip.main([
            "--vision_model_name_or_path", assets["vit"], "--text_model_name_or_path", minilm_path(),
            "--train_file", assets["data"]["train"], "--output_dir", str(tmp_path / name), "--do_train", "--max_steps", "1",
            "--learning_rate", "0", "--save_strategy", "no", "--seed", str(seed), "--use_cpu", "--report_to", "none",
        ])
        return load_file(tmp_path / name / "model.safetensors")["visual_projection.weight"]

    first, again, other = projections("a", 7), projections("bb", 7), projections("ccc", 8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_from_scratch_config(assets, tmp_path):
    metrics = run_clip.main(
        common_args(
            assets, tmp_path,
            "--config_name", assets["clip"],
            "--config_overrides", "projection_dim=32",
            "--tokenizer_name", assets["clip"],
            "--image_processor_name", assets["clip"],
        )
    )
    check_outputs(metrics, tmp_path)
    assert read_json(tmp_path / "config.json")["projection_dim"] == 32


def test_overfit_reaches_perfect_recall_and_reloads_as_pipeline(assets, tmp_path):
    """A handful of pairs, trained on and evaluated on: the loss falls and R@1 reaches 1.0 both ways; the
    output folder then serves zero-shot classification offline."""
    from utils.demo import write_demo_dataset as write

    data = write(str(tmp_path / "data"), num_train=8, num_validation=8, num_test=1, image_size=48, seed=3)
    before = run_clip.main([
        "--model_name_or_path", assets["clip"], "--validation_file", data["validation"], "--output_dir", str(tmp_path / "before"),
        "--do_eval", "--use_cpu", "--report_to", "none", "--per_device_eval_batch_size", "8",
    ])
    out = tmp_path / "out"
    after = run_clip.main([
        "--model_name_or_path", assets["clip"],
        "--train_file", data["validation"], "--validation_file", data["validation"],
        "--output_dir", str(out), "--do_train", "--do_eval",
        "--max_steps", "150", "--learning_rate", "2e-3", "--warmup_steps", "5",
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8",
        "--logging_steps", "5", "--save_strategy", "no",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
    ])
    assert after["eval_loss"] < before["eval_loss"] / 4, (before["eval_loss"], after["eval_loss"])
    assert after["eval_i2t_r1"] == 1.0 and after["eval_t2i_r1"] == 1.0, after
    assert before["eval_t2i_r1"] < 0.5
    history = read_json(out / "trainer_state.json")["log_history"]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0] / 2, losses

    from transformers import pipeline
    from PIL import Image

    rows = [json.loads(line) for line in open(data["validation"])]
    classifier = pipeline("zero-shot-image-classification", model=str(out), device="cpu")
    labels = [row["captions"][0] for row in rows]
    correct = 0
    for row in rows:
        image = Image.open(os.path.join(os.path.dirname(data["validation"]), row["image"]))
        scores = classifier(image, candidate_labels=labels)
        assert math.isclose(sum(s["score"] for s in scores), 1.0, rel_tol=1e-4)
        correct += scores[0]["label"] == row["captions"][0]
    assert correct >= 7, correct


def tower_weights(model_dir):
    from safetensors.torch import load_file

    state = load_file(os.path.join(model_dir, "model.safetensors"))
    pick = lambda prefix: torch.cat([v.flatten().float() for k, v in sorted(state.items()) if k.startswith(prefix)])
    return {"vision": pick("vision_model."), "text": pick("text_model."), "projection": pick("visual_projection."),
            "logit_scale": state["logit_scale"].float()}


def short_run(assets, output_dir, *extra):
    return run_clip.main([
        "--train_file", assets["data"]["train"], "--output_dir", str(output_dir), "--do_train",
        "--per_device_train_batch_size", "8", "--learning_rate", "1e-2", "--save_strategy", "no",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", *extra,
    ])


@pytest.mark.parametrize("flags,frozen,trained", [
    (["--freeze_vision_model"], ["vision"], ["text", "projection"]),
    (["--freeze_text_model"], ["text"], ["vision", "projection"]),
    (["--freeze_vision_steps", "2"], ["vision"], ["text", "projection"]),  # still in its frozen phase at step 2
    (["--freeze_text_steps", "1", "--max_steps", "3"], [], ["vision", "text"]),  # joined at step 2
])
def test_freezing(assets, tmp_path, flags, frozen, trained):
    before = tower_weights(assets["clip"])
    extra = flags if "--max_steps" in flags else [*flags, "--max_steps", "2"]
    short_run(assets, tmp_path, "--model_name_or_path", assets["clip"], *extra)
    after = tower_weights(tmp_path)
    for tower in frozen:
        assert torch.equal(before[tower], after[tower]), tower
    for tower in trained:
        assert not torch.equal(before[tower], after[tower]), tower


def test_logit_scale_is_clamped_after_each_step(assets, tmp_path):
    short_run(
        assets, tmp_path, "--config_name", assets["clip"], "--config_overrides", "logit_scale_init_value=6.0",
        "--tokenizer_name", assets["clip"], "--image_processor_name", assets["clip"], "--max_steps", "1",
    )
    assert tower_weights(tmp_path)["logit_scale"].item() == pytest.approx(math.log(100.0), abs=1e-6)


def test_optimizer_groups_per_tower_and_no_decay_on_biases_norms_and_temperature(assets, tmp_path):
    from transformers import AutoModel, TrainingArguments

    model = AutoModel.from_pretrained(assets["clip"])
    model_args = run_clip.ModelArguments(model_name_or_path=assets["clip"], vision_learning_rate=1e-5, text_learning_rate=2e-5)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-4, weight_decay=0.1, use_cpu=True, report_to="none")
    trainer = run_clip.ClipTrainer(model=model, args=args, model_args=model_args)
    optimizer = trainer.create_optimizer()
    setting = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            setting[id(p)] = (group["lr"], group["weight_decay"])
    norms = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    for name, p in model.named_parameters():
        lr, decay = setting[id(p)]
        expected_lr = 1e-5 if name.startswith("vision_model.") else 2e-5 if name.startswith("text_model.") else 3e-4
        assert lr == expected_lr, name
        no_decay = name == "logit_scale" or name.endswith("bias") or id(p) in norms
        assert decay == (0.0 if no_decay else 0.1), name


def test_config_file_with_overrides(assets, tmp_path):
    import yaml

    config = {
        "model_name_or_path": assets["clip"], "validation_file": assets["data"]["validation"], "output_dir": str(tmp_path),
        "do_eval": True, "use_cpu": True, "report_to": "none", "per_device_eval_batch_size": 4, "max_eval_samples": 5,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "run.json").write_text(json.dumps(config))
    for name in ("run.yaml", "run.json"):
        metrics = run_clip.main([str(tmp_path / name), "--max_eval_samples", "7"])
        assert metrics["eval_samples_per_second"] > 0
        assert read_json(tmp_path / "eval_results.json")["eval_t2i_r10"] == 1.0  # 7 images: each within the top 10


def test_wrong_column_fails_before_the_model_loads(assets, tmp_path):
    with pytest.raises(ValueError, match=r"--caption_column 'caption' is not a column of .*train.jsonl; its columns are \['image', 'captions', 'objects'\]"):
        run_clip.main(["--model_name_or_path", "/nonexistent/model", "--train_file", assets["data"]["train"],
                       "--caption_column", "caption", "--output_dir", str(tmp_path), "--do_train", "--use_cpu"])


def test_model_sources_are_exclusive():
    with pytest.raises(ValueError, match="exactly one model source"):
        run_clip.ModelArguments(model_name_or_path="a", config_name="b")
    with pytest.raises(ValueError, match="go together"):
        run_clip.ModelArguments(vision_model_name_or_path="a")


def test_run_leaves_curves_gallery_and_model_card(assets, tmp_path):
    from PIL import Image

    run_clip.main(common_args(assets, tmp_path, "--model_name_or_path", assets["clip"], "--logging_steps", "1", "--gallery_size", "5"))
    history = read_json(tmp_path / "trainer_state.json")["log_history"]
    assert all(h["logit_scale"] > 1 for h in history if "loss" in h)
    with Image.open(tmp_path / "training_curves.png") as curves:
        assert curves.size[0] > 300
    for split in ("validation", "test"):
        page = (tmp_path / f"gallery_{split}.html").read_text()
        assert page.count("data:image/jpeg;base64") >= 5
        assert "Showing 5 of" in page
    card = (tmp_path / "README.md").read_text()
    assert "run_clip.py" in card and "eval_i2t_r1" in card and "training_curves.png" in card


def one_sgd_step(assets, output_dir, *model_flags):
    torch.manual_seed(0)  # a dual encoder's new projections are drawn before the Trainer seeds
    return run_clip.main([
        *model_flags, "--train_file", assets["data"]["train"], "--output_dir", str(output_dir), "--do_train", "--max_steps", "1",
        "--per_device_train_batch_size", "16", "--learning_rate", "0.1", "--optim", "sgd", "--save_strategy", "no",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
    ])


@pytest.mark.parametrize("source", ["clip", "clip_gradcache", "dual_encoder"])
def test_activation_checkpointing_takes_the_same_step(assets, tmp_path, monkeypatch, source):
    """--activation_checkpointing (formerly --gradient_checkpointing) keeps only each layer's input and recomputes
    the layer in the backward pass: one step must land on the same weights with dropout on (the recompute replays
    the random state), also inside GradCache's own replay (--contrastive_chunk_size), and for a dual encoder, whose
    class does not declare checkpointing (run_clip enables it on the towers)."""
    if source == "dual_encoder":
        flags = ["--vision_model_name_or_path", assets["vit"], "--text_model_name_or_path", minilm_path()]  # BERT dropout 0.1
    else:
        flags = ["--model_name_or_path", copy_with_dropout(assets["clip"], tmp_path / "model")]  # attention dropout
        if source == "clip_gradcache":
            flags += ["--contrastive_chunk_size", "4"]
    checkpoints = count_activation_checkpoints(monkeypatch)
    plain = one_sgd_step(assets, tmp_path / "plain", *flags)
    assert not checkpoints
    checkpointed = one_sgd_step(assets, tmp_path / "checkpointed", *flags, "--activation_checkpointing")
    assert len(checkpoints) >= 4  # every layer of both towers, (re)computed
    assert checkpointed["train_loss"] == pytest.approx(plain["train_loss"], rel=1e-6)
    assert max_weight_difference(tmp_path / "plain", tmp_path / "checkpointed") < 1e-6


@pytest.mark.parametrize("regional", ["1", "0"])
def test_torch_compile_trains_as_eager(assets, tmp_path, monkeypatch, regional):
    """--torch_compile, regional (each repeated layer compiled once, the scripts' default) and whole-model: three
    steps, whose captions differ in length (the first change recompiles with the text length dynamic), log eager's
    losses and end on eager's weights. The backend here is aot_eager: dynamo's graph capture and AOT autograd, where
    graph breaks, data-dependent ops and recompiles show. The default backend, inductor, adds C++ code generation
    that takes minutes cold on two cores: run_clip with --torch_compile is checked by hand and timed in
    BENCHMARKS.md ("Fast paths")."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", regional)
    flags = ["--model_name_or_path", assets["clip"], "--max_steps", "3", "--logging_steps", "1"]
    short_run(assets, tmp_path / "eager", *flags)
    short_run(assets, tmp_path / "compiled", *flags, "--torch_compile_backend", "aot_eager")
    losses = {name: [h["loss"] for h in read_json(tmp_path / name / "trainer_state.json")["log_history"] if "loss" in h]
              for name in ("eager", "compiled")}
    assert len(losses["eager"]) == 3
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    assert max_weight_difference(tmp_path / "eager", tmp_path / "compiled") < 1e-5


def test_dual_encoders_answer_with_their_text_token_embedding(assets):
    """accelerate's FSDP2 wrapping asks get_input_embeddings(), which CLIPModel and VisionTextDualEncoderModel leave
    unanswered in transformers 5.23; a model that answers is left alone."""
    from transformers import AutoModel, VisionTextDualEncoderModel, ViltConfig, ViltModel

    clip = AutoModel.from_pretrained(assets["clip"])
    dual = VisionTextDualEncoderModel.from_vision_text_pretrained(assets["vit"], minilm_path())
    for model in (clip, dual):
        with pytest.raises(NotImplementedError):
            model.get_input_embeddings()
        run_clip.answer_input_embeddings(model)
        assert model.get_input_embeddings() is model.text_model.get_input_embeddings()
        assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    vilt = ViltModel(ViltConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    own = vilt.get_input_embeddings()
    run_clip.answer_input_embeddings(vilt)
    assert vilt.get_input_embeddings() is own


@pytest.mark.parametrize("installed,refused", [("0.19.8", True), ("0.19.7", False), (None, False)])
def test_deepspeed_release_that_breaks_on_the_temperature_is_refused(monkeypatch, installed, refused):
    import importlib.metadata
    from types import SimpleNamespace

    def version(name):
        if installed is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed

    monkeypatch.setattr(importlib.metadata, "version", version)
    run_clip.check_deepspeed(SimpleNamespace(deepspeed=None))  # no --deepspeed: nothing to check
    if refused:
        with pytest.raises(ValueError, match=r"DeepSpeed 0\.19\.8 .*logit_scale.*deepspeed==0\.19\.7"):
            run_clip.check_deepspeed(SimpleNamespace(deepspeed="configs/deepspeed_zero2.json"))
    else:
        run_clip.check_deepspeed(SimpleNamespace(deepspeed="configs/deepspeed_zero2.json"))


@pytest.mark.parametrize("flag,bf16,device,expected", [
    (None, True, "cpu", "eager"),  # measured: sdpa's CPU backward is the slower one in bf16
    (None, False, "cpu", "sdpa"),
    (None, True, "cuda", "sdpa"),
    ("sdpa", True, "cpu", "sdpa"),  # the flag wins
    ("eager", False, "cpu", "eager"),
])
def test_attention_implementation_by_device_and_precision(assets, flag, bf16, device, expected):
    from types import SimpleNamespace

    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["clip"])
    run_clip.choose_attention(model, SimpleNamespace(attn_implementation=flag), SimpleNamespace(bf16=bf16, device=torch.device(device)))
    for config in (model.config, model.vision_model.config, model.text_model.config):
        assert config._attn_implementation == expected


def test_eager_attention_takes_the_sdpa_step(assets, tmp_path):
    """The attention choice changes the kernel, not the step: one fp32 step with each lands on the same weights,
    and the saved model does not carry the choice."""
    runs = {}
    for implementation in ("sdpa", "eager"):
        out = tmp_path / implementation
        run_clip.main(["--model_name_or_path", assets["clip"], "--train_file", assets["data"]["train"], "--output_dir", str(out),
                       "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "16", "--use_cpu", "--report_to", "none",
                       "--dataloader_num_workers", "0", "--save_strategy", "no", "--attn_implementation", implementation,
                       "--optim", "sgd", "--learning_rate", "0.1"])  # SGD: Adam's first step is near sign(gradient) for every weight
        runs[implementation] = out
        assert "attn_implementation" not in read_json(out / "config.json")
    update = max_weight_difference(runs["sdpa"], assets["clip"])
    assert max_weight_difference(runs["sdpa"], runs["eager"]) < 1e-4 * update
