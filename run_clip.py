#!/usr/bin/env python
"""Contrastive image-text fine-tuning (CLIP, or a dual encoder from a pretrained vision and text encoder),
evaluated by retrieval recall.

One process:
    python run_clip.py --model_name_or_path openai/clip-vit-base-patch32 \
        --train_file train.jsonl --validation_file val.jsonl --image_column image --caption_column captions \
        --output_dir out --do_train --do_eval --bf16 --per_device_train_batch_size 128

Several GPUs (negatives are gathered from every process by default):
    torchrun --nproc_per_node 8 run_clip.py <the same flags>

Data larger than memory or disk, streamed from webdataset shards (or a Hub dataset) for a fixed number of steps:
    torchrun --nproc_per_node 8 run_clip.py <the same flags> --train_file "shards/train-*.tar" --streaming --max_steps 20000

A pretrained ViT and a pretrained BERT joined by new projections, from a config file:
    python run_clip.py configs/dual_encoder.yaml
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
    set_seed,
)
from transformers.trainer_utils import EvalLoopOutput

from utils.arguments import DataSourceArguments, ModelSourceArguments
from utils.data import (
    ImageTextDataset,
    SetEpochCallback,
    SkippedSamples,
    check_columns,
    guess_column,
    load_requested_splits,
    log_duplicate_rows,
)
from utils.images import ImageTransformSpec, build_image_transform, normalize_pixels
from utils.losses import clip_loss
from utils.report import LazyImages, write_retrieval_gallery
from utils.retrieval import chance_recall, retrieval_metrics
from utils.streams import ImageTextStream, StreamLoaderMixin, stream_options
from utils.text import resolve_max_length
from utils.towers import pool_last_layers
from utils.training import (
    NonFiniteGuard,
    RunArguments,
    build_param_groups,
    check_disk_space,
    count_parameters,
    freeze,
    parse_args,
    start_run,
    train_evaluate_predict,
    write_run_report,
)

logger = logging.getLogger(__name__)

# The parameters of each tower's encoder, by name prefix (CLIPModel and VisionTextDualEncoderModel alike).
# The projections and the temperature are not part of a tower: they train at --learning_rate.
VISION_PREFIX, TEXT_PREFIX = "vision_model.", "text_model."


@dataclass
class ModelArguments(ModelSourceArguments):
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A CLIP-family checkpoint (Hub id or folder): CLIPModel, VisionTextDualEncoderModel."}
    )
    vision_model_name_or_path: str | None = field(
        default=None, metadata={"help": "With --text_model_name_or_path: build a dual encoder from this vision encoder (ViT, DeiT, DINOv2, CLIP vision, ...)."}
    )
    text_model_name_or_path: str | None = field(
        default=None, metadata={"help": "With --vision_model_name_or_path: the text encoder (BERT/RoBERTa family, MPNet, ...)."}
    )
    config_overrides: str | None = field(
        default=None, metadata={"help": "With --config_name: overrides such as 'projection_dim=256,logit_scale_init_value=2.0'."}
    )
    freeze_vision_model: bool = field(default=False, metadata={"help": "Keep the vision encoder frozen throughout."})
    freeze_text_model: bool = field(default=False, metadata={"help": "Keep the text encoder frozen throughout."})
    freeze_vision_steps: int = field(default=0, metadata={"help": "Freeze the vision encoder for the first N optimizer steps."})
    freeze_text_steps: int = field(default=0, metadata={"help": "Freeze the text encoder for the first N optimizer steps."})
    vision_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the vision encoder."})
    text_learning_rate: float | None = field(default=None, metadata={"help": "Learning rate of the text encoder."})
    max_logit_scale: float = field(default=100.0, metadata={"help": "Clamp exp(logit_scale) to [1, this] after each step."})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "Attention kernel: sdpa, eager, flash_attention_2, ... (default: transformers' choice, sdpa where the "
                          "model has it; but eager when training in bf16 on CPU, where sdpa's backward is the slower one)."},
    )
    pooled_last_layer: bool = field(
        default=True,
        metadata={"help": "Run each tower's last layer (CLIP; ViT, DeiT, DINOv2, BERT, RoBERTa, ...) at the token it pools alone (the same embeddings and "
                          "gradients; CLIP's text tower also skips the positions past each caption's end-of-text token; 10%% fewer FLOPs "
                          "at ViT-B/32). --pooled_last_layer false runs the model's own forward."},
    )
    gather_negatives: bool = field(
        default=True, metadata={"help": "With several processes, contrast against the features of every process."}
    )
    contrastive_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Encode each batch in chunks of this size with cached features (GradCache): the whole batch is "
                          "contrasted while activations are kept for one chunk at a time. gradient_accumulation_steps adds no negatives."},
    )

    def __post_init__(self):
        ways = [bool(self.model_name_or_path), bool(self.vision_model_name_or_path or self.text_model_name_or_path), bool(self.config_name)]
        if sum(ways) != 1:
            raise ValueError(
                "Give exactly one model source: --model_name_or_path, or --vision_model_name_or_path with "
                "--text_model_name_or_path, or --config_name (from scratch)."
            )
        if bool(self.vision_model_name_or_path) != bool(self.text_model_name_or_path):
            raise ValueError("--vision_model_name_or_path and --text_model_name_or_path go together: pass both.")
        if self.config_overrides and not self.config_name:
            raise ValueError("--config_overrides only applies with --config_name.")
        for name in ("freeze_vision_steps", "freeze_text_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")
        if self.contrastive_chunk_size is not None and self.contrastive_chunk_size < 1:
            raise ValueError(f"--contrastive_chunk_size must be >= 1, got {self.contrastive_chunk_size}.")
        if self.max_logit_scale < 1:
            raise ValueError(f"--max_logit_scale must be >= 1, got {self.max_logit_scale}.")


@dataclass
class DataArguments(DataSourceArguments):
    caption_column: str | None = field(default=None, metadata={"help": "Column of captions: a string or a list (default: captions, caption, text)."})
    max_seq_length: int | None = field(default=None, metadata={"help": "Truncate captions to this many tokens (default and cap: the text model's limit)."})
    augment: bool = field(default=False, metadata={"help": "Random resized crop and horizontal flip in training."})
    retrieval_chunk_size: int = field(default=1024, metadata={"help": "Queries scored at once in retrieval (memory: chunk x N)."})

    def __post_init__(self):
        super().__post_init__()
        if self.retrieval_chunk_size < 1:
            raise ValueError(f"--retrieval_chunk_size must be >= 1, got {self.retrieval_chunk_size}.")


# --- What a user adapts for their task: batching, the loss, the evaluation ---------------------------------


@dataclass
class ClipCollator:
    """Stacks uint8 images and normalizes them once per batch; tokenizes captions padded to the longest one
    in the batch (not to a fixed length). Evaluation samples carry all their captions: they are flattened
    and `caption_counts` says how many belong to each image."""

    tokenizer: object
    max_length: int
    image_spec: ImageTransformSpec

    def __call__(self, examples: list[dict]) -> dict:
        pixel_values = normalize_pixels(torch.stack([e["pixel_values"] for e in examples]), self.image_spec)
        if "caption" in examples[0]:
            texts, counts = [e["caption"] for e in examples], None
        else:
            texts = [c for e in examples for c in e["captions"]]
            counts = torch.tensor([len(e["captions"]) for e in examples])
        tokens = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {"pixel_values": pixel_values, **tokens}
        if counts is not None:
            batch["caption_counts"] = counts
        return batch


def embed(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalized (image, text) embeddings through the model's own feature functions."""
    text_inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
    image = model.get_image_features(pixel_values=batch["pixel_values"])
    text = model.get_text_features(**text_inputs)
    image = image if isinstance(image, torch.Tensor) else image.pooler_output
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


