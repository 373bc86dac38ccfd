"""The white-box ceiling for a FedBPT task: LoRA fine-tuning of the same model on the same shots.

FedBPT sees the model only through forwards. This script asks what the same model reaches when
its weights may be trained: a LoRA adapter (PEFT, r = --rank on --target-modules, by default
q_proj/v_proj; `all-linear` is PEFT's every linear layer but the LM head) trained
centrally on the union of the clients' k-shot rows that a `fedtune run` of the config draws
(same seed, same template, label words and calibration), with the FedBPT loss (cross-entropy
over the verbalizer's logits at the answer position), AdamW, --epochs passes. Every --eval-every
epochs it scores the dev split, and it reports the test score of the best-by-dev epoch and of the
last one, through the same evaluation path as FedBPT (`FedBPTModel.evaluate` with the zero
prompt: the black box's forward now runs through the adapter).

    .venv/bin/python benchmarks/fedbpt_lora_upper_bound.py --search-from runs/search_sst2_seed1234.json \\
        --set task.dev_shots=100 --set task.test_max_rows=0 --json docs/benchmarks/fedbpt_lora_upper_bound_sst2.json

`--search-from` takes a search.json (a run's `fedbpt.search` choice) so that both sides start
from the same template and words; without it the config's own are used.

`--method` picks what is trained with gradients, the model's weights staying frozen otherwise:
- `lora`: the adapter above (the white-box ceiling of tuning the model);
- `subspace`: FedBPT's own prompt z (d = fedbpt.intrinsic_dim) through the run's fixed random
  projection A, prompt = A z added at the placeholder slots, as the black box does: the best any
  optimizer can do in the space CMA-ES searches, on the same rows (FedBPT's ceiling);
- `soft`: the prompt embeddings themselves (n_prompt_tokens x hidden, no projection): prompt tuning
  (Lester et al. 2021), what the prompt slots can do at all;
- `deep-subspace`: deep FedBPT's search space (`fedbpt.deep`, BBTv2): one z_l (d) per layer, z_0
  through A_0 at the input slots as above, z_l through that layer's own fixed A_l added to the
  hidden states at the prompt positions entering layer l (`fedtune.fedbpt.deep.DeepProjection`),
  every layer trained at once: deep FedBPT's ceiling;
- `deep-soft`: the per-layer offsets themselves, no projection (prefix-style deep prompt tuning).
The prompt methods are scored through `FedBPTModel.evaluate_prompt`, the same path as a FedBPT prompt.

    .venv/bin/python benchmarks/fedbpt_lora_upper_bound.py --config configs/fedbpt_sst2.toml --set task.k_shot=200 \
        --method subspace --lr 0.01 --epochs 10 --eval-every 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "fedbpt_sst2_bbt.toml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--search-from", default="")
    ap.add_argument("--method", choices=["lora", "subspace", "soft", "deep-subspace", "deep-soft"], default="lora")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--target-modules", default="q_proj,v_proj",
                    help="LoRA's target modules, comma-separated, or all-linear (default q_proj,v_proj)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from fedtune import config as C
    from fedtune.fedbpt.deep import DeepProjection, transformer_layers
    from fedtune.fedbpt.session import FedBPTModel, encode_eval, prepare_task
    from fedbpt_ablation import chosen

    extra = chosen(Path(args.search_from)) if args.search_from else []
    cfg = C.load(args.config, args.overrides + extra)
    for p in (cfg.task.train_path, cfg.task.test_path):
        if p and not p.startswith("hub:") and not Path(p).exists():
            print(f"skipped: {p} is absent (../shared/data holds the task files)", file=sys.stderr)
            return 0
    t0 = time.perf_counter()
    data = prepare_task(cfg)
    m = FedBPTModel(cfg, data.spec)
    box = m.box
    bs = cfg.eval.batch_size
    dev, test = encode_eval(box, m.spec, data.dev, bs), encode_eval(box, m.spec, data.test, bs)
    zero = {"dev": m.evaluate(None, dev), "test": m.evaluate(None, test)}
    print(f"template {m.spec.template!r}, words {m.spec.words}, calibration {cfg.fedbpt.calibration} · "
          f"{len(data.train)} training rows, {len(data.dev)} dev, {len(data.test)} test · zero prompt: dev "
          f"{zero['dev']['score']:.3f}, test {zero['test']['score']:.3f}", flush=True)

    model = box._model  # noqa: SLF001 (the white-box side may touch the weights: that is the point)
    n, width = box.n_prompt_tokens, box.hidden_size
    if args.method == "lora":
        targets = "all-linear" if args.target_modules == "all-linear" else args.target_modules.split(",")
        peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                      target_modules=targets, bias="none"))
        params = [p for p in peft_model.parameters() if p.requires_grad]
    else:  # the weights frozen; only the prompt learns
        model.requires_grad_(False)
        size = cfg.fedbpt.intrinsic_dim if args.method.endswith("subspace") else n * width
        layers = len(transformer_layers(model)) if args.method.startswith("deep") else 1
        params = [torch.zeros(layers, size, requires_grad=True)]
    proj = torch.as_tensor(m.projection.A) if args.method.endswith("subspace") else None
    deep_mats = []  # A_1 .. A_{L-1} (deep-subspace)
    if args.method.startswith("deep"):
        box._check_deep(np.zeros((1, layers - 1, n, width), np.float32), 1)  # noqa: SLF001 (installs the layer hooks)
        if args.method == "deep-subspace":
            deep_proj = DeepProjection(m.proj_spec, box.layer_stds(), m.projection)
            deep_mats = [torch.as_tensor(deep_proj.matrix(layer)) for layer in range(1, layers)]

    def prompt():  # (n, H) offsets at the slots, or None (LoRA: the zero prompt)
        if args.method == "lora":
            return None
        return (proj @ params[0][0] if proj is not None else params[0][0]).reshape(n, width)

    def deep_offsets():  # (L-1, n, H) offsets at the prompt positions entering layers 1..L-1, or None
        if not args.method.startswith("deep"):
            return None
        z = params[0][1:]
        rows = [a @ zl for a, zl in zip(deep_mats, z)] if deep_mats else list(z)
        return torch.stack(rows).reshape(layers - 1, n, width)

    def score(rows):
        if args.method == "lora":
            return m.evaluate(None, rows)
        with torch.no_grad():
            d = deep_offsets()
            return m.evaluate_prompt(prompt().numpy()[None], rows, None if d is None else d.numpy()[None])

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    train = m.shard(data.train)
    enc, y = train.enc, torch.as_tensor(train.labels)
    label = torch.as_tensor(m.label_ids)
    emb = model.get_input_embeddings()
    rng = np.random.default_rng(cfg.run.seed)
    history, best = [], None
    for epoch in range(1, args.epochs + 1):
        model.train(args.method == "lora")  # the prompt methods: the frozen model as the black box runs it
        losses = []
        for idx in np.array_split(rng.permutation(len(y)), max(1, len(y) // args.batch_size)):
            ids = torch.as_tensor(enc.input_ids[idx])
            mask = torch.as_tensor(enc.attention_mask[idx])
            with box._autocast():  # noqa: SLF001 (the same precision as the black box's forwards)
                x = emb(ids).float()
                slot = torch.as_tensor(enc.slot_start[idx])[:, None] + torch.arange(n)
                p = prompt()
                base = box._slot_base  # noqa: SLF001 (the placeholder slots' embeddings)
                x[torch.arange(len(idx))[:, None], slot] = base if p is None else base + p
                d = deep_offsets()
                if d is not None:  # the layer hooks add them at the prompt positions, as in the black box
                    box._hooks.live = [True] * (layers - 1)  # noqa: SLF001
                    box._hooks.now = (d[None].expand(len(idx), *d.shape), slot)  # noqa: SLF001
                hidden = box._body(box._input_dtype(x), mask)  # noqa: SLF001
                last = hidden[torch.arange(len(idx)), torch.as_tensor(enc.answer_pos[idx])]
                logits = box._verbalize(last, label).float()  # noqa: SLF001
                if d is not None:
                    box._hooks.now = None  # noqa: SLF001
            loss = torch.nn.functional.cross_entropy(logits, y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses))}
        if epoch % args.eval_every == 0 or epoch == args.epochs:
            rec["dev"] = score(dev)
            if best is None or rec["dev"]["score"] > best["dev"]["score"]:
                rec["test"] = score(test)  # only for a new best (and the last epoch)
                best = rec
            print(f"epoch {epoch}: train loss {rec['train_loss']:.4f} · dev {rec['dev']['score']:.3f}"
                  + (f" · test {rec['test']['score']:.3f}" if "test" in rec else ""), flush=True)
        history.append(rec)
    final = history[-1]
    if "test" not in final:
        final["test"] = score(test)
    report = {"command": " ".join(sys.argv), "template": m.spec.template, "words": m.spec.words,
              "calibration": cfg.fedbpt.calibration, "train_rows": len(data.train), "dev_rows": len(data.dev),
              "test_rows": len(data.test), "method": args.method, "rank": args.rank,
              "target_modules": args.target_modules if args.method == "lora" else None,
              "trainable_parameters": sum(int(p.numel()) for p in params), "lr": args.lr, "epochs": args.epochs,
              "zero_prompt": zero, "best_epoch": best["epoch"], "best": {"dev": best["dev"], "test": best["test"]},
              "final": {"dev": final["dev"], "test": final["test"]}, "history": history,
              "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{args.method} upper bound: zero prompt test {zero['test']['score']:.3f} · best-by-dev (epoch {best['epoch']}) "
          f"test {best['test']['score']:.3f} · final test {final['test']['score']:.3f} · {report['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
