"""The ``hooks``, ``lens``, ``sae`` and ``delphi`` console scripts: the Rust command lines, run in this Python
process."""

import signal
import sys


def main() -> None:
    """Entry point of the ``hooks`` script: behaves like the native ``hooks`` binary."""
    # The command runs in Rust without returning to Python until it is done, so Python's
    # SIGINT handler could never act on Ctrl-C: restore the default (terminate), as for a
    # native program. Interrupted caching jobs resume when re-run.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import hooks_main

    sys.exit(hooks_main(sys.argv[1:]))


def lens() -> None:
    """Entry point of the ``lens`` script: behaves like the native ``lens`` binary."""
    # As for `hooks`: Ctrl-C terminates; `lens train` resumes from its last checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import lens_main

    sys.exit(lens_main(sys.argv[1:]))


def sae() -> None:
    """Entry point of the ``sae`` script: behaves like the native ``sae`` binary."""
    # As for `hooks`: Ctrl-C terminates; `sae train` resumes from its last checkpoint.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import sae_main

    sys.exit(sae_main(sys.argv[1:]))


def delphi() -> None:
    """Entry point of the ``delphi`` script: behaves like the native ``delphi`` binary."""
    # As for `hooks`: Ctrl-C terminates; `delphi run` resumes with the latents not yet written.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    from . import delphi_main

    sys.exit(delphi_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
