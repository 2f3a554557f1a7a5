"""`clfsys <command>`: parses arguments, calls one library function, prints one JSON line.

User mistakes (ClfsysError) become one line on stderr and exit code 2, without a traceback.
Work that ran but is incomplete (IncompleteError: files unread, rows missing) prints its result
line and one line on stderr, and exits with code 1. Exit 0 means all of the work is done.
Progress and Keras output go to stderr, so stdout carries only the result line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import redirect_stdout
from typing import Any

from clfsys.errors import ClfsysError, DataError, IncompleteError
from clfsys.options import add_flags, from_args


def _config_args(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--config", required=required, help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key, e.g. train.lr=0.01")


def _check_out_dir(out: str, force: bool) -> str:
    from clfsys import storage

    if storage.is_file(out):
        raise DataError(f"--out {out} exists and is not a directory")
    if storage.list_files(out) and not force:
        raise DataError(f"--out {out} is not empty; choose a new directory or pass --force")
    return storage.normalize(out)


def cmd_train(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys import storage
    from clfsys.config import load_config
    from clfsys.train import publish, train

    cfg = load_config(args.config, args.overrides)
    out = _check_out_dir(args.out, args.force)
    staging = storage.staging_dir(out)
    result = train(cfg, work_dir=staging)
    print(f"data: {result.dataset.summary()}", file=sys.stderr)
    summary = publish(result, staging)
    storage.publish(staging, out)  # a URI: the bundle, its logs and checkpoints go there
    return {**summary, "bundle": out}


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys import bundle, data
    from clfsys.config import from_dict, load_config, parse_override
    from clfsys.train import evaluate

    found = bundle.load(args.model)
    if args.config:
        cfg = load_config(args.config, args.overrides)
    else:
        cfg = from_dict(found.metadata.get("config"))
        if args.overrides:
            cfg = cfg.replace(**dict(parse_override(o) for o in args.overrides))
    # Only the test split is decoded, the way the bundle's consumers decode images.
    ds = data.load(cfg.replace(**{"data.resize": found.resize}).data, test_only=True)
    if ds.input_shape != found.input_shape:
        raise DataError(f"test images are {ds.input_shape}, the model {args.model} expects "
                        f"{found.input_shape}")
    if ds.class_names != found.class_names:
        raise DataError(f"the dataset's classes {ds.class_names} differ from the model's "
                        f"{found.class_names}")
    metrics = evaluate(found.load_model(), ds.x_test, ds.y_test, ds.class_names)
    return {"model_id": found.model_id, "accuracy": round(metrics["accuracy"], 4),
            "loss": round(metrics["loss"], 4), "examples": metrics["examples"],
            "per_class_accuracy": {k: None if v is None else round(v, 4)
                                   for k, v in metrics["per_class_accuracy"].items()}}


def cmd_export_images(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys.config import DataConfig, load_config
    from clfsys.data import export_images

    if args.config:
        data_cfg = load_config(args.config, args.overrides).data
    else:
        data_cfg = DataConfig(dataset=args.dataset)
    count = export_images(data_cfg, args.split, args.out, limit=args.limit)
    print(f"wrote {count} PNG files under {args.out}", file=sys.stderr)
    return {"out": args.out, "images": count, "split": args.split}


def cmd_tune(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys.config import load_config
    from clfsys.search import run_search

    values = {"tune.warm_start.path": args.warm_start} if args.warm_start else {}
    cfg = load_config(args.config, args.overrides, values)
    return run_search(cfg, args.out, resume=args.resume)


def cmd_label(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys.label import LabelOptions, run_label

    return run_label(args.model, args.input, args.output, resume=args.resume,
                     options=from_args(LabelOptions, args))


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from clfsys.serve import ServeOptions
    from clfsys.serve_run import run_server

    return run_server(args.model, from_args(ServeOptions, args))


def build_parser() -> argparse.ArgumentParser:
    from clfsys.label import LabelOptions
    from clfsys.serve import ServeOptions

    parser = argparse.ArgumentParser(prog="clfsys", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one model and write a bundle")
    _config_args(p, required=True)
    p.add_argument("--out", required=True, help="bundle directory to write (local or a URI)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test metrics of a bundle")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    _config_args(p, required=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("tune", help="search architectures and learning rates on Ray Tune")
    _config_args(p, required=True)
    p.add_argument("--out", required=True,
                   help="directory (local or a URI) for trials, best/ and report/")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search")
    p.add_argument("--warm-start", metavar="PREVIOUS_OUT",
                   help="start from an earlier search's --out (sets tune.warm_start.path)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser("label", help="label image files into a Parquet dataset with Ray Data")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    p.add_argument("--input", required=True, action="append",
                   help="directory, file or glob (local or s3://, gs://); repeatable")
    p.add_argument("--output", required=True,
                   help="Parquet dataset directory: local (this machine) or a URI")
    add_flags(p, LabelOptions)
    p.add_argument("--resume", action="store_true",
                   help="label only the files not yet in --output")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("serve", help="serve a bundle over HTTP with Ray Serve (until Ctrl-C); "
                       "on a cluster where --name serves, swap its model")
    p.add_argument("--model", required=True, help="bundle directory or URI")
    add_flags(p, ServeOptions)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("export-images", help="write a dataset split as class folders of PNGs")
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist"])
    _config_args(p, required=False)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, default=None, help="export only the first N images")
    p.set_defaults(func=cmd_export_images)
    return parser


def _disconnect_ray() -> None:
    """Leave Ray before the result line: Ray's log monitor prints the workers' and raylets'
    lines to stdout from a thread of its own, and one that came after the JSON line would make
    it no longer the last line of stdout."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with redirect_stdout(sys.stderr):
            try:
                result = args.func(args)
            finally:
                _disconnect_ray()
    except IncompleteError as exc:
        print(json.dumps(exc.result), flush=True)
        print(f"clfsys: incomplete: {exc}", file=sys.stderr)
        return 1
    except ClfsysError as exc:
        print(f"clfsys: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("clfsys: interrupted", file=sys.stderr)
        return 130
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
