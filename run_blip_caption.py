#!/usr/bin/env python
"""Image captioning fine-tuning (BLIP, BLIP-2) with the Trainer, evaluated by generating a caption per image and
scoring it against all of the image's references with the COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L,
CIDEr-D, equal to pycocoevalcap's).

One process:
    python run_blip_caption.py --model_name_or_path Salesforce/blip-image-captioning-base \
        --train_file coco_train.jsonl --validation_file coco_val.jsonl --prompt "a picture of" --num_beams 3 \
        --output_dir out --do_train --do_eval --bf16

Several GPUs:
    torchrun --nproc_per_node 8 run_blip_caption.py <the same flags>

Data larger than memory or disk, streamed from webdataset shards (or a Hub dataset) for a fixed number of steps:
    torchrun --nproc_per_node 8 run_blip_caption.py <the same flags> --train_file "shards/train-*.tar" --streaming --max_steps 20000

The embedded demo, a tiny BLIP trained from random weights on synthetic shapes, from a config file (a few minutes
on two CPU cores; one intra-op thread, as a model this small gains nothing from a second one):
    python -m utils.demo caption --output_dir demo && OMP_NUM_THREADS=1 python run_blip_caption.py configs/demo_caption.yaml

Then caption your own images with the trained folder:
    from transformers import pipeline
    captioner = pipeline("image-text-to-text", model="out")
    captioner(images="photo.jpg", text="a picture of", generate_kwargs={"num_beams": 3, "max_new_tokens": 20})
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    Blip2Processor,
    BlipProcessor,
    DynamicCache,
    EncoderDecoderCache,
    Trainer,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import EvalLoopOutput

from utils.caption_metrics import describe_skipped_metrics, score_captions
from utils.report import LazyImages, write_caption_gallery
from utils.arguments import DataSourceArguments, ModelSourceArguments
from utils.data import (
    EpochAware,
    ImageTextDataset,
    SetEpochCallback,
    SkippedSamples,
    check_columns,
    guess_column,
    load_or_replace,
    load_requested_splits,
    log_duplicate_rows,
    sample_seed,
)
from utils.images import ImageTransformSpec, build_image_transform, normalize_pixels
from utils.streams import ImageTextStream, StreamLoaderMixin, stream_options
from utils.text import resolve_max_length
from utils.training import (
    NonFiniteGuard,
    RunArguments,
    check_disk_space,
    count_parameters,
    freeze,
    parse_args,
    start_run,
    train_evaluate_predict,
    write_run_report,
)

logger = logging.getLogger(__name__)

SUPPORTED_MODELS = ("blip", "blip-2")


@dataclass
class ModelArguments(ModelSourceArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A captioning checkpoint (Hub id or folder): BlipForConditionalGeneration or Blip2ForConditionalGeneration."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Train from scratch from this BLIP/BLIP-2 config (name or path)."})
    config_overrides: str | None = field(default=None, metadata={"help": "With --config_name: top-level overrides such as 'num_query_tokens=16'."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "With --config_name: the tokenizer (its special tokens set the model's)."})
    image_processor_name: str | None = field(default=None, metadata={"help": "With --config_name: the image processor."})
    freeze_vision_model: bool | None = field(default=None, metadata={"help": "true/false: keep the vision tower frozen (default: BLIP false, BLIP-2 true)."})
    freeze_language_model: bool | None = field(
        default=None, metadata={"help": "true/false: keep the text decoder / language model frozen (default: BLIP false, BLIP-2 true)."}
    )
    freeze_qformer: bool | None = field(default=None, metadata={"help": "true/false, BLIP-2 only: keep the Q-Former and its queries frozen (default false)."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Label smoothing of the caption loss (BLIP trained with 0.1)."})

    def __post_init__(self):
        if bool(self.model_name_or_path) == bool(self.config_name):
            raise ValueError("Give exactly one model source: --model_name_or_path, or --config_name (from scratch).")
        if self.config_name and not (self.tokenizer_name and self.image_processor_name):
            raise ValueError("Training from --config_name needs --tokenizer_name and --image_processor_name.")
        if not self.config_name and (self.config_overrides or self.tokenizer_name or self.image_processor_name):
            raise ValueError("--config_overrides, --tokenizer_name and --image_processor_name only apply with --config_name.")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"--label_smoothing must be in [0, 1), got {self.label_smoothing}.")


@dataclass
class DataArguments(DataSourceArguments):
    caption_column: str | None = field(
        default=None, metadata={"help": "Column of reference captions: a string or a list (default: captions, caption, text)."}
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Tokens per training sequence, prompt and BLIP-2's image tokens included (default and cap: the model's limit)."}
    )
    clean_captions: bool = field(
        default=False, metadata={"help": "Clean training targets as BLIP does: lowercase, strip punctuation, cap at --max_caption_words."}
    )
    max_caption_words: int = field(default=30, metadata={"help": "With --clean_captions: keep the first N words (BLIP: 30 on COCO)."})

    def __post_init__(self):
        super().__post_init__()
        if self.max_caption_words < 1:
            raise ValueError(f"--max_caption_words must be >= 1, got {self.max_caption_words}.")


@dataclass
class CaptionArguments:
    prompt: str = field(default="", metadata={"help": "Text every caption starts from, in training and generation; stripped from reported captions."})
    num_beams: int = field(default=3, metadata={"help": "Beam search width in evaluation and prediction (BLIP on COCO: 3)."})
    max_new_tokens: int = field(default=20, metadata={"help": "Most tokens generated per caption, after the prompt."})
    min_new_tokens: int = field(default=0, metadata={"help": "Fewest tokens generated per caption before it may end (BLIP on COCO: 5)."})
    use_java: bool | None = field(
        default=None,
        metadata={"help": "true/false: score with the Java PTB tokenizer and METEOR as pycocoevalcap (METEOR takes ~10 s to load per "
                  "evaluation), or with the Python tokenizer and no METEOR (default: Java when it is found)."},
    )

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(
                f"--num_beams ({self.num_beams}) and --max_new_tokens ({self.max_new_tokens}) must be >= 1 and "
                f"--min_new_tokens ({self.min_new_tokens}) between 0 and --max_new_tokens."
            )
        if self.prompt != self.prompt.strip():
            raise ValueError(f"--prompt {self.prompt!r} starts or ends with whitespace: pass {self.prompt.strip()!r}; a space joins it to the caption.")


# --- What a user adapts for their task: the data, the text layout, the loss, the metrics ----------------------


class CaptionDataset(EpochAware, torch.utils.data.Dataset):
    """Training (`pairs=True`): one sample per (image, caption) pair, so an image with five references is five
    samples an epoch, each reference the target once, in the order the Trainer's sampler draws. Evaluation: one
    sample per image with all its references and its row `index`.

    A training image that fails to decode although its header passed the check before the run (a truncated
    file) is listed in skipped_samples.jsonl and replaced by another pair drawn from (seed, epoch, index): the
    same one after a resume."""

    def __init__(self, images: ImageTextDataset, pairs: bool):
        self.images = images
        self.samples = [(row, k) for row, captions in enumerate(images.captions) for k in range(len(captions) if pairs else 1)]
        self.pairs = pairs
        self._init_epoch()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        rng = random.Random(sample_seed(self.images.seed, self.epoch, index))
        on_error = self.record_decode_error if self.pairs and self.images.skip_log is not None else None
        # {"pixel_values": uint8 (3, H, W), "captions": [...]}
        index, sample = load_or_replace(lambda i: self.images[self.samples[i][0]], index, len(self), rng, on_error)
        row, k = self.samples[index]
        if self.pairs:
            return {"pixel_values": sample["pixel_values"], "caption": sample["captions"][k]}
        return {"pixel_values": sample["pixel_values"], "captions": sample["captions"], "index": row}

    def references(self, row: int) -> list[str]:
        return self.images.captions[row]

    def record_decode_error(self, index: int, err: Exception) -> None:
        self.images.record_decode_error(self.samples[index][0], err)


def clean_caption(caption: str, max_words: int = 30) -> str:
    """BLIP's `pre_caption` (salesforce/BLIP data/utils.py): lowercase, punctuation .!"()*#:;~ to spaces, single
    spaces, first `max_words` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    return " ".join(caption.split(" ")[:max_words])


