"""`citrus-v sft` runs upstream's command lines as upstream users mean them: the stage follows from the freeze
flags, unset flags take ms-swift's defaults, ms-swift's freeze lists work, `--dataset_num_proc` checks rows in
several processes with one process's result, and ms-swift's multi-node variables launch torchrun."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from citrus_v.train.arguments import SftArguments, adapt_to_machine, add_arguments, parse_namespace
from citrus_v.train.launch import free_port, topology
from citrus_v.train.resolve import resolve_arguments
from citrus_v.train.stages import StageError, component_of
from tests.test_train import _write_dataset

CLI = [sys.executable, "-m", "citrus_v.cli"]

# Upstream Citrus-V's README (jdh-algo/Citrus-V, "Training stage 3" and "Training stage 4"), as written there.
UPSTREAM_STAGE3 = r"""PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True \
NPROC_PER_NODE=8 \
MIN_PIXELS=200704 \
MAX_PIXELS=1003520 \
CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7 \
swift sft \
    --model {pretrained ckpt address} \
    --dataset {your dataset address} \
    --template citrus_v \
    --train_type full \
    --torch_dtype bfloat16 \
    --attn_impl flash_attn \
    --max_length 12288 \
    --num_train_epochs 5 \
    --learning_rate 1e-5 \
    --warmup_ratio 0 \
    --warmup_steps 100 \
    --adam_beta1 0.9 \
    --adam_beta2 0.999 \
    --weight_decay 0.1 \
    --max_grad_norm 1.0 \
    --per_device_train_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --dataloader_num_workers 64 \
    --dataset_num_proc 1 \
    --freeze_vit false \
    --freeze_aligner false \
    --freeze_llm false \
    --save_strategy epoch \
    --save_total_limit 8 \
    --logging_steps 5 \
    --output_dir {your model save path}\
    --save_only_model \
    --gradient_checkpointing true \
    --ddp_find_unused_parameters true
