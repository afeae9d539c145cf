import sys

from reranker.cli import main

sys.exit(main())
