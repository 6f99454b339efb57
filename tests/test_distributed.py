"""Several processes (real torchrun, gloo on CPU): global negatives, evaluation exactly once, GradCache.

The equality tests train one SGD step on 16 pairs: one process with batch 16 against two processes with batch 8
each. Both see the same global batch, so with negatives gathered across processes the loss and the updated
weights must agree to float rounding; with local negatives only they must not.
"""

import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import run_clip
from tests.helpers import read_json
from utils.demo import build_demo_clip, write_demo_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not installed")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = write_demo_dataset(str(root / "data"), num_train=16, num_validation=13, num_test=1, image_size=32, seed=2)
    build_demo_clip(str(root / "clip"))
    return {"data": data, "clip": str(root / "clip")}


def step_args(assets, output_dir, batch_size, *extra):
    return [
        "--model_name_or_path", assets["clip"], "--train_file", assets["data"]["train"], "--output_dir", str(output_dir),
        "--do_train", "--max_steps", "1", "--learning_rate", "0.1", "--optim", "sgd", "--per_device_train_batch_size", str(batch_size),
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1", "--dataloader_num_workers", "0",
        *extra,
    ]


def torchrun(args, nproc=2):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               os.path.join(REPO, "run_clip.py"), *args]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def logged_loss(output_dir):
    history = read_json(os.path.join(output_dir, "trainer_state.json"))["log_history"]
    return next(h["loss"] for h in history if "loss" in h)


