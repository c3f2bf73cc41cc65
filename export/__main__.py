"""python -m fastprompt.export --run RUN_DIR --format onnx|tensorrt --out FILE [options]

Exit status: 0 exported and checked; 1 the check failed, or the engine failed while being checked
(the rejected file is kept for inspection as NAME.rejected.onnx / NAME.rejected.plan; an --out
that existed is left as it was); 2 bad
input (missing run, unsupported method, TensorRT/CUDA missing, bad option, an --out suffix that
predict could not open), one line on stderr.
"""
from __future__ import annotations

import argparse
import sys

from fastprompt.cli import Parser, run_cli

#: export/onnx.py's EXPORTERS and MIN_OPSET and export/tensorrt.py's DEFAULT_BATCH, written out so
#: that --help imports no torch (tests/test_first_hour.py checks they agree)
EXPORTERS = ("torchscript", "dynamo")
MIN_OPSET = 17
DEFAULT_BATCH = (1, 32, 128)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fastprompt.export",
               description="Export a fastprompt run's classifier (one image pass, learned "
                           "prompts/adapters and the class text matrix baked in) to ONNX or a "
                           "TensorRT engine.")
    p.add_argument("--run", required=True, help="run directory (config.json + adapter.safetensors)")
    p.add_argument("--format", required=True, choices=["onnx", "tensorrt"],
                   help="onnx (checked with onnxruntime) or tensorrt (an engine for this GPU)")
    p.add_argument("--out", required=True,
                   help="output file: model.onnx, or model.plan for tensorrt (model.onnx, "
                        "model.plan.json and model.timing.cache are written next to it)")
    p.add_argument("--features", action="store_true",
                   help="output the normalised image features instead of the class logits")
    p.add_argument("--batch", default=",".join(map(str, DEFAULT_BATCH)), metavar="MIN,OPT,MAX",
                   help="tensorrt optimisation profile over the batch axis; OPT is the deployment "
                        "batch (default %(default)s; ONNX files have a free batch axis)")
    p.add_argument("--opset", type=int, default=MIN_OPSET, help="ONNX opset (>= 17, default %(default)s)")
    p.add_argument("--fp32", action="store_true", help="tensorrt: build in fp32 (default: fp16 "
                   "with normalisation layers in fp32)")
    p.add_argument("--exporter", choices=EXPORTERS, default="torchscript",
                   help="torch.onnx exporter (default: %(default)s, see export/onnx.py)")
    return p


def main(argv=None) -> int:
    """Exit status: see the module docstring; errors are one line (`fastprompt.cli.run_cli`)."""
    return run_cli(lambda: _main(argv))


def _main(argv) -> int:
    args = parser().parse_args(argv)
    from .runners import check_out_suffix

    check_out_suffix(args.format, args.out)
    if args.format == "onnx":
        from .onnx import export_onnx

        export_onnx(args.run, args.out, features=args.features, opset=args.opset,
                    exporter=args.exporter)
    else:
        from .tensorrt import export_tensorrt, parse_batch

        export_tensorrt(args.run, args.out, batch=parse_batch(args.batch), fp16=not args.fp32,
                        features=args.features, opset=args.opset, exporter=args.exporter)
    return 0


if __name__ == "__main__":
    sys.exit(main())
