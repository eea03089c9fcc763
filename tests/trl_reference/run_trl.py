"""Run TRL 0.23.1's IterativeSFTTrainer on a JSON spec and record what it did.

Runs inside the reference venv (make_venv.sh: torch 2.13, transformers 4.57.6,
trl 0.23.1), never the project's: ``.ref-venv/bin/python run_trl.py spec.json``.

Spec (JSON object):
    model_dir        folder written by ``save_pretrained`` (safetensors; transformers 5 configs are accepted)
    tokenizer_dir    folder written by ``save_pretrained``; loaded with PreTrainedTokenizerFast, because
                     transformers 5 writes ``tokenizer_class: TokenizersBackend``, which 4.57's AutoTokenizer
                     cannot resolve
    output_dir       where the outputs go (the trainer's own output_dir is <output_dir>/trainer)
    args_class       "TrainingArguments" (default; TRL converts it to IterativeSFTConfig, as its tests did)
                     or "IterativeSFTConfig"
    training_args    kwargs for args_class. Harness defaults unless given: report_to="none", use_cpu=True,
                     and bf16=False for IterativeSFTConfig (TRL's bf16=None would mean CPU autocast)
    steps            list of step() calls, each with either input_ids (+ optional attention_mask, labels) as
                     lists of int lists, or texts (+ optional texts_labels) as lists of str
    fill_labels      default true: a token call without labels gets labels=input_ids, because TRL 0.23.1
                     raises without them (it then ignores them for causal LMs anyway)
    save_each_call   default false: also write after_call_<i>.safetensors

Outputs in output_dir:
    result.json      versions, resolved args, per call: global_step, new log entries, full log_history,
                     last_lr, micro-batches (inputs as trained, in TRL's shuffled order, and loss),
                     warnings, step()'s return value; and the final global_step / log_history
    final_model.safetensors   the model's state dict after the last call (fp32)
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers
import trl
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments
from trl import IterativeSFTConfig, IterativeSFTTrainer


def load_model(model_dir: str) -> torch.nn.Module:
    """Load a causal LM saved by transformers 4.x or 5.x (5 moved rope_theta into rope_parameters)."""
    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = dict(rope)
    return AutoModelForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=torch.float32)


def build_args(spec: dict[str, Any], output_dir: Path) -> TrainingArguments:
    kind = spec.get("args_class", "TrainingArguments")
    kwargs = {"report_to": "none", "use_cpu": True, **spec.get("training_args", {})}
    kwargs.setdefault("output_dir", str(output_dir / "trainer"))
    if kind == "IterativeSFTConfig":
        kwargs.setdefault("bf16", False)
        return IterativeSFTConfig(**kwargs)
    if kind != "TrainingArguments":
        raise ValueError(f"args_class={kind!r}: use 'TrainingArguments' or 'IterativeSFTConfig'")
    return TrainingArguments(**kwargs)


def step_kwargs(call: dict[str, Any], fill_labels: bool) -> dict[str, Any]:
    """JSON lists → what TRL 0.23.1 accepts: lists of 1-D long tensors, or lists of str."""
    kwargs: dict[str, Any] = {}
    for key in ("input_ids", "attention_mask", "labels"):
        if call.get(key) is not None:
            kwargs[key] = [torch.tensor(row, dtype=torch.long) for row in call[key]]
    if "input_ids" in kwargs and "labels" not in kwargs and fill_labels:
        kwargs["labels"] = [row.clone() for row in kwargs["input_ids"]]
    for key in ("texts", "texts_labels"):
        if call.get(key) is not None:
            kwargs[key] = list(call[key])
    return kwargs


def state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Independent contiguous copies, so tied weights do not trip safetensors."""
    return {k: v.detach().to(torch.float32).cpu().clone().contiguous() for k, v in model.state_dict().items()}


def record_micro_batches(trainer: IterativeSFTTrainer, sink: list[dict[str, Any]]) -> None:
    """Wrap compute_loss to log every micro-batch's inputs and loss, in TRL's (shuffled) order."""
    original = trainer.compute_loss

    def compute_loss(model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = original(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        entry = {k: v.tolist() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        entry["loss"] = float(loss.detach())
        sink.append(entry)
        return result

    trainer.compute_loss = compute_loss


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(spec["tokenizer_dir"])
    model = load_model(spec["model_dir"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = build_args(spec, out)
        trainer = IterativeSFTTrainer(model=model, args=args, processing_class=tokenizer)
    init_warnings = [str(w.message) for w in caught]
    micro: list[dict[str, Any]] = []
    record_micro_batches(trainer, micro)

    calls = []
    for index, call in enumerate(spec["steps"]):
        seen_logs, micro_start = len(trainer.state.log_history), len(micro)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            returned = trainer.step(**step_kwargs(call, spec.get("fill_labels", True)))
        calls.append({
            "global_step": trainer.state.global_step,
            "new_logs": trainer.state.log_history[seen_logs:],
            "log_history": list(trainer.state.log_history),
            "last_lr": [float(x) for x in trainer.lr_scheduler.get_last_lr()],
            "micro_batches": micro[micro_start:],
            "warnings": [str(w.message) for w in caught],
            "returned": repr(returned),
        })
        if spec.get("save_each_call", False):
            save_file(state_dict(trainer.model), str(out / f"after_call_{index}.safetensors"))

    save_file(state_dict(trainer.model), str(out / "final_model.safetensors"))
    resolved = trainer.args
    result = {
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        "args": {
            "class": type(resolved).__name__,
            **{k: getattr(resolved, k, None) for k in (
                "learning_rate", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
                "lr_scheduler_type", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "seed",
                "logging_steps", "eval_steps", "bf16", "fp16", "gradient_checkpointing", "max_length",
                "truncation_mode",
            )},
            "optim": str(getattr(resolved.optim, "value", resolved.optim)),
        },
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
        "init_warnings": init_warnings,
        "calls": calls,
        "final": {"global_step": trainer.state.global_step, "log_history": trainer.state.log_history},
    }
    (out / "result.json").write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: run_trl.py SPEC.json")
    main(sys.argv[1])