class ClipTrainer(StreamLoaderMixin, Trainer):
    """The Trainer with the CLIP loss in float32 (global negatives across processes), per-tower learning
    rates and freezing schedules, and retrieval evaluation (and a training stream's DataLoader, for --streaming)."""

    def __init__(self, *args, model_args: ModelArguments, retrieval_chunk_size: int = 1024, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_args = model_args
        self.retrieval_chunk_size = retrieval_chunk_size

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {k: v for k, v in inputs.items() if k != "caption_counts"}
        # The wrapped model's forward (so DDP sees it); its embeds are L2-normalized already.
        outputs = model(**inputs)
        temperature = self.accelerator.unwrap_model(model).logit_scale
        with gathered(temperature):
            logit_scale = temperature.exp()
        loss = clip_loss(outputs.image_embeds, outputs.text_embeds, logit_scale, gather_distributed=self.model_args.gather_negatives)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if "loss" in logs:  # the temperature, beside the training loss, in the logs and the curves
            temperature = self.accelerator.unwrap_model(self.model).logit_scale
            with gathered(temperature):
                logs["logit_scale"] = round(temperature.detach().float().exp().item(), 4)
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            decay = set(self.get_decay_parameter_names(model)) - {"logit_scale"}
            groups = build_param_groups(
                model.named_parameters(),
                decay,
                self.args.weight_decay,
                self.args.learning_rate,
                {VISION_PREFIX: self.model_args.vision_learning_rate, TEXT_PREFIX: self.model_args.text_learning_rate},
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)  # each group carries its own
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        chunk_size = self.model_args.contrastive_chunk_size
        if chunk_size and len(inputs["pixel_values"]) > chunk_size:
            loss = self._cached_feature_step(model, inputs, chunk_size)
        else:
            loss = super().training_step(model, inputs, num_items_in_batch)
        # Progressive training: a tower still in its frozen phase gets no update. Dropping its gradients
        # (rather than not computing them) keeps every parameter in the graph, as DDP requires.
        step = self.state.global_step
        for prefix, frozen_steps in ((VISION_PREFIX, self.model_args.freeze_vision_steps), (TEXT_PREFIX, self.model_args.freeze_text_steps)):
            if step < frozen_steps:
                for name, parameter in self.accelerator.unwrap_model(model).named_parameters():
                    if name.startswith(prefix):
                        parameter.grad = None
        return loss

    def _cached_feature_step(self, model, inputs, chunk_size: int) -> torch.Tensor:
        """GradCache (Gao et al. 2021): the gradient of the loss over the whole batch, with activations held
        for one chunk at a time. (1) Encode every chunk without a graph; (2) compute the loss on the cached
        features and its gradient with respect to them and to the temperature; (3) re-encode each chunk with a
        graph, replaying its random state (dropout), and back-propagate the cached gradient through it. The
        parameter gradient is exactly that of one big step."""
        if self.is_deepspeed_enabled:
            raise ValueError("--contrastive_chunk_size is not supported with DeepSpeed; use a larger per-device batch instead.")
        model.train()
        inputs = self._prepare_inputs({k: v for k, v in inputs.items() if k != "caption_counts"})
        size = len(inputs["pixel_values"])
        chunks = [{k: v[start : start + chunk_size] for k, v in inputs.items()} for start in range(0, size, chunk_size)]
        rng_states, image_parts, text_parts = [], [], []
        with torch.no_grad(), self.compute_loss_context_manager():
            for chunk in chunks:
                rng_states.append(_rng_state())
                outputs = model(**chunk)
                image_parts.append(outputs.image_embeds.float())
                text_parts.append(outputs.text_embeds.float())
        after_first_pass = _rng_state()
        image = torch.cat(image_parts).requires_grad_()
        text = torch.cat(text_parts).requires_grad_()
        unwrapped = self.accelerator.unwrap_model(model)
        log_scale = unwrapped.logit_scale.detach().clone().requires_grad_()
        loss = clip_loss(image, text, log_scale.exp(), gather_distributed=self.model_args.gather_negatives)
        loss.backward()
        accumulation = self.current_gradient_accumulation_steps
        start = 0
        for index, (chunk, state) in enumerate(zip(chunks, rng_states)):
            last = index == len(chunks) - 1
            rows = slice(start, start + len(chunk["pixel_values"]))
            start = rows.stop
            _set_rng_state(state)
            # Gradients are all-reduced once, with the last chunk.
            with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                with self.compute_loss_context_manager():
                    outputs = model(**chunk)
                    surrogate = (outputs.image_embeds.float() * image.grad[rows]).sum() + (outputs.text_embeds.float() * text.grad[rows]).sum()
                    # The temperature's gradient once; zero times it elsewhere keeps it in every graph for DDP.
                    surrogate = surrogate + unwrapped.logit_scale * (log_scale.grad if last else 0.0)
                self.accelerator.backward(surrogate / accumulation)
        _set_rng_state(after_first_pass)
        return loss.detach() / accumulation

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"):
        """Embed every image and every caption once, gather them across processes (each sample exactly once),
        then rank: retrieval recall both ways, mean/median rank, and the contrastive loss."""
        model = self.accelerator.unwrap_model(self.model)
        model.eval()
        images, texts, counts = [], [], []
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.autocast_smart_context_manager():
                image_embeds, text_embeds = embed(model, batch)
            caption_counts = batch["caption_counts"]
            # Captions per image vary: pad to (B, C, D) so batches gather as one tensor, drop padding after.
            per_image = torch.zeros(len(caption_counts), int(caption_counts.max()), text_embeds.shape[-1], device=text_embeds.device)
            mask = torch.arange(per_image.shape[1], device=per_image.device)[None, :] < caption_counts[:, None]
            per_image[mask] = text_embeds
            per_image = self.accelerator.pad_across_processes(per_image, dim=1)
            image_embeds, per_image, caption_counts = self.accelerator.gather_for_metrics((image_embeds, per_image, caption_counts))
            for i in range(len(caption_counts)):
                texts.append(per_image[i, : caption_counts[i]].cpu())
            images.append(image_embeds.cpu())
            counts.append(caption_counts.cpu())
        image_embeds = torch.cat(images)
        counts = torch.cat(counts)
        text_embeds = torch.cat(texts)
        text_to_image = torch.repeat_interleave(torch.arange(len(counts)), counts)
        metrics = retrieval_metrics(image_embeds, text_embeds, text_to_image, chunk_size=self.retrieval_chunk_size)
        metrics["loss"] = self._eval_loss(model, image_embeds, text_embeds, counts)
        chance = chance_recall(counts)
        logger.info("%s: %d images, %d captions; recall at chance: %s", description, len(counts), len(text_embeds),
                    ", ".join(f"{k}={v:.3f}" for k, v in chance.items()))
        self.last_embeddings = {"image": image_embeds, "text": text_embeds, "text_to_image": text_to_image}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=len(image_embeds))

    def _eval_loss(self, model, image_embeds, text_embeds, counts) -> float:
        """The training loss on (image, first caption) pairs in consecutive blocks of the per-device eval batch
        size, from the gathered embeddings: the same figure for any number of processes."""
        first_caption = text_embeds[torch.cumsum(counts, 0) - counts]
        with gathered(model.logit_scale):
            scale = model.logit_scale.detach().float().exp().cpu()
        block = self.args.per_device_eval_batch_size
        total = 0.0
        for start in range(0, len(image_embeds), block):
            chunk = slice(start, start + block)
            total += clip_loss(image_embeds[chunk], first_caption[chunk], scale).item() * len(image_embeds[chunk])
        return total / max(len(image_embeds), 1)


