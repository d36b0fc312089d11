"""`fusedrl train` with a test hook: `python -m tests.distributed._train_worker CONFIG OUT [--resume] [--kill-at N]`.

Runs `run_training` exactly as the CLI does (the process group from the torchrun-style
environment, FSDP2, fail_together); with --kill-at N, rank 1 SIGKILLs itself right after step N.
"""
import argparse
import os
import signal
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at", type=int, default=0)
    args = parser.parse_args()
    from fusedrl.cli import _end_distributed, setup_logging
    from fusedrl.train.run import load_run_config, run_training

    setup_logging()
    cfg = load_run_config(args.config, [("run.out_dir", args.out)])

    def hook(step, record):
        if args.kill_at and step == args.kill_at and os.environ.get("RANK") == "1":
            print(f"VICTIM step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    try:
        run_training(cfg, resume=args.resume, on_step_end=hook)
    finally:
        _end_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
