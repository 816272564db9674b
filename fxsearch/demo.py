"""`make demo`: the search CLI with its defaults (python -m fxsearch.search): ResNet-8 on
scikit-learn's bundled digits, a float warm-up, joint searches at four lambdas (1, 2, 4, 8) and the uniform
w8a8 / w4a8 / w2a8 baselines, then a table of the results and where the plot, the reports and
the ONNX files are (runs/resnet8-digits/). A few minutes on 2 CPU cores; running it again
reads the finished runs instead of training them again.
"""
from __future__ import annotations

import sys

from fxsearch.search_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
