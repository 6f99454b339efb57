"""Asking a fine-tuned ViLT a question about an image.

transformers 5 has no `pipeline("visual-question-answering")` any more, and `image-text-to-text` does not take
ViLT, so this is the short way in:

    from utils.vqa_inference import answer_question, load_vqa_model

    answer_question("out", "photo.jpg", "what color is the bus?")   # [{"answer": "red", "score": 0.93}, ...]

    model, processor = load_vqa_model("out")                        # load once for many questions
    answer_question(model, image, "how many people are there?", processor=processor, top_k=1)

The image goes through the folder's own `ViltProcessor` (the preprocessing the script's collator reproduces),
and the answers come from the model's `id2label`. Scores are the sigmoid of the logits: the model is trained
with a binary cross-entropy per answer against soft scores, so each is its estimate of that answer's VQA
accuracy, and they need not sum to 1.
"""

from __future__ import annotations

import os

import torch

from .images import load_image


def load_vqa_model(model_dir: str, device: str | torch.device | None = None):
    """(ViltForQuestionAnswering in eval mode, ViltProcessor) from a folder the script wrote, or a Hub id."""
    from transformers import ViltForQuestionAnswering, ViltProcessor

    model = ViltForQuestionAnswering.from_pretrained(model_dir).eval()
    if device is not None:
        model.to(device)
    return model, ViltProcessor.from_pretrained(model_dir)


@torch.no_grad()
def answer_question(model, image, question: str, top_k: int = 5, processor=None) -> list[dict]:
    """The `top_k` answers to `question` about `image`, best first, as [{"answer": str, "score": float}].

    `model` is a folder (or Hub id), loaded on each call, or a loaded ViltForQuestionAnswering with its
    `processor`. `image` is a path, a `PIL.Image` or encoded bytes (anything `utils.images.load_image` takes).
    """
    if isinstance(model, (str, os.PathLike)):
        model, processor = load_vqa_model(os.fspath(model))
    elif processor is None:
        raise ValueError("answer_question got a loaded model but no processor: pass processor=, or the model's folder.")
    inputs = processor(
        images=load_image(image),
        text=question,
        return_tensors="pt",
        truncation=True,
        max_length=model.config.max_position_embeddings,
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    logits = model(**inputs).logits[0].float()  # (num_labels,)
    scores, ids = logits.sigmoid().topk(min(top_k, logits.numel()))
    return [{"answer": model.config.id2label[int(i)], "score": float(s)} for i, s in zip(ids, scores)]
