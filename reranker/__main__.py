import sys

from reranker.signals import install_early

install_early(sys.argv[1:])  # the first thing: before the imports of the command (grpc, numpy, torch)

from reranker.cli import main  # noqa: E402

sys.exit(main())
