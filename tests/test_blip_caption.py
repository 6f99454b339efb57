"""run_blip_caption.py: how captions are laid out for training (prompt and padding masked, the same start and end
tokens as `generate`), that evaluation generates from the image and prompt only, metrics equal to pycocoevalcap,
and end to end through main(argv) for tiny BLIP and BLIP-2 models: train, evaluate, predict, reload, caption; and
under two processes (torchrun), every image scored once."""

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    pipeline,
)

import run_blip_caption as rbc
import utils.caption_metrics
from tests.helpers import (
    assert_finite_metrics,
    copy_with_dropout,
    count_activation_checkpoints,
    max_weight_difference,
    read_json,
    write_jsonl,
)
from utils.demo import write_demo_dataset
from utils.demo_caption import build_demo_opt_tokenizer, build_tiny_blip, build_tiny_blip2
from utils.images import ImageTransformSpec, load_image

HAS_JAVA = shutil.which("java") is not None
# Without METEOR (--use_java false) except where the test says: its jar takes ~10 s to load per evaluation.
CAPTION_METRICS = ["bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "loss"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second intra-op thread costs more in synchronisation than it saves (about 10x
    slower on two busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("caption_assets")
    data = write_demo_dataset(str(root / "data"), num_train=12, num_validation=6, num_test=5, image_size=32, seed=1)
    build_tiny_blip(str(root / "tiny_blip"))
    build_tiny_blip2(str(root / "tiny_blip2"))
    return {"data": data, "blip": str(root / "tiny_blip"), "blip2": str(root / "tiny_blip2"), "root": root}


def load(assets, kind):
    return AutoModelForImageTextToText.from_pretrained(assets[kind]).eval(), AutoProcessor.from_pretrained(assets[kind])


def make_collator(model, processor, prompt=""):
    caption_format = rbc.build_caption_format(model, processor.tokenizer, prompt)
    spec = ImageTransformSpec.from_image_processor(processor.image_processor)
    return rbc.CaptionCollator(processor.tokenizer, caption_format, 64, spec)


def random_images(n, size=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator) for _ in range(n)]


def common_args(assets, output_dir, *extra):
    return [
        "--train_file", assets["data"]["train"],
        "--validation_file", assets["data"]["validation"],
        "--test_file", assets["data"]["test"],
        "--output_dir", str(output_dir),
        "--per_device_train_batch_size", "8",
        "--per_device_eval_batch_size", "4",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0",
        "--save_strategy", "no",
        "--num_beams", "1",
        "--max_new_tokens", "8",
        "--use_java", "false",
        *extra,
    ]


# --- Training targets -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_labels_mask_start_prompt_and_padding(assets, kind):
    model, processor = load(assets, kind)
    collator = make_collator(model, processor, prompt="a picture of")
    fmt = collator.caption_format
    captions = ["red circle", "a blue square in the top left"]
    batch = collator.encode(captions)
    input_ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    prefix = len(fmt.prefix)
    text = model.config.text_config

    # Start tokens as generate lays them out: BLIP's bos; BLIP-2's image tokens, then the LM's bos.
    if kind == "blip":
        assert fmt.start_ids == (text.bos_token_id,)
    else:
        assert fmt.start_ids == (model.config.image_token_id,) * model.config.num_query_tokens + (text.bos_token_id,)
    assert (input_ids[:, : len(fmt.start_ids)] == torch.tensor(fmt.start_ids)).all()
    assert processor.tokenizer.decode(input_ids[0, len(fmt.start_ids) : prefix]).strip() == "a picture of"

    # Start, prompt and padding are -100; everything else is the input itself, ending with the end token.
    assert (labels[:, :prefix] == -100).all()
    assert (labels[mask == 0] == -100).all()
    assert (input_ids[mask == 0] == fmt.pad_id).all()
    supervised = mask.bool().clone()
    supervised[:, :prefix] = False
    assert torch.equal(labels[supervised], input_ids[supervised])
    assert (labels != -100).sum() == supervised.sum()
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1]  # the first row is padded
    for row, caption in enumerate(captions):
        end = lengths[row] - 1
        assert input_ids[row, end] == labels[row, end] == fmt.end_id
        assert processor.tokenizer.decode(input_ids[row, prefix:end]).strip() == caption