@dataclass(frozen=True)
class CaptionFormat:
    """A training sequence laid out exactly as the model's `generate` lays out its own: `start + prompt + caption
    + [end]`. Generation gets `start + prompt` (and nothing from the references), continues, and stops at `end`.

    BLIP: start = [text_config.bos_token_id] (`generate` writes it over input_ids[:, 0]; for Salesforce's models
    it is `[DEC]`), end = sep_token_id (`[SEP]`, where `generate` stops). BLIP-2 (decoder-only LM): start =
    num_query_tokens image tokens (replaced by the Q-Former's outputs) + the LM's bos, end = its eos.
    """

    start_ids: tuple[int, ...]
    prompt: str
    prompt_ids: tuple[int, ...]
    end_id: int
    pad_id: int
    # BLIP's generate drops the last token of input_ids (it expects the tokenizer's trailing [SEP]).
    generate_suffix: tuple[int, ...] = ()
    # What generate needs to be told rather than read from the sub-model's generation config.
    generate_kwargs: tuple[tuple[str, int], ...] = ()

    @property
    def prefix(self) -> list[int]:
        return [*self.start_ids, *self.prompt_ids]

    def generate_input_ids(self, batch_size: int, device) -> torch.Tensor:
        """(B, P) prompt-only input ids: the same row for every image."""
        return torch.tensor([[*self.prefix, *self.generate_suffix]], device=device).repeat(batch_size, 1)