def max_weight_difference(dir_a, dir_b):
    a, b = load_file(os.path.join(dir_a, "model.safetensors")), load_file(os.path.join(dir_b, "model.safetensors"))
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def one_process_big_batch(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    run_clip.main(step_args(assets, out, 16))
    return out


def test_two_processes_with_global_negatives_equal_one_process_with_the_global_batch(assets, one_process_big_batch, tmp_path):
    update = max_weight_difference(one_process_big_batch, assets["clip"])
    torchrun(step_args(assets, tmp_path / "global", 8))
    assert logged_loss(tmp_path / "global") == pytest.approx(logged_loss(one_process_big_batch), rel=1e-5)
    assert max_weight_difference(one_process_big_batch, tmp_path / "global") < 1e-4 * update

    torchrun(step_args(assets, tmp_path / "local", 8, "--gather_negatives", "false"))
    assert logged_loss(tmp_path / "local") < logged_loss(one_process_big_batch) - 0.1  # 8 negatives, not 16
    assert max_weight_difference(one_process_big_batch, tmp_path / "local") > 0.05 * update


def test_cached_features_equal_one_big_batch(assets, one_process_big_batch, tmp_path):
    """GradCache: the batch of 16 encoded in chunks of 4 (and 2 processes x 8 in uneven chunks of 3) gives the
    gradient of the whole batch."""
    update = max_weight_difference(one_process_big_batch, assets["clip"])
    run_clip.main(step_args(assets, tmp_path / "chunked", 16, "--contrastive_chunk_size", "4"))
    assert logged_loss(tmp_path / "chunked") == pytest.approx(logged_loss(one_process_big_batch), rel=1e-5)
    assert max_weight_difference(one_process_big_batch, tmp_path / "chunked") < 1e-4 * update
    torchrun(step_args(assets, tmp_path / "chunked_ddp", 8, "--contrastive_chunk_size", "3"))
    assert max_weight_difference(one_process_big_batch, tmp_path / "chunked_ddp") < 1e-4 * update


def test_gradient_accumulation_adds_no_negatives(assets, one_process_big_batch, tmp_path):
    """Documented behaviour: 4 micro-batches of 4 are 4 contrastive problems of 4, not one of 16."""
    run_clip.main(step_args(assets, tmp_path / "accumulated", 4, "--gradient_accumulation_steps", "4"))
    assert logged_loss(tmp_path / "accumulated") < logged_loss(one_process_big_batch) - 0.3


def test_evaluation_under_two_processes_scores_every_sample_once(assets, tmp_path):
    """13 images over 2 processes with batches of 4: the padded sampler repeats samples; they must not count."""
    args = ["--model_name_or_path", assets["clip"], "--validation_file", assets["data"]["validation"], "--do_eval",
            "--per_device_eval_batch_size", "4", "--use_cpu", "--report_to", "none", "--dataloader_num_workers", "0"]
    single = run_clip.main([*args, "--output_dir", str(tmp_path / "single")])
    torchrun([*args, "--output_dir", str(tmp_path / "double")])
    double = read_json(tmp_path / "double" / "eval_results.json")
    compared = [k for k in single if k.endswith(("_r1", "_r5", "_r10", "_rank", "_loss"))]
    assert len(compared) == 11
    for key in compared:
        assert double[key] == pytest.approx(single[key], abs=1e-6), key


def test_accelerate_launch_runs_the_script_unchanged(assets, one_process_big_batch, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # accelerate's --cpu launches one process (or mpirun); its multi-process launcher with the script's --use_cpu runs gloo.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
               os.path.join(REPO, "run_clip.py"), *step_args(assets, tmp_path, 8)]
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert logged_loss(tmp_path) == pytest.approx(logged_loss(one_process_big_batch), rel=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (.ci/run installs it)")
@pytest.mark.parametrize("stage,nproc", [(2, 2), (3, 1)])
def test_deepspeed_zero_takes_the_step_of_one_process(assets, one_process_big_batch, tmp_path, stage, nproc):
    """ZeRO-2 on 2 processes x 8 and ZeRO-3 on 1 x 16 (DeepSpeed's CPU accelerator) take the step of 1 plain
    process x 16: global negatives, and under ZeRO-3 the temperature, partitioned outside the forward, gathered for
    the loss. (ZeRO-3 on 2 CPU processes stops before training: with --use_cpu, accelerate leaves DeepSpeed's own
    communication uninitialised, so zero.Init counts a world of 1 and rejects the batch size; on GPUs accelerate
    initialises it.) The saved model loads as a plain CLIPModel."""
    from transformers import CLIPModel

    update = max_weight_difference(one_process_big_batch, assets["clip"])
    config = os.path.join(REPO, "configs", f"deepspeed_zero{stage}.json")
    torchrun(step_args(assets, tmp_path, 16 // nproc, "--deepspeed", config), nproc=nproc)
    assert logged_loss(tmp_path) == pytest.approx(logged_loss(one_process_big_batch), rel=1e-5)
    # Compared as loaded: ZeRO-3 saves the state dict under the modules' own names (text_model.text_model.*),
    # which from_pretrained maps back.
    plain, zero = CLIPModel.from_pretrained(one_process_big_batch).state_dict(), CLIPModel.from_pretrained(tmp_path).state_dict()
    assert plain.keys() == zero.keys()
    assert max((plain[k] - zero[k]).abs().max().item() for k in plain) < 1e-4 * update
    assert zero["logit_scale"].shape == ()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed (.ci/run installs it)")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_keeps_the_temperature_clamped(assets, tmp_path, stage):
    """DeepSpeed steps an fp32 master copy of every parameter: clamping only the model's copy would be undone at
    the next step. Started at exp(6.0) = 403, the temperature stays at or under the bound of 100 for 3 steps, in
    the logs and in the saved model."""
    config = os.path.join(REPO, "configs", f"deepspeed_zero{stage}.json")
    clip = assets["clip"]
    args = step_args(assets, tmp_path, 16, "--deepspeed", config, "--config_name", clip, "--config_overrides", "logit_scale_init_value=6.0",
                     "--tokenizer_name", clip, "--image_processor_name", clip)
    args[args.index("--model_name_or_path"):args.index("--model_name_or_path") + 2] = []
    args[args.index("--max_steps") + 1] = "3"
    args[args.index("--save_strategy") + 1] = "steps"
    torchrun([*args, "--save_steps", "3"], nproc=1)
    history = read_json(os.path.join(tmp_path, "trainer_state.json"))["log_history"]
    scales = [h["logit_scale"] for h in history if "logit_scale" in h]
    # Clamped to 100 after the first step, then the loss pulls it down a little; unclamped it would be near 403.
    assert len(scales) == 3 and scales[0] == pytest.approx(100.0, rel=1e-5), scales
    assert all(90.0 < scale <= 100.0 * (1 + 1e-5) for scale in scales), scales
    saved = load_file(os.path.join(tmp_path, "model.safetensors"))["logit_scale"]
    assert saved.exp().item() == pytest.approx(scales[-1], rel=1e-3)
    # The master copy in the DeepSpeed checkpoint, what a resumed run starts from, is clamped too.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    master = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoint-3"))["logit_scale"]
    assert master.exp().item() == pytest.approx(scales[-1], rel=1e-3)
