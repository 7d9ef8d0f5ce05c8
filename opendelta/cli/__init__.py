"""The ``opendelta`` command: ``train``, ``visualize`` and ``inspect``.

Bad arguments give one clear line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence


class CLIError(Exception):
    """An error reported to the user as one line."""


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _delta_kwargs(pairs: Sequence[str], modified: Optional[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise CLIError(f"--delta-arg {pair!r}: expected NAME=VALUE, e.g. lora_r=16")
        key, value = pair.split("=", 1)
        out[key.strip()] = _parse_value(value.strip())
    if modified:
        out["modified_modules"] = [m.strip() for m in modified.split(",") if m.strip()]
    return out


def _progress():
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return lambda iterable, total=None, desc=None: tqdm(iterable, total=total, desc=desc, leave=False,
                                                        dynamic_ncols=True)


# ---------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from ..core.registry import get_delta_class
    from .train import (DataError, TrainSettings, default_model_path, load_bbc_news,
                                      load_table, train_classifier)

    get_delta_class(args.delta)  # unknown types fail before anything heavy happens
    if args.model is not None and not Path(args.model, "config.json").is_file():
        raise CLIError(f"--model {args.model}: not a model directory (no config.json there)")
    if args.epochs < 1 or args.batch_size < 1 or args.max_length < 8 or args.lr <= 0:
        raise CLIError("--epochs and --batch-size must be >= 1, --max-length >= 8, --lr > 0")
    try:
        data = (load_table(args.data, args.text_column, args.label_column, args.test_fraction, args.seed)
                if args.data else load_bbc_news(args.test_fraction, args.seed))
        model_path = args.model or default_model_path()
    except DataError as error:
        raise CLIError(str(error)) from None
    if args.train_size:
        data.train = data.train[:args.train_size]
    if args.test_size:
        data.test = data.test[:args.test_size]
    settings = TrainSettings(delta_type=args.delta, delta_kwargs=_delta_kwargs(args.delta_arg, args.modified_modules),
                             epochs=args.epochs, batch_size=args.batch_size, max_length=args.max_length,
                             learning_rate=args.lr, seed=args.seed,
                             unfrozen=None if args.unfreeze is None
                             else ["deltas", *[u for u in args.unfreeze.split(",") if u]])
    print(f"model: {model_path}\ndata: {data.source}: {len(data.train)} train / {len(data.test)} test "
          f"examples, {len(data.labels)} labels\ndelta: {args.delta} {settings.delta_kwargs or ''}")
    metrics = train_classifier(model_path, data, settings, args.output_dir, progress=_progress())
    ratio = metrics["checkpoint_bytes"] / metrics["full_model_bytes"]
    print(f"\naccuracy: {metrics['accuracy_before']:.4f} before -> {metrics['accuracy_after']:.4f} after "
          f"({len(data.labels)} classes, chance {1 / len(data.labels):.2f})\n"
          f"loss per epoch: {', '.join(f'{l:.4f}' for l in metrics['epoch_losses'])}\n"
          f"time: {metrics['seconds']:.1f} s\n"
          f"checkpoint: {args.output_dir} {metrics['checkpoint_bytes'] / 1e6:.3f} MB vs full model "
          f"{metrics['full_model_bytes'] / 1e6:.1f} MB ({100 * ratio:.2f}%)")
    return 0


# ------------------------------------------------------------------------------ visualize
def cmd_visualize(args: argparse.Namespace) -> int:
    if not Path(args.model_dir, "config.json").is_file():
        raise CLIError(f"{args.model_dir}: not a model directory (no config.json there)")
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging

    from ..core.registry import get_delta_class
    from ..tools.visualization import Visualization

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    delta_class = get_delta_class(args.delta) if args.delta else None
    config = AutoConfig.from_pretrained(args.model_dir)
    model = AutoModel.from_config(config) if args.structure_only else AutoModel.from_pretrained(args.model_dir)
    if delta_class is not None:
        delta_class(backbone_model=model)
    mapping = _common_map(model) if args.common_structure else None
    Visualization(model).structure_graph(common_structure=args.common_structure, mapping=mapping,
                                         keep_non_params=args.keep_non_params,
                                         expand_params=args.expand_params)
    return 0


def _common_map(model: Any) -> Any:
    """The model's common-structure map, as a delta model finds it (its own, over the known
    backbones it holds, or inferred; an inferred map's table is printed first)."""
    from ..core.inference import InferredStructureMap
    from ..core.targets import required_structure_map

    try:
        mapping = required_structure_map("--common-structure", model)
    except ValueError as error:
        raise CLIError(str(error)) from None
    if isinstance(mapping, InferredStructureMap):
        print(mapping.summary())
    return mapping


