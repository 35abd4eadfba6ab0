"""relu_doctor in a Hugging Face ``transformers.Trainer``: one callback, checkpoint and resume.

A tiny BERT is built from a config (random weights, nothing downloaded; ``hidden_act="relu"``
so its feed-forward blocks are ReLU MLPs) and trained for sequence classification on
synthetic token data (the label is whether token 1 occurs in the sequence). The callback
watches every ReLU, logs its scalars through the Trainer's ``logs`` (so any ``report_to``
backend receives them), writes its run directory under ``output_dir/relu_doctor`` and saves
its state into each checkpoint. The training is then interrupted after its first checkpoint
and resumed from it: the counts continue exactly where the checkpoint left them.

Run it::

    python examples/hf_trainer.py --out runs/hf
    relu-doctor report runs/hf/full/relu_doctor
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers

from relu_doctor.integrations.hf import ReluDoctorCallback


def tiny_bert(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_act="relu", max_position_embeddings=64, num_labels=2,
    )
    return transformers.BertForSequenceClassification(config)


def token_data(n: int, length: int = 16, seed: int = 0) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 100, (n, length), generator=g)
    mark = torch.rand(n, generator=g) < 0.5
    ids[mark, torch.randint(0, length, (int(mark.sum()),), generator=g)] = 1
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
         "labels": int(mark[i])}
        for i in range(n)
    ]


def train(out: Path, *, steps: int, resume: str | None = None) -> ReluDoctorCallback:
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=16,
        gradient_accumulation_steps=2, learning_rate=5e-4, logging_steps=2,
        save_strategy="steps", save_steps=steps // 2, eval_strategy="steps",
        eval_steps=steps // 2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        log_level="error",
    )
    # every_n_steps=1: collect every step, so the two runs' counts can be compared exactly.
    # Under the default overhead budget each run picks the steps it collects from its own
    # timings, and a resumed run may pick others than the uninterrupted one.
    doctor = ReluDoctorCallback(log_every_n_steps=4, every_n_steps=1, eval_stream=True)
    trainer = transformers.Trainer(
        model=tiny_bert(), args=args, train_dataset=token_data(512),
        eval_dataset=token_data(64, seed=1), callbacks=[doctor],
    )
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # quiet logs
    trainer.train(resume_from_checkpoint=resume)
    return doctor


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("relu_doctor_hf"))
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="8 steps (tests)")
    args = parser.parse_args(argv)
    steps = 8 if args.quick else args.steps
    warnings.filterwarnings("ignore", category=UserWarning)
    transformers.logging.set_verbosity_error()
    for sub in ("full", "resumed"):
        shutil.rmtree(args.out / sub, ignore_errors=True)

    full = train(args.out / "full", steps=steps)
    # "Interrupt" a second run after its first checkpoint, and resume it from there.
    ckpt = f"checkpoint-{steps // 2}"
    (args.out / "resumed").mkdir(parents=True)
    shutil.copytree(args.out / "full" / ckpt, args.out / "resumed" / ckpt)
    resumed = train(args.out / "resumed", steps=steps, resume=str(args.out / "resumed" / ckpt))

    assert full.doctor is not None and resumed.doctor is not None
    a, b = full.doctor.history(), resumed.doctor.history()
    print(f"Sites: {[s.name for s in full.doctor.sites]}")
    cols = ["step", "site", "dead", "activation_rate", "window_steps"]
    print("Uninterrupted run, last window:")
    print(a[a["step"] == a["step"].max()][cols].to_string(index=False))
    print(f"Resumed from {ckpt}, last window:")
    print(b[b["step"] == b["step"].max()][cols].to_string(index=False))
    same = a[a["step"] == steps][cols].reset_index(drop=True).equals(
        b[b["step"] == steps][cols].reset_index(drop=True)
    )
    print(f"The resumed run's counts equal the uninterrupted run's: {same}")
    print("Findings:", [str(f) for f in full.doctor.findings()] or "none")
    print(f"Run directory: {args.out / 'full' / 'relu_doctor'}")
    return {"full": a, "resumed": b, "same": same,
            "sites": [s.name for s in full.doctor.sites]}


if __name__ == "__main__":
    main()
