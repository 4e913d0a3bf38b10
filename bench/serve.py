"""CPU serving speed: predictions per second of one checkpoint through transformers' ``pipeline()``, this project's
predictor (``Classifier``), and its ONNX export in ONNX Runtime (fp32 and int8 weights), in one command.

    python bench/serve.py --checkpoint checkpoints/RUN/final            # exports it first if it has no onnx/
    python bench/serve.py --checkpoint checkpoints/RUN/final --texts 2000 --threads 2

The texts are the checkpoint's run's own validation split (the default data's reviews for the default run), in
their order; every system classifies all of them, after one warm-up call on the first 64, ``--repeats`` times;
the median is reported. Each system uses ``--threads`` CPU threads (torch's intra-op threads, ONNX Runtime's
session threads). ``pipeline()`` is measured as users call it (one text at a time, its default) and with
``batch_size`` 64; the predictor batches 64 texts sorted by length. It prints a JSON line per system and a table
with each system's rate over ``pipeline()``'s default; the agreement of each system's labels with the PyTorch
predictor's is printed too (int8 changes a few).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--texts", type=int, default=1000, help="How many validation texts (from the start).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", default="pipeline,pipeline-b64,predictor,onnx,onnx-int8")
    parser.add_argument("--output", default=None, help="Append the JSON lines here.")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))

    import torch
    from transformers import pipeline

    from encoderfit import Classifier
    from encoderfit.cli import evaluate
    from encoderfit.serve import inference
    from encoderfit.serve.onnx import FILES, ONNX_DIR, export_onnx

    torch.set_num_threads(args.threads)
    ckpt = inference.resolve_checkpoint(args.checkpoint)
    eargs = evaluate.build_parser().parse_args(["--checkpoint", str(ckpt)])
    evaluate._check(eargs)
    _, got, _ = evaluate.evaluation_data(eargs, say=lambda line: None)
    texts = list(got.texts[:args.texts])
    systems = args.systems.split(",")
    if any(s.startswith("onnx") for s in systems) and not (ckpt / ONNX_DIR / FILES["int8"]).is_file():
        export_onnx(ckpt, int8=True, say=print)

    def ort_threads(clf):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        model = clf._clf.model
        model.session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        return clf

    runners, labels = {}, {}
    for name in systems:
        if name.startswith("pipeline"):
            pipe = pipeline("text-classification", model=str(ckpt), device=-1)
            kwargs = {"batch_size": 64} if name == "pipeline-b64" else {}
            length = inference.trained_max_length(ckpt) or 512
            runners[name] = (lambda p, kw: lambda xs: [r["label"] for r in p(xs, truncation=True, max_length=length,
                                                                              **kw)])(pipe, kwargs)
        elif name == "predictor":
            clf = Classifier.load(ckpt, device="cpu", precision="fp32", batch_size=64)
            runners[name] = lambda xs, c=clf: [p.label for p in c.predict(xs)]
        else:
            clf = ort_threads(Classifier.load(ckpt, runtime=name, batch_size=64))
            runners[name] = lambda xs, c=clf: [p.label for p in c.predict(xs)]

    rows = []
    for name, run in runners.items():
        run(texts[:64])  # warm-up
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            labels[name] = run(texts)
            times.append(time.perf_counter() - t0)
        seconds = statistics.median(times)
        rows.append({"system": name, "texts": len(texts), "threads": args.threads, "seconds": round(seconds, 3),
                     "per_second": round(len(texts) / seconds, 1), "torch": torch.__version__,
                     "cpu": _cpu_name(), "date": time.strftime("%Y-%m-%d")})
    ref = labels.get("predictor")
    base = next((r["per_second"] for r in rows if r["system"] == "pipeline"), None)
    for row in rows:
        if ref is not None:
            row["same_label_as_predictor"] = round(sum(a == b for a, b in zip(labels[row["system"]], ref)) / len(ref), 4)
        if base:
            row["vs_pipeline"] = round(row["per_second"] / base, 2)
        print(json.dumps(row))
        if args.output:
            with open(args.output, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(f"\n{'system':<12} {'texts/s':>9} {'vs pipeline()':>14} {'same label':>11}")
    for row in rows:
        print(f"{row['system']:<12} {row['per_second']:>9.1f} {row.get('vs_pipeline', float('nan')):>13.2f}x "
              f"{row.get('same_label_as_predictor', float('nan')):>11.4f}")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
