"""`citrus-v sft`: the upstream stage commands, DDP on CPU, stage 4 freezing, kill-and-resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from citrus_v.data.synth import TARGETS, make_phantom
from citrus_v.train.arguments import SftArguments, adapt_to_machine
from citrus_v.train.stages import FreezePlan, StageError, component_of

CLI = [sys.executable, "-m", "citrus_v.cli"]


def _write_dataset(folder: Path, rows: int, seed: int = 0) -> Path:
    """Phantom PNGs with segmentation and yes/no rows, paths relative to the JSONL file."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    with (folder / "train.jsonl").open("w") as handle:
        for i in range(rows):
            phantom = make_phantom(rng)
            Image.fromarray(phantom.image).save(folder / f"img/{i}.png")
            target = TARGETS[i % 2]
            Image.fromarray(phantom.masks[target].astype(np.uint8) * 255).save(folder / f"img/{i}_mask.png")
            if i % 3 == 2:
                messages = [
                    {"role": "user", "content": "<image>Is there a lesion?"},
                    {"role": "assistant", "content": "yes"},
                ]
                row = {"messages": messages, "images": [f"img/{i}.png"]}
            else:
                messages = [
                    {"role": "user", "content": f"<image>Please segment the {target}."},
                    {"role": "assistant", "content": "Sure, it is [SEG]."},
                ]
                row = {"messages": messages, "images": [f"img/{i}.png"], "masks": [f"img/{i}_mask.png"]}
            handle.write(json.dumps(row) + "\n")
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data"), 16)