def build_caption_format(model, tokenizer, prompt: str) -> CaptionFormat:
    text = model.config.text_config
    prompt_ids = tuple(tokenizer(prompt, add_special_tokens=False)["input_ids"]) if prompt else ()
    if model.config.model_type == "blip":
        return CaptionFormat((text.bos_token_id,), prompt, prompt_ids, text.sep_token_id, text.pad_token_id, generate_suffix=(text.sep_token_id,))
    eos = text.eos_token_id[0] if isinstance(text.eos_token_id, list) else text.eos_token_id
    pad = text.pad_token_id if text.pad_token_id is not None else eos
    start = (model.config.image_token_id,) * model.config.num_query_tokens + (text.bos_token_id,)
    return CaptionFormat(start, prompt, prompt_ids, eos, pad, generate_kwargs=(("eos_token_id", eos), ("pad_token_id", pad)))


@dataclass
class CaptionCollator:
    """Stacks uint8 images and normalizes them once per batch; lays captions out as `CaptionFormat` says, padded
    to the longest in the batch. `labels` are the `input_ids` with -100 on the start tokens, the prompt and the
    padding: the loss covers the caption and its end token. Evaluation samples are scored (teacher-forced loss)
    on their first reference and carry their row `index`."""

    tokenizer: object
    caption_format: CaptionFormat
    max_length: int
    image_spec: ImageTransformSpec
    clean_captions: bool = False
    max_caption_words: int = 30

    def __call__(self, examples: list[dict]) -> dict:
        pixel_values = normalize_pixels(torch.stack([e["pixel_values"] for e in examples]), self.image_spec)
        captions = [e["caption"] if "caption" in e else e["captions"][0] for e in examples]
        batch = {"pixel_values": pixel_values, **self.encode(captions)}
        if "index" in examples[0]:
            batch["index"] = torch.tensor([e["index"] for e in examples])
        return batch

    def encode(self, captions: list[str]) -> dict:
        fmt = self.caption_format
        if self.clean_captions:
            captions = [clean_caption(c, self.max_caption_words) for c in captions]
        texts = [f"{fmt.prompt} {c}" if fmt.prompt else c for c in captions]
        # The prompt tokenized with its caption must start with the prompt tokenized alone (what generation sees).
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        room = self.max_length - len(fmt.prefix) - 1
        sequences, targets = [], []
        for text, ids in zip(texts, encoded):
            if tuple(ids[: len(fmt.prompt_ids)]) != fmt.prompt_ids:
                raise ValueError(f"the tokenizer merges --prompt {fmt.prompt!r} with the caption in {text!r}: pick a prompt that ends a word")
            caption_ids = ids[len(fmt.prompt_ids) :][:room]
            sequences.append([*fmt.prefix, *caption_ids, fmt.end_id])
            targets.append([-100] * len(fmt.prefix) + [*caption_ids, fmt.end_id])
        longest = max(map(len, sequences))
        input_ids = torch.full((len(sequences), longest), fmt.pad_id)
        labels = torch.full((len(sequences), longest), -100)
        attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
        for i, (ids, target) in enumerate(zip(sequences, targets)):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(ids)] = torch.tensor(target)
            attention_mask[i, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def caption_token_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy in float32: logits (B, T, V) at position t predict labels[:, t + 1] (B, T), as the
    models shift internally. Returns per-sequence loss sums (B,) and target counts (B,)."""
    logits = logits[:, :-1].float()
    targets = labels[:, 1:].to(logits.device)
    losses = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, label_smoothing=label_smoothing, reduction="none")
    return losses.sum(1), targets.ne(-100).sum(1)


class ImageSharedCache(EncoderDecoderCache):
    """BLIP's decoder cache for beam search, holding the image's cross-attention keys and values once per image's
    beams and never reordering them: reordering only permutes an image's own beams, which all attend to the same
    image, so those rows are equal and the copy generate would make at every step (12 layers x 2 x beams x 577
    tokens x 768 per image, for BLIP base) changes nothing."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.self_attention_cache.reorder_cache(beam_idx)


def image_cross_attention_cache(text_decoder, image_embeds: torch.Tensor, num_beams: int) -> ImageSharedCache:
    """A decoder cache already holding every layer's cross-attention keys and values of `image_embeds` (B, N, D):
    projected once per image, then repeated for its beams ((B * beams, heads, N, head_dim), generate's layout), so
    no layer projects the image again at the first step, once per beam. Mirrors BlipTextSelfAttention's own
    projection (tests/test_blip_caption.py checks the captions against BLIP's own generate)."""
    keys_values = []
    for layer in text_decoder.bert.encoder.layer:
        attention = layer.crossattention.self
        shape = (*image_embeds.shape[:-1], -1, attention.attention_head_size)
        keys = attention.key(image_embeds).view(shape).transpose(1, 2).repeat_interleave(num_beams, dim=0)
        values = attention.value(image_embeds).view(shape).transpose(1, 2).repeat_interleave(num_beams, dim=0)
        keys_values.append((keys, values))
    return ImageSharedCache(DynamicCache(), DynamicCache(keys_values))


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the text side conditions on, computed once per image for the loss and for every beam of generation (the
    model's own forward and generate would each encode the image). BLIP: the vision tower's output (B, N, D), which
    its decoder cross-attends to. BLIP-2: the Q-Former's query outputs projected to the language model (B, Q, D_lm),
    which take the place of the image tokens (`embed_with_images`)."""
    if model.config.model_type == "blip":
        return model.vision_model(pixel_values=pixel_values).last_hidden_state
    return model.get_image_features(pixel_values=pixel_values).pooler_output


def embed_with_images(model, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
    """BLIP-2: the language model's embeddings of `input_ids` (B, T, D_lm), the Q image tokens of each row replaced by
    that image's `image_embeds` (B, Q, D_lm), as Blip2ForConditionalGeneration's forward and generate fill them."""
    inputs_embeds = model.get_input_embeddings()(input_ids)
    image_tokens = (input_ids == model.config.image_token_id).unsqueeze(-1)
    return inputs_embeds.masked_scatter(image_tokens, image_embeds.to(inputs_embeds.dtype))


def caption_logits(model, batch: dict, image_embeds: torch.Tensor) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) of the batch's captions from images already encoded (`encode_images`): what
    `model(**batch).logits` gives, without encoding the images again."""
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if model.config.model_type == "blip":
        return model.text_decoder(**text, encoder_hidden_states=image_embeds).logits
    inputs_embeds = embed_with_images(model, text["input_ids"], image_embeds)
    return model.language_model(inputs_embeds=inputs_embeds, attention_mask=text["attention_mask"]).logits


@torch.no_grad()
def generate_captions(model, pixel_values: torch.Tensor, caption_format: CaptionFormat, image_embeds: torch.Tensor | None = None,
                      **generation_kwargs) -> torch.Tensor:
    """(B, T) caption tokens generated from the images and the prompt only, the prompt left out; the images are
    encoded here unless `image_embeds` (`encode_images`) is given.

    BLIP runs its text decoder's generate itself, as `BlipForConditionalGeneration.generate` does (start token,
    prompt, stop at [SEP]), with the image's cross-attention keys and values computed once per image
    (`image_cross_attention_cache`), not once per beam and copied at every step. BLIP-2 runs its language model's
    generate itself, as `Blip2ForConditionalGeneration.generate` does, on the prompt's embeddings with the image
    tokens filled in."""
    if image_embeds is None:
        image_embeds = encode_images(model, pixel_values)
    if model.config.model_type == "blip":
        batch_size = len(pixel_values)
        decoder = model.text_decoder
        input_ids = torch.tensor([caption_format.prefix], device=pixel_values.device).repeat(batch_size, 1)
        num_beams = generation_kwargs.get("num_beams") or decoder.generation_config.num_beams or 1
        sequences = decoder.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            past_key_values=image_cross_attention_cache(decoder, image_embeds, num_beams),
            eos_token_id=caption_format.end_id,
            pad_token_id=caption_format.pad_id,
            **generation_kwargs,
        )
    else:
        input_ids = caption_format.generate_input_ids(len(pixel_values), pixel_values.device)
        sequences = model.language_model.generate(
            input_ids=input_ids,  # given with inputs_embeds, it comes back in front of the new tokens, as from BLIP-2's generate
            inputs_embeds=embed_with_images(model, input_ids, image_embeds),
            attention_mask=torch.ones_like(input_ids),
            **dict(caption_format.generate_kwargs),
            **generation_kwargs,
        )
    return sequences[:, len(caption_format.prefix) :]  # both return the prompt they were given, then the caption


def decode_caption(tokenizer, tokens: list[int], end_id: int) -> str:
    """Generated tokens -> text, cut at the first end token (BLIP-2 OPT's is a newline, not a special token)."""
    tokens = tokens[: tokens.index(end_id)] if end_id in tokens else tokens
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def compute_metrics(predictions: list[str], references: list[list[str]], use_java: bool | None = None):
    """COCO caption metrics of one generated caption per image against all its references, as pycocoevalcap
    computes them, and the per-image scores; METEOR needs Java, and the log says when and why it is left out."""
    scores = score_captions(predictions, references, use_java)
    for metric, reason in scores.skipped.items():
        logger.warning("Caption metric %s skipped: %s", metric, reason)
    return scores


class CaptionTrainer(StreamLoaderMixin, Trainer):
    """The Trainer with the caption loss (label smoothing, token-weighted across batches and accumulation steps),
    and an evaluation that generates from the image and the prompt only (and a training stream's DataLoader, for
    --streaming).

    Not Seq2SeqTrainer(predict_with_generate=True): it hands the batch's `input_ids`, the reference caption, to
    `generate`, which then continues the reference and inflates every metric.
    """

    def __init__(
        self, *args, caption_format: CaptionFormat, generation_kwargs: dict, label_smoothing: float = 0.0, use_java: bool | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.caption_format = caption_format
        self.use_java = use_java
        self.generation_kwargs = generation_kwargs
        self.label_smoothing = label_smoothing

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        loss_sum, count = caption_token_loss(outputs.logits, labels, self.label_smoothing)
        if num_items_in_batch is None:
            loss = loss_sum.sum() / count.sum().clamp(min=1)
        else:
            # Every target token weighs the same across the accumulated batches (and processes, whose
            # gradients DDP averages): divide by the tokens of all of them.
            loss = loss_sum.sum() / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Generate a caption per image, gather them across processes (each image exactly once), score them against
        every reference; also the teacher-forced loss on each image's first reference."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        fmt = self.caption_format
        rows, captions, loss_sums, counts = [], [], [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            index, labels = batch.pop("index"), batch.pop("labels")
            with torch.no_grad(), self.autocast_smart_context_manager():
                image_embeds = encode_images(model, batch["pixel_values"])  # once, for the loss and every beam
                loss_sum, count = caption_token_loss(caption_logits(model, batch, image_embeds), labels)
                tokens = generate_captions(model, batch["pixel_values"], fmt, image_embeds=image_embeds, **self.generation_kwargs)
            tokens = self.accelerator.pad_across_processes(tokens, dim=1, pad_index=fmt.pad_id)
            tokens, index, loss_sum, count = self.accelerator.gather_for_metrics((tokens, index, loss_sum, count))
            rows += index.tolist()
            captions += [decode_caption(self.processing_class.tokenizer, t, fmt.end_id) for t in tokens.tolist()]
            loss_sums.append(loss_sum.cpu())
            counts.append(count.cpu())
        predictions = [caption for _, caption in sorted(zip(rows, captions))]
        references = [dataloader.dataset.references(row) for row in sorted(rows)]
        scores = compute_metrics(predictions, references, self.use_java)
        metrics = dict(scores.metrics)
        metrics["loss"] = (torch.cat(loss_sums).sum() / torch.cat(counts).sum().clamp(min=1)).item()
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.last_predictions, self.last_per_image_cider = predictions, scores.per_image["cider"]
        return EvalLoopOutput(predictions=predictions, label_ids=None, metrics=metrics, num_samples=len(predictions))


# --- Model and processor ----------------------------------------------------------------------------------


def load_model_and_processor(model_args: ModelArguments):
    """From a checkpoint, or from a config with the tokenizer's special tokens; returns (model, processor)."""
    hub = model_args.hub_kwargs()
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **hub)
        check_model_type(config, model_args.model_name_or_path)
        model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, **hub)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, **hub)
    else:
        config = AutoConfig.from_pretrained(model_args.config_name, **hub)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        check_model_type(config, model_args.config_name)
        tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name, **hub)
        image_processor = AutoImageProcessor.from_pretrained(model_args.image_processor_name, **hub)
        if config.model_type == "blip":
            processor = BlipProcessor(image_processor, tokenizer)
        else:
            processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=config.num_query_tokens)
        set_special_tokens_from_tokenizer(config, processor)
        model = AutoModelForImageTextToText.from_config(config, trust_remote_code=model_args.trust_remote_code)
    check_special_tokens(model, processor.tokenizer)
    return model, processor