def _rng_state() -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


class ClampLogitScaleCallback(TrainerCallback):
    """Clamp the learned temperature to [0, ln(max_logit_scale)] after every optimizer step, as open_clip does:
    unclamped, exp(logit_scale) grows until the logits overflow."""

    def __init__(self, max_logit_scale: float):
        self.max_log = math.log(max_logit_scale)

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        temperature = model.logit_scale
        with torch.no_grad(), gathered(temperature, modify=True):
            temperature.clamp_(0, self.max_log)
        if hasattr(temperature, "ds_id") or hasattr(temperature, "_hp_mapping"):
            # DeepSpeed steps an fp32 master copy of each parameter and copies it into the model after every step:
            # clamped only in the model, the temperature would be unclamped again one step later.
            from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

            master = safe_get_full_fp32_param(temperature)
            if master is not None:
                safe_set_full_fp32_param(temperature, master.clamp(0, self.max_log))


@contextlib.contextmanager
def gathered(parameter: torch.nn.Parameter, modify: bool = False):
    """DeepSpeed ZeRO-3 partitions every parameter across processes outside the model's forward, CLIP's 0-d
    temperature too, which the loss, the logs and the clamp use there: gather it for the block (with `modify`, the
    changes made on rank 0 are kept on every process). Without ZeRO-3, the parameter is used as it is."""
    if not hasattr(parameter, "ds_id"):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0 if modify else None):
        yield