"""
UPSTREAM_STAGE4 = (
    UPSTREAM_STAGE3.replace("--freeze_vit false", "--freeze_vit true")
    .replace("--freeze_aligner false", "--freeze_aligner true")
    .replace(
        "--freeze_llm false \\\n",
        "--freeze_llm true \\\n    --freeze_custom_parameters_json {/path/to/projects/vlm_7B_params.json} \\\n",
    )
)
# left out here: 8 processes (the multi-process launch has its own tests) and upstream's 8B pixel bounds
# (MIN_PIXELS/MAX_PIXELS set the processor's image size; the tiny model keeps its own)
DROPPED_ENV = ("NPROC_PER_NODE", "MIN_PIXELS", "MAX_PIXELS")
SEG_AND_SAM = {"seg projector", "sam image encoder", "sam prompt encoder", "sam mask decoder"}


def upstream_command(text: str, places: dict[str, str]) -> tuple[list[str], dict[str, str]]:
    """An upstream command line with ``swift`` -> ``citrus-v`` and its placeholders filled: (argv, env)."""
    for placeholder, value in places.items():
        text = text.replace("{" + placeholder + "}", shlex.quote(value) + " ")
    words = shlex.split(text.replace("\\\n", " "))
    env = {}
    while "=" in words[0]:
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    assert words[:2] == ["swift", "sft"], words[:2]
    return [*CLI, *words[1:]], env


def _run(argv: list[str], env: dict[str, str], timeout: int = 420) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k not in (*DROPPED_ENV, "NNODES", "NODE_RANK")}
    full = {**base, "HF_HUB_OFFLINE": "1", **{k: v for k, v in env.items() if k not in DROPPED_ENV}}
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=full)


def parameter_counts(stderr: str) -> dict[str, tuple[int, int]]:
    """The printed table: component -> (trainable, frozen)."""
    rows = re.findall(r"^([a-z][a-z ]+?)\s+([\d,]+)\s+([\d,]+)$", stderr, re.M)
    return {name: (int(t.replace(",", "")), int(f.replace(",", ""))) for name, t, f in rows}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("upstream-data"), 6)


def test_upstream_stage3_command_line_is_stage_3_with_hookgrad(tiny_dir, dataset, tmp_path):
    out = tmp_path / "stage3"
    places = {"pretrained ckpt address": str(tiny_dir), "your dataset address": str(dataset),
              "your model save path": str(out)}  # fmt: skip
    argv, env = upstream_command(UPSTREAM_STAGE3, places)
    result = _run([*argv, "--max_steps", "1"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "stage 3, inferred — --freeze_vit false, --freeze_aligner false, --freeze_llm false: all false; " \
        "trains everything but sam memory; HookGrad 0.001" in err
    assert "HookGrad factor: 0.001" in err
    counts = parameter_counts(err)
    assert counts["total"][1] == 0 and counts["vision encoder"][0] > 0
    # every setting, in one block, with what was given and what was filled in
    block = err[err.index("settings:"):err.index("component ")]
    for setting in ("stage=3 [inferred]", "adam_beta2=0.999", "warmup_steps=100", "gradient_accumulation_steps=8",
                    "gradient_checkpointing=true", "save_only_model=true", "freeze_llm=false",
                    "hook_grad_factor=0.001 [stage 3]", "max_length=12288", "dataset_num_proc=1"):  # fmt: skip
        assert setting in block, setting
    if not torch.cuda.is_available():
        assert "torch_dtype=float32 [bfloat16, changed for this machine]" in block
        assert "attn_impl=sdpa [flash_attn, changed for this machine]" in block
    assert json.loads((out / "sft_args.json").read_text())["stage"] == 3


def test_upstream_stage4_command_line_is_stage_4(tiny_dir, dataset, tmp_path):
    """Upstream's stage-4 line, with its list of MLLM names to freeze (here the tiny model's, as upstream's
    ``projects/vlm_7B_params.json`` lists the 8B's): the seg projector and SAM 2 train, nothing else."""
    from safetensors import safe_open

    with safe_open(tiny_dir / "model.safetensors", "pt") as weights:
        names = [n for n in weights.keys() if component_of(n) in ("vision encoder", "aligner", "llm")]
    names_file = tmp_path / "vlm_params.json"
    names_file.write_text(json.dumps(names))
    out = tmp_path / "stage4"
    places = {"pretrained ckpt address": str(tiny_dir), "your dataset address": str(dataset),
              "your model save path": str(out), "/path/to/projects/vlm_7B_params.json": str(names_file)}  # fmt: skip
    argv, env = upstream_command(UPSTREAM_STAGE4, places)
    assert "--freeze_custom_parameters_json" in argv
    result = _run([*argv, "--max_steps", "1"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    err = result.stderr
    assert "stage 4, inferred — --freeze_vit true, --freeze_aligner true, --freeze_llm true: all true; trains " \
        "seg projector, sam image encoder, sam prompt encoder, sam mask decoder, sam memory; no HookGrad" in err
    assert "HookGrad factor: 1.0" in err
    counts = parameter_counts(err)
    assert {c for c, (t, _) in counts.items() if t and c != "total"} == SEG_AND_SAM
    assert all(counts[c][1] == 0 for c in SEG_AND_SAM)
    assert f"freeze_custom_parameters_json={names_file}" in err


def _parsed(*argv: str) -> SftArguments:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parse_namespace(parser.parse_args(list(argv)))


def _folder_with_config(root: Path, **config: object) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "citrus_v", **config}))
    return root


def test_unset_flags_take_ms_swift_defaults(tmp_path):
    model = _folder_with_config(tmp_path / "bf16", dtype="bfloat16")
    args = _parsed("--model", str(model), "--dataset", "rows.jsonl")
    assert args.adam_beta2 == 0.95 and args.gradient_checkpointing is True and args.num_train_epochs == 3.0
    assert (args.freeze_vit, args.freeze_aligner, args.freeze_llm) == (None, None, None)
    resolution = resolve_arguments(args)
    assert (args.freeze_vit, args.freeze_aligner, args.freeze_llm, args.stage) == (True, True, False, None)
    assert resolution.sources["freeze_vit"] == "ms-swift default"
    assert resolution.stage_line.startswith("no stage preset — ")
    assert "trains llm, seg projector, sam image encoder, sam prompt encoder, sam mask decoder" in resolution.stage_line
    assert args.torch_dtype == "bfloat16" and resolution.sources["torch_dtype"] == "config.json"
    assert args.learning_rate == 1e-5
    notices = adapt_to_machine(args)
    if not torch.cuda.is_available():  # bfloat16 from the checkpoint falls back on a CPU, in one line
        assert args.torch_dtype == "float32" and len(notices) == 1 and "\n" not in notices[0]
    # the older key, and none at all
    older = _parsed("--model", str(_folder_with_config(tmp_path / "fp16", torch_dtype="float16")), "--dataset", "d")
    resolve_arguments(older)
    assert older.torch_dtype == "float16"
    bare = _parsed("--model", str(_folder_with_config(tmp_path / "bare")), "--dataset", "d", "--train_type", "lora")
    resolve_arguments(bare)
    if torch.cuda.is_available():
        assert bare.torch_dtype == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    else:
        assert bare.torch_dtype == "float32"
    assert bare.learning_rate == 1e-4  # ms-swift's for LoRA