def check_model_type(config, source: str) -> None:
    if config.model_type not in SUPPORTED_MODELS:
        raise ValueError(f"{source} is a {config.model_type!r} model; this script trains {SUPPORTED_MODELS} captioners.")
    if config.model_type == "blip-2" and config.text_config.is_encoder_decoder:
        raise ValueError(f"{source}: BLIP-2 with an encoder-decoder language model (Flan-T5) is not supported; use an OPT-style one.")


def set_special_tokens_from_tokenizer(config, processor) -> None:
    """A from-scratch model takes its vocabulary size and special token ids from the tokenizer, so training and
    `generate` start, stop and pad on tokens that exist. BLIP gets a `[DEC]` bos token, as Salesforce's
    tokenizer has, when the tokenizer has none."""
    tokenizer, text = processor.tokenizer, config.text_config
    if config.model_type == "blip":
        if tokenizer.bos_token is None:
            tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        text.sep_token_id = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
        text.eos_token_id = text.sep_token_id
    else:
        text.eos_token_id = tokenizer.eos_token_id
        config.image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    text.bos_token_id = tokenizer.bos_token_id
    text.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    text.vocab_size = len(tokenizer)


def check_special_tokens(model, tokenizer) -> None:
    """Fail before training when a token id the captions start, stop or pad with is outside the vocabulary (BLIP's
    default bos, 30522, is one past a BERT vocabulary), or the tokenizer has ids the model cannot embed."""
    rows = model.get_input_embeddings().num_embeddings
    text = model.config.text_config
    ids = {"bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id}
    if model.config.model_type == "blip":
        ids["sep_token_id"] = text.sep_token_id
    else:
        ids["eos_token_id"] = text.eos_token_id[0] if isinstance(text.eos_token_id, list) else text.eos_token_id
        ids["image_token_id"] = model.config.image_token_id
    for name, value in ids.items():
        if value is None or not 0 <= value < rows:
            raise ValueError(
                f"text_config.{name}={value} is not a token of the model's {rows}-token embedding. Set it to the "
                "tokenizer's id of that token in the model's config.json, or train from --config_name with "
                "--tokenizer_name, which sets every special token from the tokenizer."
            )
    if len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}: pass the model's own tokenizer.")