def test_clean_captions_as_blip_does():
    assert rbc.clean_caption("A Dog (brown) runs: fast!!  \n") == "a dog brown runs fast"
    assert rbc.clean_caption("one two three four", max_words=2) == "one two"


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_loss_equals_the_models_own(assets, kind):
    """The labels follow the models' convention (they shift internally): our loss, used for label smoothing and
    token weighting, equals the one the model computes from the same labels."""
    model, processor = load(assets, kind)
    collator = make_collator(model, processor, prompt="a picture of")
    batch = collator([{"pixel_values": p, "caption": c} for p, c in zip(random_images(2), ["red circle", "a blue cross at the center"])])
    smoothing = 0.1 if kind == "blip" else 0.0  # BLIP-2's loss (ForCausalLMLoss) has no smoothing
    if kind == "blip":
        model.text_decoder.label_smoothing = smoothing
    with torch.no_grad():
        outputs = model(**batch)
    loss_sum, count = rbc.caption_token_loss(outputs.logits, batch["labels"], smoothing)
    torch.testing.assert_close(loss_sum.sum() / count.sum(), outputs.loss, rtol=1e-5, atol=1e-6)
    assert count.tolist() == (batch["labels"] != -100).sum(1).tolist()


# --- Generation agrees with training ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_generation_starts_from_the_training_start_tokens(assets, kind):
    """The first generated token's scores equal the teacher-forced logits after the training prefix: generate
    conditions on the same start tokens (BLIP's bos, BLIP-2's image tokens and bos) and prompt as training."""
    model, processor = load(assets, kind)
    collator = make_collator(model, processor, prompt="a picture of")
    fmt = collator.caption_format
    images = random_images(2, seed=1)
    batch = collator([{"pixel_values": p, "caption": "a red circle"} for p in images])
    with torch.no_grad():
        teacher_forced = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[:, len(fmt.prefix) - 1]
    input_ids = fmt.generate_input_ids(2, "cpu")
    out = model.generate(
        pixel_values=batch["pixel_values"], input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=1, do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True,
        **dict(fmt.generate_kwargs),
    )
    torch.testing.assert_close(out.logits[0].float(), teacher_forced.float(), rtol=1e-4, atol=1e-4)
    assert out.sequences[:, : len(fmt.prefix)].tolist() == [list(fmt.prefix)] * 2


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_generation_stops_on_the_training_end_token(assets, kind):
    """Make the end token always most likely: generate must stop right after it, so the token training ends
    captions with is the one generation stops on, and the reported caption is empty (prompt stripped)."""
    model, processor = load(assets, kind)
    collator = make_collator(model, processor, prompt="a picture of")
    fmt = collator.caption_format
    head = model.text_decoder.get_output_embeddings() if kind == "blip" else model.get_output_embeddings()

    def favour_end(module, args, output):
        output[..., fmt.end_id] += 1e4
        return output

    handle = head.register_forward_hook(favour_end)
    try:
        pixel_values = collator([{"pixel_values": p, "caption": "x"} for p in random_images(3)])["pixel_values"]
        tokens = rbc.generate_captions(model, pixel_values, fmt, num_beams=2, max_new_tokens=6)
    finally:
        handle.remove()
    assert tokens[:, 0].tolist() == [fmt.end_id] * 3
    assert all(rbc.decode_caption(processor.tokenizer, t, fmt.end_id) == "" for t in tokens.tolist())