# -------------------------------------------------------------------------------- inspect
def _tensor_summary(path: Path) -> Dict[str, Any]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        shapes = {}
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
    else:
        import torch

        state = torch.load(str(path), map_location="cpu", weights_only=True)
        shapes = {k: list(v.shape) for k, v in state.items()}
    count = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        count += n
    return {"tensors": len(shapes), "parameters": count, "keys": sorted(shapes)}


def cmd_inspect(args: argparse.Namespace) -> int:
    root = Path(args.checkpoint_dir)
    if not root.is_dir():
        raise CLIError(f"{root}: not a directory")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise CLIError(f"{root}: no config.json, so not a delta checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise CLIError(f"{config_file}: not valid JSON ({error.msg}, line {error.lineno})") from None
    weights = [p for p in (root / "model.safetensors", root / "pytorch_model.bin") if p.is_file()]
    if not weights:
        raise CLIError(f"{root}: no model.safetensors or pytorch_model.bin")
    try:
        summary = _tensor_summary(weights[0])
    except Exception as error:  # corrupt file: one line, the file and the reason
        raise CLIError(f"{weights[0]}: cannot be read ({error})") from None
    size = sum(p.stat().st_size for p in root.iterdir() if p.is_file())
    hyper = {k: v for k, v in config.items() if k not in {
        "delta_type", "backbone_class", "backbone_hash", "backbone_checkpoint_name", "modified_modules",
        "exclude_modules", "unfrozen_modules", "common_structure"}}
    print(f"checkpoint: {root}\n"
          f"delta type: {config.get('delta_type')}\n"
          f"backbone class: {config.get('backbone_class')}\n"
          f"backbone checkpoint: {config.get('backbone_checkpoint_name') or '-'}\n"
          f"backbone hash: {config.get('backbone_hash') or '-'}\n"
          f"modified modules: {config.get('modified_modules') or 'defaults'}"
          f"{' (common structure)' if config.get('common_structure') else ''}\n"
          f"weights: {weights[0].name}: {summary['tensors']} tensors, {summary['parameters']:,} parameters\n"
          f"size on disk: {size:,} bytes\n"
          f"hyperparameters: {json.dumps(hyper, sort_keys=True)}")
    if args.keys:
        print("\n".join(summary["keys"]))
    return 0


# --------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opendelta", description="Delta tuning for PyTorch models.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="delta-tune a sequence classifier (defaults: MiniLM on BBC news)")
    train.add_argument("--delta", default="lora", help="delta type (default lora)")
    train.add_argument("--delta-arg", action="append", default=[], metavar="NAME=VALUE",
                       help="a hyperparameter of the delta, e.g. lora_r=16 (repeatable)")
    train.add_argument("--modified-modules", default=None, help="comma-separated module keys (default: the method's)")
    train.add_argument("--unfreeze", default=None,
                       help="comma-separated modules trained besides the delta (default: the classification head)")
    train.add_argument("--model", default=None, help="a local model directory (default: the bundled MiniLM)")
    train.add_argument("--data", default=None,
                       help="CSV/TSV/JSONL file with text and label columns (default: BBC news)")
    train.add_argument("--text-column", default="text")
    train.add_argument("--label-column", default="label")
    train.add_argument("--test-fraction", type=float, default=0.2)
    train.add_argument("--train-size", type=int, default=0, help="use only the first N training examples")
    train.add_argument("--test-size", type=int, default=0, help="use only the first N test examples")
    train.add_argument("--epochs", type=int, default=1)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--max-length", type=int, default=128)
    train.add_argument("--lr", type=float, default=5e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--output-dir", default="outputs/delta")
    train.set_defaults(func=cmd_train)

    vis = sub.add_parser("visualize", help="print the module tree of a local model")
    vis.add_argument("model_dir")
    vis.add_argument("--delta", default=None, help="apply this delta type (default targets) first")
    vis.add_argument("--common-structure", "--common", action="store_true",
                     help="name modules by the common structure (inferred for architectures without a map)")
    vis.add_argument("--keep-non-params", action="store_true")
    vis.add_argument("--expand-params", action="store_true")
    vis.add_argument("--structure-only", action="store_true", help="build from config.json, skip the weights")
    vis.set_defaults(func=cmd_visualize)

    insp = sub.add_parser("inspect", help="describe a saved delta checkpoint")
    insp.add_argument("checkpoint_dir")
    insp.add_argument("--keys", action="store_true", help="also list the tensor names")
    insp.set_defaults(func=cmd_inspect)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ValueError, TypeError, KeyError, FileNotFoundError, ImportError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"opendelta: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("opendelta: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