def write_gallery(trainer: ClipTrainer, dataset: ImageTextDataset, metrics: dict, path: str, size: int) -> None:
    """Top-5 retrieved captions per image and top images per caption, hits marked, from the embeddings of the
    evaluation that just ran."""
    embeddings = trainer.last_embeddings
    values = [dataset.image_value(i) for i in range(len(dataset))]
    write_retrieval_gallery(
        path,
        LazyImages(dataset.images.select(dataset.rows), dataset.image_column, dataset.base_dir),
        [value if isinstance(value, str) else f"#{i}" for i, value in enumerate(values)],
        [caption for captions in dataset.captions for caption in captions],
        embeddings["text_to_image"].tolist(),
        embeddings["image"],
        embeddings["text"],
        max_items=size,
        summary={k: v for k, v in metrics.items() if k.endswith(("_r1", "_r5", "_r10", "_loss"))},
    )
    logger.info("Wrote %s", path)


# --- Model and processor ----------------------------------------------------------------------------------


def load_model_and_processor(model_args: ModelArguments):
    """One of the three ways in; returns (model, processor holding an image processor and a tokenizer)."""
    hub = model_args.hub_kwargs()
    if model_args.model_name_or_path:
        model = AutoModel.from_pretrained(model_args.model_name_or_path, **hub)
        processor = AutoProcessor.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path, **hub)
    elif model_args.vision_model_name_or_path:
        model = VisionTextDualEncoderModel.from_vision_text_pretrained(
            model_args.vision_model_name_or_path, model_args.text_model_name_or_path, cache_dir=model_args.cache_dir
        )
        processor = VisionTextDualEncoderProcessor(
            AutoImageProcessor.from_pretrained(model_args.image_processor_name or model_args.vision_model_name_or_path, **hub),
            AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.text_model_name_or_path, **hub),
        )
    else:
        config = AutoConfig.from_pretrained(model_args.config_name, **hub)
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        model = AutoModel.from_config(config, trust_remote_code=model_args.trust_remote_code)
        if not (model_args.tokenizer_name and model_args.image_processor_name):
            raise ValueError("Training from --config_name needs --tokenizer_name and --image_processor_name.")
        processor = VisionTextDualEncoderProcessor(
            AutoImageProcessor.from_pretrained(model_args.image_processor_name, **hub),
            AutoTokenizer.from_pretrained(model_args.tokenizer_name, **hub),
        )
    if not all(hasattr(model, name) for name in ("get_image_features", "get_text_features", "logit_scale")):
        raise ValueError(
            f"{type(model).__name__} is not a dual encoder with get_image_features/get_text_features/logit_scale: "
            "pass a CLIP-family checkpoint, or --vision_model_name_or_path with --text_model_name_or_path."
        )
    return model, processor