def _sft(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    full_env.pop("NPROC_PER_NODE", None) if env is None or "NPROC_PER_NODE" not in env else None
    return subprocess.run([*CLI, "sft", *args], capture_output=True, text=True, timeout=timeout, env=full_env)


UPSTREAM_STAGE3 = (
    "--template citrus_v --train_type full --torch_dtype bfloat16 --attn_impl flash_attn --max_length 12288 "
    "--num_train_epochs 5 --learning_rate 1e-5 --warmup_steps 100 --weight_decay 0.1 --adam_beta1 0.9 "
    "--adam_beta2 0.999 --max_grad_norm 1.0 --per_device_train_batch_size 1 --gradient_accumulation_steps 8 "
    "--gradient_checkpointing true --ddp_find_unused_parameters true --freeze_vit false --freeze_aligner false "
    "--freeze_llm false --save_strategy steps --save_steps 500 --save_total_limit 2 --logging_steps 5 "
    "--dataloader_num_workers 8 --dataset_num_proc 8 --save_only_model true"
).split()


def test_upstream_stage3_command_on_two_cpu_processes(tiny_dir, dataset, tmp_path):
    out = tmp_path / "stage3"
    result = _sft(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        *UPSTREAM_STAGE3,
        "--stage",
        "3",
        "--max_steps",
        "20",
        "--output_dir",
        str(out),
        env={"NPROC_PER_NODE": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # flags this CPU cannot honour are reported in one line each, not crashed on
    assert "--attn_impl flash_attn: flash-attn or a GPU is missing here; using sdpa" in result.stderr
    assert "--torch_dtype bfloat16: no GPU here, training in float32" in result.stderr
    assert "--dataloader_num_workers 8:" in result.stderr
    assert "HookGrad factor: 0.001" in result.stderr
    digests = {p.read_text() for p in (out / "ddp_digests").glob("rank*.txt")}
    assert len(list((out / "ddp_digests").glob("rank*.txt"))) == 2 and len(digests) == 1, "ranks diverged"
    from citrus_v import CitrusV

    CitrusV.from_pretrained(out)  # loadable
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm_loss" in r]
    # the tiny preset also trains SAM's IoU head and the [SEG] point head (weights 1.0), and SAM 2's presence loss
    # its object score when turned on; no row here carries a lesion or text map
    parts = ("lm_loss", "mask_bce", "mask_bce", "mask_dice", "mask_iou", "lesion_map", "text_map", "point",
             "presence")
    assert steps and all(abs(r["loss"] - sum(r.get(k, 0.0) for k in parts)) < 1e-2 for r in steps)
    assert (out / "loss_curves.png").stat().st_size > 0
    assert list((out / "runs").rglob("events.out.tfevents*")), "TensorBoard events missing"


def test_stage4_changes_only_projector_and_sam(tiny_dir, dataset, tmp_path):
    out = tmp_path / "stage4"
    result = _sft(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--template",
        "citrus_v",
        "--stage",
        "4",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--output_dir",
        str(out),
        "--save_strategy",
        "no",
        "--report_to",
        "none",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    before = load_file(tiny_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {component_of(n) for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= {"seg projector", "sam image encoder", "sam prompt encoder", "sam mask decoder"}
    assert "seg projector" in changed and "sam mask decoder" in changed


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_killed_and_resumed_run_ends_with_the_same_weights(tiny_dir, dataset, tmp_path):
    common = [
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--stage",
        "3",
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-3",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--seed",
        "7",
    ]
    straight = tmp_path / "straight"
    result = _sft(*common, "--output_dir", str(straight))
    assert result.returncode == 0, result.stderr[-3000:]

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [*CLI, "sft", *common, "--output_dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint-4").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (killed / "checkpoint-2").is_dir() or (killed / "checkpoint-4").is_dir()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    resumed = _sft(*common, "--output_dir", str(killed), "--resume_from_checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    a, b = _weights(straight), _weights(killed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_bad_inputs_give_clear_errors(tiny_dir, dataset, tmp_path):
    result = _sft(
        "--model", str(tiny_dir), "--dataset", str(tmp_path / "none.jsonl"), "--output_dir", str(tmp_path / "a")
    )
    assert result.returncode == 1 and "none.jsonl: no such file or folder" in result.stderr
    result = _sft(
        "--model", str(tiny_dir), "--dataset", str(dataset), "--template", "llava", "--output_dir", str(tmp_path / "b")
    )
    assert result.returncode == 1 and "--template 'llava' is not available" in result.stderr
    result = _sft(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--max_length",
        "32",
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "c"),
        "--report_to",
        "none",
    )
    assert result.returncode == 1 and "no usable rows" in result.stderr and "too_long" in result.stderr
    # an existing run is not written over
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    result = _sft("--model", str(tiny_dir), "--dataset", str(dataset), "--output_dir", str(busy))
    assert result.returncode == 1 and "already holds a run" in result.stderr
    assert (busy / "keep.txt").read_text() == "x"


def test_non_finite_loss_stops_with_step_and_sample_ids(tiny_dir, dataset, tmp_path):
    result = _sft(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--max_steps",
        "6",
        "--learning_rate",
        "1e30",
        "--max_grad_norm",
        "0",
        "--per_device_train_batch_size",
        "2",
        "--output_dir",
        str(tmp_path / "nan"),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "at step" in result.stderr and "samples of this batch:" in result.stderr and "train.jsonl:" in result.stderr


def test_stage_presets_and_flag_overrides():
    assert FreezePlan(stage=1).trainable_components() == {"vision encoder", "aligner"}
    assert "llm" not in FreezePlan(stage=3, freeze_llm=True).trainable_components()
    assert "llm" in FreezePlan(stage=4, freeze_llm=False).trainable_components()
    assert FreezePlan(stage=3).hook_grad_factor() == 0.001 and FreezePlan(stage=4).hook_grad_factor() == 1.0
    with pytest.raises(StageError, match="no seg modules"):
        FreezePlan(stage=4).apply(torch.nn.Module())


def test_point_prompt_probability_flag_sets_the_run_and_is_checked(tiny_dir):
    from citrus_v.train.sft import load_model

    model, _ = load_model(SftArguments(model=str(tiny_dir), dataset=["d"], point_prompt_probability=1.0))
    assert model.config.point_prompt_probability == 1.0
    kept, _ = load_model(SftArguments(model=str(tiny_dir), dataset=["d"]))
    assert kept.config.point_prompt_probability == 0.5  # the tiny preset's own share
    with pytest.raises(ValueError, match="--point_prompt_probability must be within 0 and 1, got 1.5"):
        load_model(SftArguments(model=str(tiny_dir), dataset=["d"], point_prompt_probability=1.5))


def test_machine_fallbacks_are_one_line_each(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    args = SftArguments(
        model="m",
        dataset=["d"],
        attn_impl="flash_attn",
        torch_dtype="bfloat16",
        dataloader_num_workers=64,
        deepspeed="zero3",
    )
    notices = adapt_to_machine(args)
    assert len(notices) == 5 and all("\n" not in n for n in notices)
    assert args.attn_impl == "sdpa" and args.torch_dtype == "float32" and args.deepspeed is None
    assert args.dataloader_num_workers == os.cpu_count()


def test_shipped_deepspeed_configs_fill_in_from_the_flags():
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    from citrus_v.train.sft import SftError, deepspeed_config

    for name, stage in (("zero2", 2), ("zero3", 3)):
        config = HfTrainerDeepSpeedConfig(deepspeed_config(name))
        args = TrainingArguments(
            output_dir="unused", per_device_train_batch_size=1, gradient_accumulation_steps=8, use_cpu=True
        )
        config.trainer_config_process(args)
        assert config.config["zero_optimization"]["stage"] == stage
        assert config.config["gradient_accumulation_steps"] == 8
        assert config.config["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(SftError, match="neither zero2/zero3 nor an existing JSON file"):
        deepspeed_config("zero9")


def test_lora_trains_the_llm_adapters_and_exports_a_plain_model(tiny_dir, dataset, tmp_path):
    out = tmp_path / "lora"
    result = _sft(
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--train_type",
        "lora",
        "--stage",
        "3",
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--learning_rate",
        "1e-2",
        "--output_dir",
        str(out),
        "--report_to",
        "none",
        "--save_strategy",
        "no",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "adapter_config.json").is_file()
    merged = tmp_path / "merged"
    export = subprocess.run(
        [*CLI, "export", "--merge_lora", str(out), "--out", str(merged)], capture_output=True, text=True, timeout=300
    )
    assert export.returncode == 0, export.stderr[-3000:]
    from citrus_v import CitrusV

    model = CitrusV.from_pretrained(merged)
    base = load_file(tiny_dir / "model.safetensors")
    name = "mllm.model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], base[name])  # the adapters were merged in
    vision = "mllm.model.visual.blocks.0.attn.qkv.weight"
    assert torch.equal(model.state_dict()[vision], base[vision])  # not a LoRA target, not trained


@pytest.mark.parametrize("mode", ["--packing", "--streaming"])
def test_packing_and_streaming_runs(tiny_dir, dataset, tmp_path, mode):
    out = tmp_path / mode.strip("-")
    common = [
        "--model",
        str(tiny_dir),
        "--dataset",
        str(dataset),
        "--stage",
        "3",
        "--max_steps",
        "4",
        "--per_device_train_batch_size",
        "3",
        "--learning_rate",
        "1e-3",
        "--report_to",
        "none",
        "--save_steps",
        "2",
        "--logging_steps",
        "1",
        "--max_length",
        "1024",
        mode,
        "true",
    ]
    result = _sft(*common, "--output_dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped 0 rows while training" in result.stderr
    records = [json.loads(line) for line in (out / "logging.jsonl").read_text().splitlines()]
    assert all(r["samples_per_second"] > 0 for r in records if "samples_per_second" in r)
    if mode == "--streaming":
        state = json.loads((out / "checkpoint-4" / "stream_state_rank0.json").read_text())
        assert sum(state["consumed"].values()) == 12  # 4 steps x 3 rows, each counted once
    # resuming from the middle ends where the straight run ended
    resumed = tmp_path / f"{out.name}-resumed"
    (resumed).mkdir()
    import shutil

    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    result = _sft(*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _weights(out), _weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_checkpoint_is_staged_and_rotated_without_touching_the_arguments(tiny_dir, dataset, tmp_path, monkeypatch):
    """Each checkpoint is written into a staging folder and renamed into place; the run folder keeps the last
    ``save_total_limit``; the trainer's ``output_dir`` and ``save_total_limit`` read the same throughout."""
    from transformers import Trainer

    from citrus_v.train.checkpoints import STAGING_PREFIX
    from citrus_v.train.sft import run_sft

    out = tmp_path / "run"
    seen = []
    save_model = Trainer.save_model

    def recording(self, output_dir=None, _internal_call=False):
        seen.append((output_dir, self.args.output_dir, self.args.save_total_limit))
        return save_model(self, output_dir, _internal_call)

    monkeypatch.setattr(Trainer, "save_model", recording)
    args = SftArguments(
        model=str(tiny_dir), dataset=[str(dataset)], output_dir=str(out), stage=3, max_steps=3,
        per_device_train_batch_size=2, save_strategy="steps", save_steps=1, save_total_limit=2, logging_steps=1,
        max_length=1024, report_to=["none"], dataloader_num_workers=0,
    )
    run_sft(args)
    checkpoints = [path for path, *_ in seen if path is not None and "checkpoint-" in path]
    assert [Path(p).relative_to(out).parts for p in checkpoints] == [
        (f"{STAGING_PREFIX}{step}", f"checkpoint-{step}") for step in (1, 2, 3)
    ]
    assert {(output_dir, limit) for _, output_dir, limit in seen} == {(str(out), 2)}
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert not list(out.glob(f"{STAGING_PREFIX}*"))
    assert json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["global_step"] == 3