@pytest.mark.parametrize(
    ("flags", "stage", "frozen"),
    [
        # SAM 2's memory modules train in stage 4 alone
        (("--freeze_vit", "false", "--freeze_aligner", "false", "--freeze_llm", "false"), 3, {"sam memory"}),
        (("--freeze_llm", "true"), 4, {"vision encoder", "aligner", "llm"}),  # vit and aligner by default
        (("--freeze_vit", "false"), None, {"aligner", "sam memory"}),
        (("--stage", "3", "--freeze_vit", "true"), 3, {"vision encoder", "sam memory"}),  # a given stage: flags on top
        (("--stage", "4",), 4, {"vision encoder", "aligner", "llm"}),  # the stage sets the unset flags
    ],
)
def test_the_stage_follows_from_the_freeze_flags(tmp_path, flags, stage, frozen):
    args = _parsed("--model", str(_folder_with_config(tmp_path)), "--dataset", "d", *flags)
    resolve_arguments(args)
    assert args.stage == stage
    from citrus_v.train.sft import freeze_plan
    from citrus_v.train.stages import COMPONENTS

    assert set(COMPONENTS) - freeze_plan(args).trainable_components() == frozen
    assert args.hook_grad_factor == {3: 0.001, 4: 1.0, None: None}[stage]


@pytest.fixture
def fresh_model(tiny_dir):
    from citrus_v import CitrusV

    return CitrusV.from_pretrained(tiny_dir)


def _trainable(model, *flags: str, tmp_path: Path) -> dict[str, bool]:
    from citrus_v.train.sft import freeze_plan

    args = _parsed("--model", str(_folder_with_config(tmp_path / "cfg")), "--dataset", "d", *flags)
    resolve_arguments(args)
    freeze_plan(args).apply(model)
    return {name: param.requires_grad for name, param in model.named_parameters()}


def test_ms_swift_freeze_lists_regexes_and_ratio(fresh_model, tmp_path):
    names = [n for n, _ in fresh_model.named_parameters()]
    every = ("--stage", "3")
    # prefixes, as a list
    got = _trainable(fresh_model, *every, "--freeze_parameters", "mllm.model.visual", "mllm.lm_head", tmp_path=tmp_path)
    assert all(got[n] == (not n.startswith(("mllm.model.visual", "mllm.lm_head"))) for n in names)
    # a regex
    got = _trainable(fresh_model, *every, "--freeze_parameters_regex", r"\.bias$", tmp_path=tmp_path)
    assert all(got[n] == (not n.endswith(".bias")) for n in names)
    # a share of all values, first parameters first, as ms-swift counts it
    sizes = [p.numel() for _, p in fresh_model.named_parameters()]
    got = _trainable(fresh_model, *every, "--freeze_parameters_ratio", "0.5", tmp_path=tmp_path)
    frozen = [n for n in names if not got[n]]
    assert frozen == names[: len(frozen)]
    assert sum(sizes[: len(frozen)]) <= sum(sizes) * 0.5 < sum(sizes[: len(frozen) + 1])
    # the trainable lists come last and win: everything frozen but the seg projector, then the merger back
    got = _trainable(
        fresh_model, "--freeze_parameters_ratio", "1", "--trainable_parameters_regex", "^seg_projector",
        "--trainable_parameters", "mllm.model.visual.merger", tmp_path=tmp_path,
    )
    assert {component_of(n) for n in names if got[n]} == {"seg projector", "aligner"}
    assert all(got[n] for n in names if n.startswith("mllm.model.visual.merger"))


def test_freeze_flags_that_match_nothing_say_so(fresh_model, tmp_path):
    with pytest.raises(StageError, match=r"--freeze_parameters seg_\.\*: no parameter name starts with it .* "
                                         r"for a regex use --freeze_parameters_regex"):  # fmt: skip
        _trainable(fresh_model, "--freeze_parameters", "seg_.*", tmp_path=tmp_path)
    with pytest.raises(StageError, match=r"--trainable_parameters_regex '\(' is not a valid regular expression"):
        _trainable(fresh_model, "--trainable_parameters_regex", "(", tmp_path=tmp_path)
    with pytest.raises(StageError, match="--freeze_parameters_regex 'nothing_here' matches no parameter name"):
        _trainable(fresh_model, "--freeze_parameters_regex", "nothing_here", tmp_path=tmp_path)
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["mllm.lm_head.weight", "mllm.model.language_model.layers.99.mlp.up_proj.weight"]))
    with pytest.raises(StageError, match=r"1 name\(s\) are not parameters of this model: .*layers\.99"):
        _trainable(fresh_model, "--freeze_custom_parameters_json", str(names), tmp_path=tmp_path)
    names.write_text('{"mllm.lm_head.weight": true}')
    with pytest.raises(StageError, match="expected a JSON list of parameter names"):
        _trainable(fresh_model, "--freeze_custom_parameters_json", str(names), tmp_path=tmp_path)