def checkpoint_towers(model, training_args) -> None:
    """--activation_checkpointing (--gradient_checkpointing) for a VisionTextDualEncoderModel: the class does not
    declare support, so the Trainer would refuse the whole model, but its towers (ViT, BERT, ...) do. Enable it on
    each tower, with the same options, and leave the Trainer's switch off. A tower that cannot (MPNet, ...) stops
    the run here, before training, naming the flag and the tower."""
    if not training_args.activation_checkpointing or model.supports_gradient_checkpointing:
        return
    kwargs = dict(training_args.activation_checkpointing_kwargs or {})
    every_n_layers, offload = kwargs.pop("every_n_layers", 1), kwargs.pop("offload", False)
    for name, tower in (("vision", model.vision_model), ("text", model.text_model)):
        if not tower.supports_gradient_checkpointing:
            raise ValueError(f"--activation_checkpointing: the {name} tower ({type(tower).__name__}) cannot checkpoint its layers in "
                             "transformers; leave the flag out, or pick another tower.")
        tower.activation_checkpointing_enable(kwargs or None, every_n_layers=every_n_layers, offload=offload)
    training_args.activation_checkpointing = training_args.gradient_checkpointing = False
    logger.info("Activation checkpointing enabled on %s's vision and text towers", type(model).__name__)