def test_checkpoint_with_out_of_vocabulary_bos_is_refused(assets):
    """BlipTextConfig's default bos (30522) is outside a small vocabulary: generate would start every caption with
    a token the model cannot embed, so the script refuses before training."""
    config = BlipConfig(
        text_config={"vocab_size": 200, "hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "sep_token_id": 3},
        vision_config={"image_size": 16, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2},
    )
    model = BlipForConditionalGeneration(config)
    with pytest.raises(ValueError, match="bos_token_id=30522"):
        rbc.check_special_tokens(model, load(assets, "blip")[1].tokenizer)


def test_from_scratch_takes_special_tokens_from_the_tokenizer(assets, tmp_path):
    """A default BlipConfig (bos 30522, vocabulary 30524) with a BERT tokenizer that has no bos: the script adds
    [DEC], sizes the vocabulary to the tokenizer and trains, evaluates and saves a consistent model."""
    _, processor = load(assets, "blip")
    vocab = sorted((i, t) for t, i in processor.tokenizer.get_vocab().items() if t != "[DEC]")
    tokenizer_dir = tmp_path / "bert_tokenizer"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(t for _, t in vocab) + "\n")
    BertTokenizer(vocab=str(tokenizer_dir / "vocab.txt")).save_pretrained(tokenizer_dir)
    config = BlipConfig(
        text_config={"hidden_size": 32, "encoder_hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 1, "num_attention_heads": 2, "initializer_range": 0.02},
    )
    assert config.text_config.bos_token_id == 30522
    config.save_pretrained(tmp_path / "config")
    out = tmp_path / "out"
    metrics = rbc.main(common_args(
        assets, out,
        "--config_name", str(tmp_path / "config"), "--tokenizer_name", str(tokenizer_dir), "--image_processor_name", assets["blip"],
        "--do_train", "--do_eval", "--max_steps", "2",
    ))
    assert_finite_metrics(metrics, [f"eval_{k}" for k in CAPTION_METRICS])
    saved = read_json(out / "config.json")["text_config"]
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert saved["vocab_size"] == len(tokenizer) == len(vocab) + 1
    assert saved["bos_token_id"] == tokenizer.convert_tokens_to_ids("[DEC]") == tokenizer.bos_token_id
    assert saved["sep_token_id"] == tokenizer.sep_token_id and saved["pad_token_id"] == tokenizer.pad_token_id


def test_blip2_from_scratch_takes_special_tokens_from_the_tokenizer(assets, tmp_path):
    """A BLIP-2 config with an OPT tokenizer that has no <image> token yet: the processor adds it, and the model's
    vocabulary, image token and bos/eos/pad ids come from the tokenizer."""
    tokenizer_dir = tmp_path / "opt_tokenizer"
    build_demo_opt_tokenizer().save_pretrained(tokenizer_dir)
    config = read_json(os.path.join(assets["blip2"], "config.json"))
    config["text_config"].update(vocab_size=50272, bos_token_id=0, eos_token_id=50118, pad_token_id=1)  # OPT-2.7b's
    config["image_token_index"] = 50265
    os.makedirs(tmp_path / "config")
    with open(tmp_path / "config" / "config.json", "w") as f:
        json.dump(config, f)
    out = tmp_path / "out"
    metrics = rbc.main(common_args(
        assets, out,
        "--config_name", str(tmp_path / "config"), "--tokenizer_name", str(tokenizer_dir), "--image_processor_name", assets["blip2"],
        "--do_train", "--do_eval", "--max_steps", "2",
    ))
    assert_finite_metrics(metrics, [f"eval_{k}" for k in CAPTION_METRICS])
    saved = read_json(out / "config.json")
    tokenizer = AutoProcessor.from_pretrained(out).tokenizer
    assert saved["text_config"]["vocab_size"] == len(tokenizer)
    assert saved["image_token_index"] == tokenizer.convert_tokens_to_ids("<image>") == len(tokenizer) - 1
    text = saved["text_config"]
    assert (text["bos_token_id"], text["eos_token_id"], text["pad_token_id"]) == (2, 2, 1)


# --- Evaluation -------------------------------------------------------------------------------------------


def test_evaluation_generates_from_the_prompt_only(assets, tmp_path, monkeypatch):
    """The leak test: every generate call gets the start tokens and the prompt, nothing of the reference caption
    (Seq2SeqTrainer(predict_with_generate=True) would pass the batch's input_ids, the reference). The evaluation
    calls BLIP's text decoder's generate, as BLIP's own generate does (see generate_captions)."""
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

    calls = []
    original = BlipTextLMHeadModel.generate

    def spy(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BlipTextLMHeadModel, "generate", spy)
    metrics = rbc.main(common_args(assets, tmp_path, "--model_name_or_path", assets["blip"], "--do_eval", "--prompt", "a picture of"))
    assert_finite_metrics(metrics, [f"eval_{k}" for k in CAPTION_METRICS])
    tokenizer = AutoProcessor.from_pretrained(assets["blip"]).tokenizer
    text = AutoModelForImageTextToText.from_pretrained(assets["blip"]).config.text_config
    prompt_only = [text.bos_token_id, *tokenizer("a picture of", add_special_tokens=False)["input_ids"]]
    assert sum(len(c) for c in calls) == 6  # each validation image once
    for input_ids in calls:
        assert input_ids.tolist() == [prompt_only] * len(input_ids)


def test_metrics_skip_meteor_without_java_and_say_why(monkeypatch, caplog):
    monkeypatch.setattr(utils.caption_metrics, "find_java", lambda: None)
    with caplog.at_level(logging.WARNING):
        metrics = rbc.compute_metrics(
            ["a red circle in the top left", "a blue cross"], [["a red circle in the top left", "red circle, top left"], ["a green square"]]
        ).metrics
    assert "meteor" not in metrics and set(metrics) == {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider"}
    assert "meteor skipped: java not found" in caplog.text


# --- End to end -------------------------------------------------------------------------------------------


def check_predictions(output_dir, test_file, metrics, caption_column="captions"):
    rows = [json.loads(line) for line in open(test_file)]
    predictions = [json.loads(line) for line in open(os.path.join(output_dir, "predictions.jsonl"))]
    assert len(predictions) == len(rows)
    for row, prediction in zip(rows, predictions):
        assert prediction["image"] == row["image"]
        references = row[caption_column]
        assert prediction["references"] == (references if isinstance(references, list) else [references])
        assert isinstance(prediction["prediction"], str)
    assert read_json(os.path.join(output_dir, "predict_results.json"))["predict_cider"] == metrics["predict_cider"]
    return predictions


def caption_with_pipeline(output_dir, image_path, prompt=""):
    captioner = pipeline("image-text-to-text", model=str(output_dir))
    result = captioner(images=load_image(image_path), text=prompt, generate_kwargs={"max_new_tokens": 10})
    return result[0]["generated_text"]


def test_blip_end_to_end(assets, tmp_path):
    metrics = rbc.main(common_args(
        assets, tmp_path, "--model_name_or_path", assets["blip"],
        "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--num_beams", "2",
        "--prompt", "a picture of", "--label_smoothing", "0.1", "--clean_captions",
    ))
    assert_finite_metrics(metrics, ["train_loss"] + [f"{s}_{k}" for s in ("eval", "predict") for k in CAPTION_METRICS])
    check_predictions(tmp_path, assets["data"]["test"], metrics)
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)).__name__ == "BlipForConditionalGeneration"
    assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "BlipProcessor"
    assert "run_blip_caption.py" in (tmp_path / "README.md").read_text()  # the model card, with the command
    image = os.path.join(os.path.dirname(assets["data"]["test"]), "images", "test_00000.png")
    assert isinstance(caption_with_pipeline(tmp_path, image, prompt="a picture of"), str)
    for split in ("validation", "test"):  # the galleries: one row per image, each with its thumbnail
        page = (tmp_path / f"gallery_{split}.html").read_text()
        assert page.count("data:image/jpeg;base64") >= 3 and "CIDEr" in page
    assert (tmp_path / "training_curves.png").exists()