def freeze_towers(model, model_args: ModelArguments) -> None:
    """BLIP trains everything by default; BLIP-2 trains its Q-Former, queries and projection, with the vision
    tower and the language model frozen, unless the --freeze_* flags say otherwise."""
    is_blip2 = model.config.model_type == "blip-2"
    if model_args.freeze_qformer is not None and not is_blip2:
        raise ValueError("--freeze_qformer applies to BLIP-2 only: BLIP has no Q-Former.")
    def wanted(flag: bool | None) -> bool:
        return is_blip2 if flag is None else flag  # unset: frozen for BLIP-2, trained for BLIP

    if wanted(model_args.freeze_vision_model):
        freeze(model.vision_model)
    if wanted(model_args.freeze_language_model):
        freeze(model.language_model if is_blip2 else model.text_decoder)
    if is_blip2 and model_args.freeze_qformer:
        freeze(model.qformer)
        model.query_tokens.requires_grad_(False)


def image_reference(value, row: int):
    """What predictions.jsonl names an image by: its path as the data file gives it, else its row."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("path"):
        return value["path"]
    return row


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments and logging.
    model_args, data_args, caption_args, run_args, training_args = parse_args(
        (ModelArguments, DataArguments, CaptionArguments, RunArguments, TrainingArguments), argv
    )
    if training_args.label_smoothing_factor:
        raise ValueError("--label_smoothing_factor is not read by this script's loss: pass --label_smoothing instead.")
    resume_from = start_run(training_args, run_args, model_args, data_args, caption_args)
    if caption_args.use_java and describe_skipped_metrics(use_java=True):
        raise ValueError(f"--use_java true, but {describe_skipped_metrics(use_java=True)['meteor']}: install Java, or pass --use_java false.")

    # 2. Data: every requested split, columns and captions checked before anything heavy happens.
    splits = load_requested_splits(data_args, training_args, model_args.cache_dir, data_args.image_column)
    first = next(iter(splits.values()))
    image_column = data_args.image_column or guess_column(first, ("image", "image_path", "file_name", "filepath"), "image_column")
    caption_column = data_args.caption_column or guess_column(first, ("captions", "caption", "text"), "caption_column")
    for rows in splits.values():
        check_columns(rows, image_column=image_column, caption_column=caption_column)

    # 3. Model and processor, seeded first (a model from --config_name starts at random); what trains.
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args)
    freeze_towers(model, model_args)
    trainable, total = count_parameters(model)
    logger.info("%s: %.1fM parameters, %.1fM trainable", type(model).__name__, total / 1e6, trainable / 1e6)
    check_disk_space(training_args.output_dir, model, training=training_args.do_train)

    # 4. Preprocessing: transforms from the model's own image processor; captions laid out as generate lays them out.
    image_spec = ImageTransformSpec.from_image_processor(processor.image_processor)
    max_length = resolve_max_length(data_args.max_seq_length, processor.tokenizer, model.config.text_config)
    caption_format = build_caption_format(model, processor.tokenizer, caption_args.prompt)
    if len(caption_format.prefix) >= max_length:
        raise ValueError(f"--prompt {caption_args.prompt!r} leaves no room for a caption in {max_length} tokens: shorten it or raise --max_seq_length.")
    logger.info(
        "Images: %s; sequences: %d start tokens, %d prompt tokens, caption, end token %d; at most %d tokens",
        image_spec, len(caption_format.start_ids), len(caption_format.prompt_ids), caption_format.end_id, max_length,
    )
    # Unusable rows are left out and listed; evaluation images are decoded in full up front. A streamed training
    # split is checked row by row as it is read, and shows each image once a pass with one of its captions.
    skip_log = SkippedSamples.for_run(training_args, resuming=resume_from is not None)
    datasets_ = {}
    for split, rows in splits.items():
        if rows.streaming:  # duplicates are not counted: that would read the whole stream
            datasets_[split] = ImageTextStream(
                rows, image_column, caption_column, build_image_transform(image_spec, draft=data_args.jpeg_draft),
                **stream_options(training_args, data_args, run_args, skip_log),
            )
            logger.info("%s: streamed from %s (%d shards)", split, rows.origin, rows.rows.num_shards)
            continue
        log_duplicate_rows(rows, [image_column, caption_column], split)
        images = ImageTextDataset(
            rows, image_column, caption_column, build_image_transform(image_spec, draft=split == "train" and data_args.jpeg_draft),
            sample_caption=False, seed=training_args.seed,
            skip_log=skip_log, split_name=split, decode_check=split != "train", max_bad_fraction=run_args.max_bad_samples_fraction,
        )
        datasets_[split] = CaptionDataset(images, pairs=split == "train")
        logger.info("%s: %d images, %d captions, %d samples", split, len(images), sum(map(len, images.captions)), len(datasets_[split]))
    collator = CaptionCollator(processor.tokenizer, caption_format, max_length, image_spec, data_args.clean_captions, data_args.max_caption_words)
    first = datasets_[next(iter(datasets_))]
    example = first.example_captions() if isinstance(first, ImageTextStream) else first.references(0)
    collator.encode(example[:1])  # a prompt the tokenizer merges fails here

    # 5. Trainer.
    trainer = CaptionTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets_.get("train"),
        eval_dataset=datasets_.get("validation"),
        data_collator=collator,
        processing_class=processor,
        caption_format=caption_format,
        generation_kwargs={
            "num_beams": caption_args.num_beams,
            "max_new_tokens": caption_args.max_new_tokens,
            "min_new_tokens": caption_args.min_new_tokens,
        },
        label_smoothing=model_args.label_smoothing,
        use_java=caption_args.use_java,
        callbacks=[NonFiniteGuard()] + ([SetEpochCallback(datasets_["train"])] if "train" in datasets_ else []),
    )

    # 6. Train, evaluate, predict; every split's metrics land in <split>_results.json and all_results.json, the
    # test split's captions in predictions.jsonl, and each scored split's first images in a gallery.
    def after_split(split, split_metrics):
        if not trainer.is_world_process_zero():
            return
        predictions = trainer.last_predictions  # one caption per image, in the split's order
        images = datasets_[split].images
        if split == "test":
            path = os.path.join(training_args.output_dir, "predictions.jsonl")
            with open(path, "w") as f:
                for row, prediction in enumerate(predictions):
                    image = image_reference(images.image_value(row), row)
                    f.write(json.dumps({"image": image, "prediction": prediction, "references": images.captions[row]}) + "\n")
            logger.info("Wrote %d captions to %s", len(predictions), path)
        if data_args.gallery_size:
            path = write_caption_gallery(
                os.path.join(training_args.output_dir, f"gallery_{split}.html"),
                LazyImages(images.images.select(images.rows), image_column, images.base_dir),
                [image_reference(images.image_value(row), row) for row in range(len(images))],
                predictions, images.captions, trainer.last_per_image_cider, max_items=data_args.gallery_size,
                summary={k: v for k, v in split_metrics.items() if not k.endswith(("runtime", "per_second"))},
            )
            logger.info("Wrote %s", path)

    metrics = train_evaluate_predict(trainer, datasets_, resume_from, skip_log, after_split)

    # 7. What the run leaves to look at: the curves, and a model card with the command and the metrics.
    write_run_report(trainer, "run_blip_caption.py", argv, data_args, datasets_, metrics,
                     tasks="image-text-to-text", tags=["image-captioning", model.config.model_type])
    return metrics


if __name__ == "__main__":
    main()