def choose_attention(model, model_args, training_args) -> None:
    """--attn_implementation, or by default transformers' own choice (sdpa for CLIP, ViT and BERT) except in bf16 on
    CPU: there torch's fused attention backward (_scaled_dot_product_flash_attention_for_cpu_backward) took 15% of a
    ViT-B/32 training step, and the plain matmul-softmax attention makes the model step 1.24x faster (in fp32, sdpa
    is the faster, 1.1x). BENCHMARKS.md, "Fast paths". The choice is not saved with the model."""
    implementation = model_args.attn_implementation
    if implementation is None and training_args.bf16 and training_args.device.type == "cpu":
        implementation = "eager"
    if implementation is not None:
        model.set_attn_implementation(implementation)
        logger.info("Attention implementation: %s", implementation)


def set_up_fast_paths(model, model_args, training_args) -> None:
    """The model's forward as run_clip trains it: the attention kernel (`choose_attention`) and, unless
    --pooled_last_layer false, each tower's last layer at its pooled token (utils.towers). The benchmarks call
    this too, so that they time what the script runs."""
    choose_attention(model, model_args, training_args)
    if model_args.pooled_last_layer and (towers := pool_last_layers(model)):
        logger.info("Last layer computed at the pooled token only in: %s (--pooled_last_layer false to turn off)", ", ".join(towers))


def answer_input_embeddings(model) -> None:
    """accelerate's FSDP2 wrapping shards a model's input embeddings as a unit of their own and asks for them with
    get_input_embeddings(), which CLIPModel and VisionTextDualEncoderModel leave unanswered in transformers 5.23
    (NotImplementedError: `accelerate launch --config_file configs/accelerate_fsdp.yaml` stopped there on a GPU).
    Their input tokens are the text tower's, so that tower's token embedding answers."""
    try:
        model.get_input_embeddings()
    except NotImplementedError:
        embeddings = model.text_model.get_input_embeddings()
        model.get_input_embeddings = lambda: embeddings


# DeepSpeed releases that fail on a 0-dimensional parameter, which every dual encoder has (logit_scale): they
# broadcast each parameter viewed as bytes (`p.data.view(torch.uint8)`), which a 0-d tensor cannot be; ZeRO-2 fails
# as the engine starts, ZeRO-3 inside from_pretrained. 0.19.7 runs both (checked on an H100).
BROKEN_DEEPSPEED = ("0.19.8",)


def check_deepspeed(training_args) -> None:
    """Refuse a DeepSpeed release that cannot hold CLIP's temperature before any data or model is loaded."""
    if not training_args.deepspeed:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("deepspeed")
    except PackageNotFoundError:
        return  # the Trainer says DeepSpeed is missing
    if installed in BROKEN_DEEPSPEED:
        raise ValueError(
            f"--deepspeed: DeepSpeed {installed} fails on 0-dimensional parameters such as the model's logit_scale "
            "(its parameter broadcast views each one as bytes); install another release, e.g. pip install 'deepspeed==0.19.7'."
        )


