"""The `fusedrl` command.

    fusedrl train CONFIG.toml [--resume] [--section.field=value ...]   run one stage from a TOML config
    torchrun --nproc-per-node N -m fusedrl train CONFIG.toml           the same on N processes (FSDP2, [parallel])
    fusedrl demo [--out DIR] [--quick] [--config TOML]                 the CPU demo (no download)
    fusedrl bench [ARGS ...]                                           kernel benchmarks (fusedrl.bench.run_all)
    fusedrl profile OP [--shape ...] | profile run CONFIG.toml --steps N  profile one op / training steps
    fusedrl config [--reference]                                       print the default config / its reference
    fusedrl init STAGE [DIR] [--force]                                 a starter config and its data in DIR
    fusedrl --version                                                  the installed version

Examples:

    fusedrl train examples/sft_tiny.toml --loop.max_steps=100        # after `fusedrl demo` wrote its data
    fusedrl train examples/sft_tiny.toml --resume                     # continue after a crash
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

logger = logging.getLogger("fusedrl")


class _StderrHandler(logging.StreamHandler):
    """A StreamHandler that looks up sys.stderr at each write (it may be replaced, e.g. by pytest)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Log "fusedrl" messages on rank 0 only; rich formatting on a terminal."""
    from fusedrl.train.metrics import is_rank0

    root = logging.getLogger("fusedrl")
    if root.handlers:
        return
    try:  # transformers' per-save progress bars would interleave with the step lines
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    if not is_rank0() or os.environ.get("RANK", "0") != "0":  # other ranks (torchrun) log errors only
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.ERROR)
        return
    if sys.stderr.isatty():
        from rich.logging import RichHandler
        handler = RichHandler(show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl", description="A lean RLHF post-training engine on fused kernels.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (config and data errors too)")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run one stage from a TOML config",
                           description="Overrides: --section.field=value, e.g. --optim.lr=1e-5 --loop.max_steps=100.")
    train.add_argument("config", help="the run's TOML file")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in run.out_dir")
    train.add_argument("--overwrite", action="store_true",
                       help="run.out_dir holds an earlier run: move it aside (OUT_DIR.old-TIME) and start over")
    demo = sub.add_parser("demo", help="the CPU demo: a tiny model learns a synthetic task, no download")
    demo.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    demo.add_argument("--quick", action="store_true", help="fewer steps and prompts (for tests, ~1 minute)")
    demo.add_argument("--config", default=None, help="a demo TOML (default: the built-in one, = examples/demo.toml)")
    sub.add_parser("bench", help="kernel benchmarks (forwards its arguments to fusedrl.bench.run_all)", add_help=False)
    sub.add_parser("profile", help="profile one op (fusedrl profile OP --help) or N training steps "
                   "(fusedrl profile run CONFIG.toml --steps N)", add_help=False)
    show = sub.add_parser("config", help="print the default config as TOML (or the field reference)")
    show.add_argument("--reference", action="store_true", help="markdown reference of every field")
    init = sub.add_parser("init", help="write a starter config and its small data (tiny model, CPU)",
                          description="Then: cd DIR && fusedrl train STAGE.toml")
    init.add_argument("stage", metavar="STAGE", help="sft, reward_model, prm, rejection, dpo, grpo (or dr_grpo, "
                      "dapo, gspo, cispo, sapo, rloo, reinforce), ppo, distill")
    init.add_argument("dir", metavar="DIR", nargs="?", default=".", help="target folder (default: here)")
    init.add_argument("--force", action="store_true", help="overwrite the files it would write")
    return parser


def _version() -> str:
    import fusedrl
    return f"fusedrl {fusedrl.__version__}"


def _init(args) -> int:
    from fusedrl.train.starter import write_starter

    written = write_starter(args.stage, args.dir, force=args.force)
    for path in written:
        print(f"wrote {path}")
    where = "" if args.dir in (".", "") else f"cd {args.dir} && "
    print(f"next: {where}fusedrl train {written[0].name}")
    return 0


def _bench(argv: List[str]) -> int:
    from fusedrl.bench import run_all
    return int(run_all.main(argv) or 0)


def _end_distributed() -> None:
    """torchrun: destroy the process group `fusedrl train` created (nothing in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
def _profile(argv: List[str]) -> int:
    from fusedrl import profile
    setup_logging()
    try:
        return int(profile.main(argv) or 0)
    except _user_errors() as err:  # as for train: one clear line, exit 2 (--debug is not parsed here)
        logger.error("%s", err)
        return 2


def _user_errors() -> tuple:
    """Errors that name a user's input (config, data, run folder, checkpoint) or a diverged run."""
    from fusedrl.config import ConfigError
    from fusedrl.data.validate import DataError
    from fusedrl.train.checkpoint import CheckpointError
    from fusedrl.train.fail_fast import RankFailure
    from fusedrl.train.loop import NonFiniteError
    from fusedrl.train.run_dir import RunDirError
    from fusedrl.train.starter import StarterError

    # RankFailure: under torchrun another rank failed; its message names the rank
    return (ConfigError, DataError, CheckpointError, RunDirError, NonFiniteError, FileNotFoundError, StarterError,
            RankFailure)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "profile":
        return _profile(argv[1:])
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    setup_logging()
    from fusedrl.config import TrainConfig, describe_config, parse_overrides, to_toml

    if args.command == "config":
        if rest:  # `fusedrl config --stage grpo` must not print the sft default as if it were grpo's
            parser.error(f"config: unrecognized arguments: {' '.join(rest)}")
        from fusedrl.stages import ReferenceConfig
        print(describe_config(ReferenceConfig()) if args.reference else to_toml(TrainConfig()))
        return 0
    try:
        overrides = parse_overrides(rest)
        if args.command == "train":
            from fusedrl.train.run import load_run_config, run_training
            cfg = load_run_config(args.config, overrides)
            try:
                result = run_training(cfg, resume=args.resume, overwrite=args.overwrite)
            finally:
                _end_distributed()
            return 130 if result.interrupted else 0
        if args.command == "demo":
            from fusedrl.demo.pipeline import run_demo
            run_demo(out_dir=args.out, quick=args.quick, config_path=args.config, overrides=overrides)
            return 0
        if args.command == "init":
            if rest:
                parser.error(f"init: unrecognized arguments: {' '.join(rest)}")
            return _init(args)
    except _user_errors() as err:  # the project's own error types: one clear line, exit 2
        if args.debug:
            raise
        logger.error("%s%s", "NonFiniteError: " if type(err).__name__ == "NonFiniteError" else "", err)
        return 2  # anything else is a bug or an environment problem: it keeps its traceback
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover
    return 2


if __name__ == "__main__":
    sys.exit(main())