def test_bad_rows_are_skipped_listed_and_kept_out_of_the_metrics(assets, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(os.path.dirname(assets["data"]["test"]), data)
    rows = [json.loads(line) for line in open(data / "test.jsonl")]
    (data / "images" / "broken.png").write_bytes(b"not a png")
    rows[1]["image"] = "images/broken.png"
    rows[2]["captions"] = ["", "  "]
    with open(data / "test.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = rbc.main(common_args(assets, tmp_path / "out", "--model_name_or_path", assets["blip"], "--test_file", str(data / "test.jsonl"),
                                   "--do_predict", "--max_bad_samples_fraction", "0.5"))
    skipped = [json.loads(line) for line in open(tmp_path / "out" / "skipped_samples.jsonl")]
    assert sorted(r["row"] for r in skipped) == [1, 2]
    predictions = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    assert [p["image"] for p in predictions] == [r["image"] for i, r in enumerate(rows) if i not in (1, 2)]
    assert metrics["predict_samples_per_second"] > 0


def test_blip2_end_to_end_trains_only_the_qformer_by_default(assets, tmp_path):
    before = AutoModelForImageTextToText.from_pretrained(assets["blip2"]).state_dict()
    metrics = rbc.main(common_args(
        assets, tmp_path, "--model_name_or_path", assets["blip2"],
        "--do_train", "--do_eval", "--do_predict", "--max_steps", "3", "--learning_rate", "1e-3",
    ))
    assert_finite_metrics(metrics, ["train_loss"] + [f"{s}_{k}" for s in ("eval", "predict") for k in CAPTION_METRICS])
    check_predictions(tmp_path, assets["data"]["test"], metrics)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(model).__name__ == "Blip2ForConditionalGeneration"
    after = model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed, "nothing trained"
    assert all(name.startswith(("qformer.", "query_tokens", "language_projection.")) for name in changed), sorted(changed)[:5]
    assert any(name.startswith("qformer.") for name in changed) and "query_tokens" in changed
    image = os.path.join(os.path.dirname(assets["data"]["test"]), "images", "test_00000.png")
    assert isinstance(caption_with_pipeline(tmp_path, image), str)