# --- main ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    # 1. Arguments, logging, and the checkpoint to resume from.
    model_args, data_args, run_args, training_args = parse_args((ModelArguments, DataArguments, RunArguments, TrainingArguments), argv)
    resume_from = start_run(training_args, run_args, model_args, data_args)
    check_deepspeed(training_args)

    # 2. Data: every requested split, columns checked before anything heavy happens.
    splits = load_requested_splits(data_args, training_args, model_args.cache_dir, data_args.image_column)
    first = next(iter(splits.values()))
    image_column = data_args.image_column or guess_column(first, ("image", "image_path", "file_name", "filepath"), "image_column")
    caption_column = data_args.caption_column or guess_column(first, ("captions", "caption", "text"), "caption_column")
    for rows in splits.values():
        check_columns(rows, image_column=image_column, caption_column=caption_column)

    # 3. Model and processor; seeded first, as a dual encoder's projections (or a model from scratch) start at random.
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args)
    set_up_fast_paths(model, model_args, training_args)
    answer_input_embeddings(model)
    if model_args.freeze_vision_model:
        freeze(model.vision_model)
    if model_args.freeze_text_model:
        freeze(model.text_model)
    checkpoint_towers(model, training_args)
    trainable, total = count_parameters(model)
    logger.info("%s: %.1fM parameters, %.1fM trainable", type(model).__name__, total / 1e6, trainable / 1e6)
    check_disk_space(training_args.output_dir, model, training=training_args.do_train)

    # 4. Preprocessing: transforms from the model's own image processor, captions cut at the model's limit.
    image_spec = ImageTransformSpec.from_image_processor(processor.image_processor)
    text_config = getattr(model.config, "text_config", model.config)
    max_length = resolve_max_length(data_args.max_seq_length, processor.tokenizer, text_config)
    logger.info("Images: %s; captions truncated at %d tokens, padded to the longest in each batch", image_spec, max_length)
    # Unusable rows are left out and listed; evaluation images are decoded in full up front, so every metric
    # is computed on a known set of samples. A streamed training split is checked row by row as it is read.
    skip_log = SkippedSamples.for_run(training_args, resuming=resume_from is not None)
    datasets_ = {}
    for split, rows in splits.items():
        is_train = split == "train"
        transform = build_image_transform(image_spec, augment=is_train and data_args.augment, draft=is_train and data_args.jpeg_draft)
        if rows.streaming:  # duplicates are not counted: that would read the whole stream
            datasets_[split] = ImageTextStream(
                rows, image_column, caption_column, transform, **stream_options(training_args, data_args, run_args, skip_log)
            )
            logger.info("%s: streamed from %s (%d shards)", split, rows.origin, rows.rows.num_shards)
            continue
        log_duplicate_rows(rows, [image_column, caption_column], split, contrastive=True)
        datasets_[split] = ImageTextDataset(
            rows, image_column, caption_column, transform, sample_caption=is_train, seed=training_args.seed, skip_log=skip_log,
            split_name=split, decode_check=not is_train, max_bad_fraction=run_args.max_bad_samples_fraction,
        )
        logger.info("%s: %d images, %d captions", split, len(datasets_[split]), sum(map(len, datasets_[split].captions)))

    # 5. Trainer.
    callbacks = [ClampLogitScaleCallback(model_args.max_logit_scale), NonFiniteGuard()]
    if "train" in datasets_:
        callbacks.append(SetEpochCallback(datasets_["train"]))
    trainer = ClipTrainer(
        model=model,
        args=training_args,
        train_dataset=datasets_.get("train"),
        eval_dataset=datasets_.get("validation"),
        data_collator=ClipCollator(processor.tokenizer, max_length, image_spec),
        processing_class=processor,
        callbacks=callbacks,
        model_args=model_args,
        retrieval_chunk_size=data_args.retrieval_chunk_size,
    )

    # 6. Train, evaluate, predict; every split's metrics land in <split>_results.json and all_results.json, and
    # each scored split's first images with what they retrieve in a gallery.
    def after_split(split, split_metrics):
        if data_args.gallery_size and trainer.is_world_process_zero():
            path = os.path.join(training_args.output_dir, f"gallery_{split}.html")
            write_gallery(trainer, datasets_[split], split_metrics, path, data_args.gallery_size)

    metrics = train_evaluate_predict(trainer, datasets_, resume_from, skip_log, after_split)

    # 7. What the run leaves to look at: the curves, and a model card with the command and the metrics.
    write_run_report(trainer, "run_clip.py", argv, data_args, datasets_, metrics,
                     tasks="zero-shot-image-classification", tags=["contrastive-image-text", "clip"])
    return metrics


if __name__ == "__main__":
    main()
