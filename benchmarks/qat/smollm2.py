"""SmolLM2-135M INT4 (block 64, symmetric, decoder linears): fp, PTQ RTN, PTQ AWQ, QAT.

QAT starts from the RTN ranges, learns them with LSQ and fine-tunes the decoder linears by
distillation from the float model (KL on the calibration split), so what it recovers is
quantization error, not adaptation to the test text's domain. Perplexity: the first
``--windows`` 2048-token windows of the test split.

    python benchmarks/qat/smollm2.py [--steps 300] [--seq 256] [--batch 4] [--awq]

On a GPU machine without the model packages: ``--dump-tokens t.pt`` here writes the token ids
(test windows + training rows), then run there with ``--gguf <file> --tokens t.pt --device cuda``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import row, write_rows  # noqa: E402

import modelopt_lite as mtl  # noqa: E402
from modelopt_lite.calib.embedded import load_model, wiki_text  # noqa: E402
from modelopt_lite.config import MaxCalibConfig, QuantConfig, QuantizerSpec  # noqa: E402
from modelopt_lite.eval import perplexity  # noqa: E402
from modelopt_lite.plugins.loop import fit  # noqa: E402
from modelopt_lite.qat import QATConfig, convert, prepare_qat  # noqa: E402

MODEL = "smollm2-135m"


def int4_config(algorithm=None) -> QuantConfig:
    spec = QuantizerSpec(num_bits=4, granularity="per_block", block_size=64, symmetric=True)
    return QuantConfig(weight=spec, algorithm=algorithm or MaxCalibConfig())


def train_tokens(tokenizer, n: int, seq: int) -> torch.Tensor:
    ids = tokenizer(wiki_text("calibration")[: n * seq * 8], add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[: n * seq]).view(n, seq)


class TokenIds:
    """Stands in for the tokenizer where only precomputed token ids travel (GPU machine)."""

    def __init__(self, ids, bos_token_id):
        self.ids, self.bos_token_id = ids, bos_token_id

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": self.ids.tolist()}


def load_gguf(path: str):
    from transformers import AutoModelForCausalLM

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    model.hf_quantizer = None
    return model.eval()


def distill_loss(teacher):
    def loss_fn(model, batch):
        with torch.no_grad():
            target = F.log_softmax(teacher(batch).logits.float(), -1)
        logp = F.log_softmax(model(batch).logits.float(), -1)
        return F.kl_div(logp, target, log_target=True, reduction="batchmean") / batch.shape[1]
    return loss_fn


def optimizer(model, lr: float, range_lr: float):
    for p in model.parameters():
        p.requires_grad_(False)
    ranges = [p for n, p in model.named_parameters() if n.endswith(("amax", "amin"))]
    weights = [m.weight for n, m in model.named_modules() if hasattr(m, "weight_quantizer")]
    for p in ranges + weights:
        p.requires_grad_(True)
    return torch.optim.AdamW([{"params": weights, "lr": lr},
                              {"params": ranges, "lr": range_lr}], weight_decay=0.0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--range-lr", type=float, default=1e-3)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--awq", action="store_true", help="also run PTQ AWQ (slow on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--gguf", help="load the model from this GGUF file instead of the package")
    p.add_argument("--tokens", help="token ids written by --dump-tokens (with --gguf)")
    p.add_argument("--dump-tokens", help="write the token ids to this file and stop")
    p.add_argument("--machine", default=None, help="machine name for the results rows")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_train = args.steps * args.batch
    if args.tokens:
        saved = torch.load(args.tokens)
        fp = load_gguf(args.gguf).to(args.device)
        tok = TokenIds(saved["test"], saved["bos"])
        tokens, test = saved["train"][:n_train, :args.seq].long(), "x"
    else:
        fp, tok = load_model(MODEL)
        test = wiki_text("test")
        tokens = train_tokens(tok, n_train, args.seq)
    if args.dump_tokens:
        ids = tok(test, add_special_tokens=False)["input_ids"][: args.windows * 2048]
        torch.save({"test": torch.tensor(ids, dtype=torch.int32), "bos": tok.bos_token_id,
                    "train": tokens.int()}, args.dump_tokens)
        return
    ppl = lambda m: perplexity(m, tok, test, seq_len=2048, windows=args.windows).ppl  # noqa: E731
    rows = [row(MODEL, "fp", "ppl", ppl(fp))]
    rtn = mtl.quantize(copy.deepcopy(fp), int4_config(), progress=False)
    rows.append(row(MODEL, "ptq_rtn", "ppl", ppl(rtn)))
    print(rows[-2:], flush=True)
    if args.awq:
        from modelopt_lite.algorithms.awq import AWQConfig
        from modelopt_lite.calib.runner import make_forward_loop
        loop = make_forward_loop(tokens[:32], batch_size=4)
        try:
            awq = mtl.quantize(copy.deepcopy(fp), int4_config(AWQConfig()), forward_loop=loop)
            rows.append(row(MODEL, "ptq_awq", "ppl", ppl(awq)))
            print(rows[-1], flush=True)
            del awq
        except Exception as err:  # AWQ is optional here; QAT still runs
            print(f"PTQ AWQ failed: {err!r}", flush=True)
    qat = prepare_qat(rtn, qat=QATConfig(lsq=True))
    batches = [b.to(args.device) for b in tokens.split(args.batch)]
    opt = optimizer(qat, args.lr, args.range_lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps)
    t0 = time.time()
    losses = fit(qat, batches, opt, args.steps, loss_fn=distill_loss(fp.eval()),
                 scheduler=sched, max_grad_norm=1.0)
    train_s = time.time() - t0
    print(f"QAT {args.steps} steps x {args.batch} x {args.seq} tokens in {train_s:.0f} s; "
          f"KL {sum(losses[:5]) / 5:.4f} -> {sum(losses[-5:]) / 5:.4f}", flush=True)
    convert(qat.eval())
    rows.append(row(MODEL, "qat", "ppl", ppl(qat), args.steps, train_s))
    if args.machine:
        for r in rows:
            r["machine"] = args.machine
    write_rows(rows, MODEL)


if __name__ == "__main__":
    main()