def test_freeze_flags(assets):
    model, _ = load(assets, "blip2")
    rbc.freeze_towers(model, rbc.ModelArguments(model_name_or_path="x", freeze_language_model=False, freeze_qformer=True))
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"language_model", "language_projection"}
    model, _ = load(assets, "blip")
    rbc.freeze_towers(model, rbc.ModelArguments(model_name_or_path="x", freeze_vision_model=True))
    assert {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad} == {"text_decoder"}
    with pytest.raises(ValueError, match="--freeze_qformer applies to BLIP-2 only"):
        rbc.freeze_towers(model, rbc.ModelArguments(model_name_or_path="x", freeze_qformer=True))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt", "a picture of "], "whitespace"),
        (["--label_smoothing_factor", "0.1"], "--label_smoothing instead"),
        (["--min_new_tokens", "30"], "--min_new_tokens"),
    ],
)
def test_bad_flags_fail_early(assets, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        rbc.main(common_args(assets, tmp_path, "--model_name_or_path", assets["blip"], "--do_eval", *extra))


def test_overfit_raises_cider_and_the_saved_model_captions(assets, tmp_path):
    """Six images with one caption each (a string column): after training on them, the captions generated for
    the same images score far above the untrained model's, by the same numbers pycocoevalcap gives."""
    data_dir = os.path.dirname(assets["data"]["train"])
    rows = [json.loads(line) for line in open(assets["data"]["train"])][:6]
    overfit = os.path.join(data_dir, "overfit.jsonl")
    write_jsonl(overfit, [{"image": r["image"], "caption": r["captions"][0]} for r in rows])
    args = [
        "--model_name_or_path", assets["blip"], "--train_file", overfit, "--validation_file", overfit, "--test_file", overfit,
        "--per_device_train_batch_size", "6", "--per_device_eval_batch_size", "6", "--num_beams", "1", "--max_new_tokens", "12",
        "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no", "--seed", "0",
    ]
    before = rbc.main(args + ["--output_dir", str(tmp_path / "before"), "--do_predict", "--use_java", "false"])
    out = tmp_path / "after"
    after = rbc.main(args + [
        "--output_dir", str(out), "--do_train", "--do_predict",
        "--max_steps", "80", "--learning_rate", "2e-3", "--warmup_steps", "5", "--weight_decay", "0",
    ])
    assert after["predict_cider"] > before["predict_cider"] + 2.0, (before["predict_cider"], after["predict_cider"])
    assert after["predict_loss"] < before["predict_loss"] / 4

    predictions = check_predictions(out, overfit, after, caption_column="caption")
    if HAS_JAVA:  # the numbers the COCO caption evaluation gives for the same captions (METEOR: tested in test_caption_metrics)
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        gts = PTBTokenizer().tokenize({i: [{"caption": c} for c in p["references"]] for i, p in enumerate(predictions)})
        res = PTBTokenizer().tokenize({i: [{"caption": p["prediction"]}] for i, p in enumerate(predictions)})
        bleu, _ = Bleu(4).compute_score(gts, res)
        expected = {f"predict_bleu_{n + 1}": bleu[n] for n in range(4)}
        expected["predict_rouge_l"], _ = Rouge().compute_score(gts, res)
        expected["predict_cider"], _ = Cider().compute_score(gts, res)
        for key, value in expected.items():
            assert after[key] == pytest.approx(value, abs=1e-9), key
        assert 0 < after["predict_meteor"] <= 1

    caption = caption_with_pipeline(out, os.path.join(data_dir, rows[0]["image"]))
    assert caption.strip() and caption == predictions[0]["references"][0], (caption, predictions[0])



def test_two_processes_train_and_score_each_image_once(assets, tmp_path):
    """torchrun with two CPU processes trains 2 steps, then evaluates and predicts 5 images in batches of 2 a process
    (the sampler pads the last step with repeats): the metrics equal one process's on the model it saved, and
    predictions.jsonl lists every image once, in data order, with the same captions."""
    test_file = assets["data"]["test"]
    two = tmp_path / "two"
    args = common_args(assets, two, "--model_name_or_path", assets["blip"], "--validation_file", test_file,
                       "--do_train", "--do_eval", "--do_predict", "--max_steps", "2", "--per_device_eval_batch_size", "2")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               os.path.join(repo, "run_blip_caption.py"), *args]
    result = subprocess.run(command, env=env, cwd=repo, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    double = read_json(two / "all_results.json")
    assert_finite_metrics(double, ["train_loss"] + [f"{s}_{k}" for s in ("eval", "predict") for k in CAPTION_METRICS])

    single = rbc.main(common_args(assets, tmp_path / "one", "--model_name_or_path", str(two), "--validation_file", test_file,
                                  "--do_eval", "--do_predict", "--per_device_eval_batch_size", "2"))
    for key in [f"{s}_{k}" for s in ("eval", "predict") for k in CAPTION_METRICS]:
        assert double[key] == pytest.approx(single[key], abs=1e-6), key
    one_lines = check_predictions(tmp_path / "one", test_file, single)
    two_lines = check_predictions(two, test_file, double)
    assert [p["prediction"] for p in two_lines] == [p["prediction"] for p in one_lines]


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_activation_checkpointing_takes_the_same_step(assets, tmp_path, monkeypatch, kind):
    """--activation_checkpointing (formerly --gradient_checkpointing) recomputes each layer in the backward pass:
    one step lands on the same weights, with dropout on everywhere (the recompute replays the random state)."""
    model = copy_with_dropout(assets[kind], tmp_path / "model")
    checkpoints = count_activation_checkpoints(monkeypatch)
    losses = {}
    for name, flags in (("plain", []), ("checkpointed", ["--activation_checkpointing"])):
        losses[name] = rbc.main([
            "--model_name_or_path", model, "--train_file", assets["data"]["train"], "--output_dir", str(tmp_path / name),
            "--do_train", "--max_steps", "1", "--per_device_train_batch_size", "8", "--learning_rate", "0.1", "--optim", "sgd",
            "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0", "--save_strategy", "no", "--use_java", "false", *flags,
        ])["train_loss"]
        assert bool(checkpoints) == (name == "checkpointed")
    assert losses["checkpointed"] == pytest.approx(losses["plain"], rel=1e-6)
    assert max_weight_difference(tmp_path / "plain", tmp_path / "checkpointed") < 1e-6


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_blip_evaluation_equals_blips_own_forward_and_generate(assets, num_beams):
    """The evaluation encodes each image once (for the loss and all beams) and projects its cross-attention keys and
    values once per image, never reordering them: every step's logits, the captions and the loss must equal those
    of BLIP's own forward and generate."""
    model, processor = load(assets, "blip")
    collator = make_collator(model, processor, prompt="a picture of")
    fmt = collator.caption_format
    batch = collator([{"pixel_values": p, "caption": "a red circle"} for p in random_images(3, seed=4)])
    head = model.text_decoder.get_output_embeddings()
    logits = {"own": [], "fast": []}
    settings = {"num_beams": num_beams, "max_new_tokens": 6, "min_new_tokens": 6}
    with torch.no_grad():
        handle = head.register_forward_hook(lambda module, args, output: logits["own"].append(output.clone()))
        input_ids = fmt.generate_input_ids(3, "cpu")
        own = model.generate(pixel_values=batch["pixel_values"], input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             **settings)[:, len(fmt.prefix):]
        handle.remove()
        handle = head.register_forward_hook(lambda module, args, output: logits["fast"].append(output.clone()))
        image_embeds = rbc.encode_images(model, batch["pixel_values"])
        fast = rbc.generate_captions(model, batch["pixel_values"], fmt, image_embeds=image_embeds, **settings)
        handle.remove()
        text = {k: v for k, v in batch.items() if k not in ("pixel_values", "labels")}
        own_loss = model(pixel_values=batch["pixel_values"], **text).logits
        fast_loss = model.text_decoder(**text, encoder_hidden_states=image_embeds).logits
    assert fast.tolist() == own.tolist()
    assert len(logits["fast"]) == len(logits["own"]) == 6
    for a, b in zip(logits["own"], logits["fast"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["own"][-1][0], logits["own"][-1][-1])  # the images do tell the rows apart
    torch.testing.assert_close(fast_loss, own_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_fast_blip2_evaluation_equals_blip2s_own_forward_and_generate(assets, num_beams):
    """BLIP-2's evaluation runs the vision tower, Q-Former and projection once per image and fills the image tokens
    with their output, for the loss and for generation: the captions, every step's logits and the loss must equal
    those of Blip2ForConditionalGeneration's own forward and generate (which each encode the images)."""
    model, processor = load(assets, "blip2")
    collator = make_collator(model, processor, prompt="a picture of")
    fmt = collator.caption_format
    captions = ["a red circle", "a blue square in the top left", "green"]  # padding, as evaluation batches have
    batch = collator([{"pixel_values": p, "caption": c} for p, c in zip(random_images(3, seed=4), captions)])
    labels = batch.pop("labels")
    head = model.get_output_embeddings()
    logits, vision_runs = {"own": [], "fast": []}, []
    model.vision_model.register_forward_hook(lambda module, args, output: vision_runs.append(1))
    settings = {"num_beams": num_beams, "max_new_tokens": 6, "min_new_tokens": 6}
    with torch.no_grad():
        handle = head.register_forward_hook(lambda module, args, output: logits["own"].append(output.clone()))
        input_ids = fmt.generate_input_ids(3, "cpu")  # as generate_captions called BLIP-2's generate before
        own = model.generate(pixel_values=batch["pixel_values"], input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             **dict(fmt.generate_kwargs), **settings)[:, len(fmt.prefix):]
        handle.remove()
        own_loss = rbc.caption_token_loss(model(**batch).logits, labels)
        own_runs = len(vision_runs)
        handle = head.register_forward_hook(lambda module, args, output: logits["fast"].append(output.clone()))
        image_embeds = rbc.encode_images(model, batch["pixel_values"])
        fast = rbc.generate_captions(model, batch["pixel_values"], fmt, image_embeds=image_embeds, **settings)
        handle.remove()
        fast_loss = rbc.caption_token_loss(rbc.caption_logits(model, batch, image_embeds), labels)
    assert fast.tolist() == own.tolist()
    assert len(logits["fast"]) == len(logits["own"]) == 6
    for a, b in zip(logits["own"], logits["fast"]):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(logits["own"][-1][0], logits["own"][-1][-1])  # the images do tell the rows apart
    torch.testing.assert_close(fast_loss[0], own_loss[0], rtol=1e-6, atol=1e-6)
    assert fast_loss[1].tolist() == own_loss[1].tolist()
    assert (own_runs, len(vision_runs) - own_runs) == (2, 1)


@pytest.mark.parametrize("kind", ["blip", "blip2"])
def test_evaluation_encodes_each_image_once(assets, tmp_path, monkeypatch, kind):
    """Through main(): the vision tower runs once per evaluation batch, on that batch's images, for both the loss and
    the beams of generation (6 validation images in batches of 4)."""
    batch_sizes = []
    load_model_and_processor = rbc.load_model_and_processor

    def load_and_count(model_args):
        model, processor = load_model_and_processor(model_args)
        model.vision_model.register_forward_hook(lambda module, args, output: batch_sizes.append(len(output.last_hidden_state)))
        return model, processor

    monkeypatch.setattr(rbc, "load_model_and_processor", load_and_count)
    metrics = rbc.main(common_args(assets, tmp_path, "--model_name_or_path", assets[kind], "--do_eval", "--num_beams", "3"))
    assert_finite_metrics(metrics, [f"eval_{k}" for k in CAPTION_METRICS])
    assert batch_sizes == [4, 2]
