"""Check this install on this machine: small models of every architecture, a few sampler steps and a training step,
run on the device in each dtype and execution mode and compared with stored PyTorch references.

    python tools/selfcheck.py                                    # the device found (Ascend, else CPU), fp32 + fp16
    python tools/selfcheck.py --device_target Ascend --dtype fp32,fp16,bf16 --mode graph,pynative --msrun
    python tools/selfcheck.py --plan                             # which checks and kernels, without running them

Prints a table (check, device, dtype, mode, max error, tolerance, ok) and exits 1 naming every failed check.
"""
import sys

from pixart.cli import main as cli_main
from pixart.cli.selfcheck import build_parser, run


def main(argv=None) -> int:
    return cli_main(run, build_parser, __doc__, argv)


if __name__ == "__main__":
    sys.exit(main())
