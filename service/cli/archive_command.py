"""``saliency-serve archive``: a model (its code, weights and requirements) becomes a ``.mar``.

It prints which CAM layer it found (or was given) and why, whether the model has attention
layers, and which requirements TorchServe will install for it; it refuses, with the reason,
an archive whose ONNX and torch logits disagree (exit 3), a model code that cannot be
imported here, a target layer that cannot be a CAM layer, or a requirements file the server
must not install (exit 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.cli.server_commands import (
    DEFAULT_STORE,
    SERVER_MODULES,
    _csv_floats,
    _ensure_default_archive,
    _size,
    needs,
)


@needs(SERVER_MODULES)
def cmd_archive(args: argparse.Namespace) -> int:
    from service.archive import ArchiveError, build_archive
    from service.runtime.export import ParityError

    try:
        if args.default:
            path = _ensure_default_archive(args.out)
        else:
            if not (args.labels and args.input_size and args.name):
                print("archive: --name, --labels and --input-size are required", file=sys.stderr)
                return 2
            eager = None
            files: list[Path] = list(args.extra_files)
            if args.model_file:
                files = [args.model_file, *([args.weights] if args.weights else []), *files]
                eager = {
                    "module": args.model_file.name,
                    "class": args.model_class,
                    "kwargs": json.loads(args.model_kwargs),
                    "weights": args.weights.name if args.weights else None,
                }
            path = build_archive(
                name=args.name,
                eager=eager,
                exported=args.exported,
                labels=args.labels.read_text().split(),
                input_size=args.input_size,
                mean=args.mean,
                std=args.std,
                target_layer=args.target_layer,
                out_dir=args.out,
                files=files,
                requirements=args.requirements,
                say=print,
            )
    except ParityError as exc:
        print(f"archive refused: {exc}", file=sys.stderr)
        return 3
    except ArchiveError as exc:
        print(f"archive refused: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


def add_parser(sub: Any) -> None:
    archive = sub.add_parser("archive", help="a model -> .mar (pt2 + onnx + model.json)")
    archive.add_argument("--default", action="store_true", help="the built-in shapes model")
    archive.add_argument("--out", type=Path, default=DEFAULT_STORE)
    archive.add_argument("--name")
    archive.add_argument("--model-file", type=Path, help="python file defining the network")
    archive.add_argument("--model-class", default="Net")
    archive.add_argument("--model-kwargs", default="{}", help="JSON constructor arguments")
    archive.add_argument("--weights", type=Path, help="state_dict saved with torch.save")
    archive.add_argument("--exported", type=Path, help="torch.export .pt2 (no CAM methods)")
    archive.add_argument("--labels", type=Path, help="one label per line")
    archive.add_argument("--input-size", type=_size)
    archive.add_argument("--mean", type=_csv_floats, default=[0.485, 0.456, 0.406])
    archive.add_argument("--std", type=_csv_floats, default=[0.229, 0.224, 0.225])
    archive.add_argument(
        "--target-layer",
        default=None,
        help="the CAM layer, e.g. layer4 or blocks.11.norm1 (default: found automatically)",
    )
    archive.add_argument(
        "--requirements",
        type=Path,
        help="pip requirements of the model's code, installed per model by TorchServe "
        "(torch, torchvision, torchaudio and pip options refused)",
    )
    archive.add_argument(
        "--extra-files",
        type=Path,
        nargs="+",
        default=[],
        help="other files or package folders the model file imports",
    )
    archive.set_defaults(func=cmd_archive)