def _with_bad_rows(folder: Path) -> Path:
    """The phantom rows with bad ones of each kind between them: a missing image (line 5, found by a worker),
    invalid JSON, a schema error, a row longer than max_length."""
    path = _write_dataset(folder, 12)
    good = path.read_text().splitlines()
    long_row = json.loads(good[2])
    long_row["messages"][1]["content"] = "yes " * 3000
    missing = json.loads(good[2])
    missing["images"] = ["img/none.png"]
    lines = [*good[:4], json.dumps(missing), *good[4:7], "{not json", json.dumps({"messages": []}), *good[7:9],
             json.dumps(long_row), *good[9:]]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return path


def test_dataset_num_proc_checks_rows_in_processes_with_one_process_result(tiny_dir, tmp_path):
    from citrus_v.processing.processor import CitrusVProcessor
    from citrus_v.train.data import build_train_dataset

    path = _with_bad_rows(tmp_path / "rows")
    processor = CitrusVProcessor.from_pretrained(tiny_dir)
    results = {}
    for num_proc in (1, 2):
        args = SftArguments(model=str(tiny_dir), dataset=[f"{path}#20"], max_length=2048, dataset_num_proc=num_proc)
        dataset, _, summary = build_train_dataset(args, processor)
        results[num_proc] = (
            [(r.file, r.line) for r in dataset.records], dataset.lengths, dict(dataset.skips.counts),
            [str(issue) for issue in dataset.skips.issues],
        )
        assert ("checked in 2 processes" in summary) == (num_proc == 2)
    assert results[1] == results[2]
    records, _, counts, _ = results[2]
    assert counts == {"invalid_json": 1, "schema": 1, "missing_file": 1, "too_long": 1}
    assert len(records) == 20  # FILE#20 samples from the 12 good rows the same way
    # --strict stops at the same first bad row
    from citrus_v.train.data import DatasetError

    errors = []
    for num_proc in (1, 2):
        args = SftArguments(model=str(tiny_dir), dataset=[str(path)], strict=True, dataset_num_proc=num_proc)
        with pytest.raises(DatasetError) as caught:
            build_train_dataset(args, processor)
        errors.append(str(caught.value))
    assert errors[0] == errors[1] and "train.jsonl:5: [missing_file]" in errors[0]


def test_multi_node_environment_is_checked():
    assert topology({"NPROC_PER_NODE": "2"}).distributed
    assert not topology({}).distributed
    where = topology({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1"})
    assert where.distributed and where.master_port == 29500  # torchrun's default, the same on every node
    assert "--node_rank=1" in where.torchrun_flags() and "--master_addr=10.0.0.1" in where.torchrun_flags()
    with pytest.raises(ValueError, match="NNODES=2 needs MASTER_ADDR"):
        topology({"NNODES": "2", "NODE_RANK": "0"})
    with pytest.raises(ValueError, match="NODE_RANK=2 must be below NNODES=2"):
        topology({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="NNODES='two' is not a whole number"):
        topology({"NNODES": "two"})


def test_two_local_nodes_meet_and_train_together(tiny_dir, dataset, tmp_path):
    """Two "nodes" on this machine (NNODES=2, NODE_RANK 0 and 1, one process each, gloo on CPU) rendezvous
    through MASTER_ADDR:MASTER_PORT and finish the run with identical weights."""
    out = tmp_path / "two-nodes"
    port = str(free_port())
    argv = [*CLI, "sft", "--model", str(tiny_dir), "--dataset", str(dataset), "--stage", "3", "--max_steps", "2",
            "--learning_rate", "1e-3", "--gradient_checkpointing", "false", "--report_to", "none",
            "--save_strategy", "no", "--logging_steps", "1", "--output_dir", str(out)]  # fmt: skip
    base = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    nodes = []
    for rank in (0, 1):
        env = {**base, "HF_HUB_OFFLINE": "1", "NNODES": "2", "NODE_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        nodes.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=420))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    assert f"torchrun: node 0 of 2, 1 process(es) per node, 2 in all; rendezvous at 127.0.0.1:{port}" in outputs[0][1]
    assert "torchrun: node 1 of 2" in outputs[1][1]
    digests = sorted((out / "ddp_digests").glob("rank*.txt"))
    assert [p.name for p in digests] == ["rank0.txt", "rank1.txt"]
    assert digests[0].read_text() == digests[1].read_text(), "the nodes' weights drifted apart"
    assert (out / "model.safetensors").is_file()
